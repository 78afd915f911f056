"""Text data: NEPA pretraining on byte (or id) sequences and sequence classification, the generic
objectives of unipred.task on the ``text`` data source.

Data (``data.root`` / ``data.val_root``): a folder of class sub-folders of text files, a JSONL
or CSV file of (text, label) records, loose text files (unlabelled), or ``unipred data
pack-text`` shards; see ``unipred.tasks.text.data``. ``data.corpus`` names a set built on this
machine from Debian packages instead (``wordlang``, ``manlang``: ``unipred.tasks.text.corpora``),
read only when no root is set (the recipes default to wordlang; a root replaces it). An empty
``data.root`` (and no corpus) means generated stand-in text.

Model sizes registered here (the "text" tokenizer: UTF-8 bytes, 1-D coordinates):
``nepa_text_b`` (dim 768, depth 12), ``nepa_text_s`` (384, 12), ``nepa_text_tiny`` (the demo's
and the recipe's: 128, 4) and ``nepa_text_debug`` (64, 2, for tests).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from unipred.tasks.text import corpora
from unipred.tasks.text.data import TextRecords, TextShards, pad_collate, read_records
from unipred.tasks.text.naive_bayes import char_ngram_nb

from unipred.base.registry import MODELS
from unipred.data.shards import is_shard_spec, shard_metadata
from unipred.nn.model import ModelConfig, model_config
from unipred.task import DataConfig, DataSource, check_tokenizer, model_tokenizer, register_data


# ------------------------------------------------------------------------------ model sizes
def _text(base: str, dim: int, depth: int, heads: int, **tokenizer_args) -> ModelConfig:
    cfg = model_config(base, tokenizer="text")
    cfg.tokenizer_args = dict(tokenizer_args)
    cfg.predictor = dataclasses.replace(cfg.predictor, dim=dim, depth=depth, heads=heads)
    return cfg


@MODELS.register("nepa_text_b")
def nepa_text_b() -> ModelConfig:
    """Text, one byte per token: dim 768, depth 12, 12 heads."""
    return _text("nepa_vit_b14", 768, 12, 12)


@MODELS.register("nepa_text_s")
def nepa_text_s() -> ModelConfig:
    """Text, one byte per token: dim 384, depth 12, 6 heads."""
    return _text("nepa_vit_s14", 384, 12, 6)


@MODELS.register("nepa_text_tiny")
def nepa_text_tiny() -> ModelConfig:
    """Text, one byte per token: dim 128, depth 4, 4 heads (the text recipes')."""
    return _text("nepa_debug", 128, 4, 4)


@MODELS.register("nepa_text_debug")
def nepa_text_debug() -> ModelConfig:
    """Text, one byte per token: dim 64, depth 2, 4 heads (tests and smoke runs)."""
    return _text("nepa_debug", 64, 2, 4)


# ------------------------------------------------------------------------------ data config
@dataclass
class TextData(DataConfig):
    """Where the records come from, how they are cut, and the generated stand-in."""

    # "" | wordlang | manlang: a set built from Debian packages (corpora.py), read only when
    # data.root and data.val_root are empty (they name your own data and win)
    corpus: str = ""
    corpus_train: int = 2000  # records per class of the corpus' train / test splits
    corpus_test: int = 500
    cache_dir: str = ""  # where corpora are built ("" = $UNIPRED_CACHE or ~/.cache/unipred)
    unit: str = "line"  # folders: one record per non-empty line | per file ("file")
    text_key: str = "text"  # JSONL key / CSV column of the text
    label_key: str = "label"  # JSONL key / CSV column of the label (names or ints)
    ids_key: str = "ids"  # JSONL key of an id list (instead of text; any vocabulary)
    context: int = 64  # ids per sample: longer records are cut (see windows)
    # pretraining: cut every record into consecutive windows of `context` ids, each a sample
    # (long documents); classification always reads one window per record (a random one when
    # training, the first when evaluating)
    windows: bool = True
    min_len: int = 8  # a window's tail shorter than this is dropped (unless it is the record)
    max_record_bytes: int = 1 << 20  # longer lines/files are skipped and counted (too_large)
    generated_classes: int = 4  # the stand-in text when root and corpus are empty
    generated_per_class: int = 200
    generated_val_per_class: int = 50
    num_workers: int = 1
    shuffle_buffer: int = 1000


KNOWN_TOKENIZERS = ("image", "audio", "audio_frames", "video", "text")


def cache_dir(d: TextData) -> Path:
    return Path(d.cache_dir or os.environ.get("UNIPRED_CACHE", "~/.cache/unipred")).expanduser()


def uses_corpus(d: TextData) -> bool:
    """Whether ``data.corpus`` is read: only when no ``data.root`` / ``data.val_root`` names
    the user's own data. The text recipes default to the wordlang corpus, and a person who
    adds ``data.root=DIR`` to one (docs/first-hour.md) means DIR, not wordlang."""
    return bool(d.corpus) and not (d.root or d.val_root)


def corpus_folder(d: TextData) -> Path:
    """The built corpus of ``data.corpus`` (built now when missing)."""
    if d.corpus not in corpora.SETS:
        raise ValueError(f"data.corpus={d.corpus!r}: use one of {sorted(corpora.SETS)} or ''")
    out = cache_dir(d) / f"text_{d.corpus}_{d.corpus_train}_{d.corpus_test}"
    return corpora.SETS[d.corpus](out, d.corpus_train, d.corpus_test)


_SMOKE = {"model.name": "nepa_text_debug", "trainer.global_batch": 4, "data.num_workers": 0,
          "data.generated_per_class": 4, "data.generated_val_per_class": 2}  # fmt: skip


@register_data("text")
class TextSource(DataSource):
    """Text (UTF-8 bytes) or id sequences from folders, JSONL/CSV, shards or a built corpus
    (generated text without any). Bad lines and files are skipped and counted."""

    config = TextData
    smoke = _SMOKE

    def __init__(self, cfg, objective: str = "pretrain"):
        super().__init__(cfg, objective)
        self._classes: list[str] | None = None

    @classmethod
    def check_config(cls, cfg, objective):
        name, _ = model_tokenizer(cfg)
        check_tokenizer(name, "text", cfg.model.name, KNOWN_TOKENIZERS)
        d = cfg.data
        if d.unit not in ("line", "file"):
            raise ValueError(f"data.unit={d.unit!r}: use 'line' or 'file'")
        if d.context < 1:
            raise ValueError(f"data.context={d.context} must be >= 1")
        if d.corpus and d.corpus not in corpora.SETS:
            raise ValueError(f"data.corpus={d.corpus!r}: use one of {sorted(corpora.SETS)} or ''")

    # -- where the split lives
    def _spec(self, split: str) -> str:
        d: TextData = self.cfg.data
        if uses_corpus(d):
            return str(corpus_folder(d) / ("train" if split == "train" else "test"))
        return d.root if split == "train" else d.val_root

    def _read(self, spec: str, classes=None):
        d: TextData = self.cfg.data
        return read_records(spec, d.unit, d.text_key, d.label_key, d.ids_key,
                            d.max_record_bytes, classes=classes)  # fmt: skip

    def train_classes(self) -> list[str]:
        """The class names of the training split (validation maps its labels through them)."""
        if self._classes is None:
            spec = self._spec("train")
            if not spec:
                self._classes = []
            elif is_shard_spec(spec):
                self._classes = list(shard_metadata(spec).get("classes", []))
            elif Path(spec).is_dir():
                sub = [p.name for p in Path(spec).iterdir() if p.is_dir()]
                self._classes = sorted(n for n in sub if not n.startswith("."))
            else:
                self._classes = self._read(spec)[1]
        return self._classes

    def num_classes(self):
        d: TextData = self.cfg.data
        if not d.root and not uses_corpus(d):
            return d.generated_classes
        return len(self.train_classes()) or None

    def build(self, split, augment):
        d: TextData = self.cfg.data
        train = split == "train"
        windows = self.objective == "pretrain" and d.windows
        if not d.root and not uses_corpus(d):
            n = d.generated_per_class if train else d.generated_val_per_class
            if n <= 0:
                return None
            recs = corpora.generated_records(d.generated_classes, n, self.cfg.seed, split)
            names = [f"class{c}" for c in range(d.generated_classes)]
            return TextRecords(recs, names, d.context, windows, augment, d.min_len)
        spec = self._spec(split)
        if not spec:
            return None
        if is_shard_spec(spec):
            return TextShards(spec, d.context, augment, d.shuffle_buffer, self.cfg.seed)
        classes = None if train else (self.train_classes() or None)
        records, names = self._read(spec, classes)
        if not records:
            raise ValueError(f"{spec}: no readable text records (see the bad-sample report)")
        return TextRecords(records, names, d.context, windows, augment, d.min_len)

    def collate(self, split, augment, num_classes=None):
        return pad_collate

    def baseline_scores(self, train, test):
        """The character 1-3-gram naive Bayes on the same training items (label budget
        included) and test items."""
        return {"char_ngram_nb": char_ngram_nb(train, test)}


TextPretrain = TextSource.tasks["pretrain"]
TextClassify = TextSource.tasks["classify"]
