"""The text modality: the discrete tokenizer, the readers and their bad-input accounting, the
packer, the n-gram baseline and the Debian-built corpora."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from unipred.tasks.text.corpora import generated_records, roff_text
from unipred.tasks.text.data import (
    TextRecords,
    TextShards,
    bounded_lines,
    pad_collate,
    read_records,
)
from unipred.tasks.text.naive_bayes import char_ngram_nb
from unipred.tokenizers.text import DiscreteTokenizer, encode_batch

from unipred.data.accounting import BadSampleCounter
from unipred.nn.model import NEPA, model_config


def _model(head=None, causal=True, **tk):
    mc = model_config("nepa_text_debug")
    mc.tokenizer_args = dict(tk)
    mc.predictor.causal = causal
    if head:
        mc.head, mc.num_classes = head, 3
    torch.manual_seed(0)
    return NEPA(mc).eval()


# ------------------------------------------------------------------------------ tokenizer
def test_strided_embedding_sums_one_table_per_group_position():
    tk = DiscreteTokenizer(dim=8, vocab_size=5, group=2)
    t = tk({"ids": torch.tensor([[1, 4, 2, 0, 3]]), "lengths": torch.tensor([5])})
    W = tk.embed.weight
    assert t.tokens.shape == (1, 3, 8)
    torch.testing.assert_close(t.tokens[0, 0], W[1] + W[6 + 4])
    torch.testing.assert_close(t.tokens[0, 2], W[3] + W[6 + 5])  # second slot: padding id
    assert t.valid is None  # the partial last group still holds a real id


def test_coordinates_are_absolute_and_batch_independent():
    tk = DiscreteTokenizer(dim=8, group=2, span=16)
    short = tk(["abcd"]).coords
    batched = tk(["abcd", "abcdefghij"]).coords
    torch.testing.assert_close(batched[:2], short)
    torch.testing.assert_close(short[:, 0], torch.tensor([2 * 1 / 16 - 1, 2 * 3 / 16 - 1]))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("group", [1, 3])
def test_padding_cannot_change_loss_or_logits(causal, group):
    m = _model(causal=causal, group=group)
    short, long_ = b"hello there", b"a much longer line of text here"
    alone = m([short]).loss
    ids, lengths = encode_batch([short, short])
    padded = m({"ids": torch.cat([ids, torch.randint(0, 256, (2, 30))], 1), "lengths": lengths})
    torch.testing.assert_close(padded.loss, alone)
    c = _model(head="mean", causal=causal, group=group)
    one = c([short]).logits
    ids, lengths = encode_batch([short, long_])
    ids[0, len(short) :] = 7  # garbage in the padding must not matter
    torch.testing.assert_close(c({"ids": ids, "lengths": lengths}).logits[:1], one)


def test_any_vocabulary_and_errors_name_the_problem():
    tk = DiscreteTokenizer(dim=8, vocab_size=4, group=3)  # e.g. DNA bases as 0..3
    out = tk(torch.randint(0, 4, (2, 10)))
    assert out.tokens.shape == (2, 4, 8) and tk.patches(torch.zeros(2, 10).long()).shape[-1] == 12
    with pytest.raises(ValueError, match=r"id 4 is outside the vocabulary \[0, 4\)"):
        tk(torch.tensor([[0, 1, 4]]))
    with pytest.raises(ValueError, match="integer ids"):
        tk(torch.randn(2, 3))
    with pytest.raises(ValueError, match="bytes vocabulary"):
        tk(["ACGT"])
    with pytest.raises(ValueError, match="raw="):
        DiscreteTokenizer(dim=8, raw="tfidf")


def test_raw_views():
    tk = DiscreteTokenizer(dim=8, vocab_size=6, group=2, raw="onehot")
    ids = {"ids": torch.tensor([[1, 5, 2]]), "lengths": torch.tensor([3])}
    p = tk.patches(ids)
    assert p.shape == (1, 2, 12)
    assert p[0, 0].nonzero().flatten().tolist() == [1, 6 + 5]
    assert p[0, 1].sum() == 1  # the padding slot is all zeros
    ng = DiscreteTokenizer(dim=8, vocab_size=6, group=3, raw="ngram", raw_dim=64)
    # 3 ids: three 1-grams, two 2-grams, one 3-gram
    assert ng.patches(torch.tensor([[1, 2, 3]])).sum() == 6
    f1 = DiscreteTokenizer(dim=8, group=2, raw="fixed", raw_dim=16)
    f2 = DiscreteTokenizer(dim=8, group=2, raw="fixed", raw_dim=16)
    torch.testing.assert_close(f1.patches(["abc"]), f2.patches(["abc"]))
    assert "raw_table" not in f1.state_dict()  # rebuilt from the seed, never a weight
    ema = DiscreteTokenizer(dim=8, raw="ema", ema_momentum=0.5)
    before = ema.patches(["ab"]).clone()
    with torch.no_grad():
        ema.embed.weight.add_(1.0)
    ema.eval()
    ema(["ab"])  # evaluation never moves the table
    torch.testing.assert_close(ema.patches(["ab"]), before)
    ema.train()
    ema(["ab"])  # one training pass: half way to the new weights
    torch.testing.assert_close(ema.patches(["ab"]), before + 0.5)
    assert "ema_table" in ema.state_dict()


@pytest.mark.parametrize("target", ["patch", "embedding", "layer"])
@pytest.mark.parametrize("raw", ["onehot", "ngram", "fixed", "ema"])
def test_every_target_trains(target, raw):
    mc = model_config("nepa_text_debug")
    mc.tokenizer_args = {"group": 2, "raw": raw, "raw_dim": 32}
    mc.objective.target = target
    m = NEPA(mc)
    loss = m(["some text", "more text here", ""]).loss
    loss.backward()
    assert torch.isfinite(loss) and m.tokenizer.embed.weight.grad is not None


# -------------------------------------------------------------------------------- readers
class _Endless(io.RawIOBase):
    """A stream of ``n`` bytes of 'a' then one newline and a short line, made on the fly."""

    def __init__(self, n: int):
        self.left, self.tail = n, b"\nnext line\n"

    def readable(self):
        return True

    def readinto(self, b):
        if self.left > 0:
            k = min(len(b), self.left)
            b[:k] = b"a" * k
            self.left -= k
            return k
        k = min(len(b), len(self.tail))
        b[:k], self.tail = self.tail[:k], self.tail[k:]
        return k


def test_a_2gb_line_is_skipped_in_bounded_memory():
    counter = BadSampleCounter()
    f = io.BufferedReader(_Endless(2 << 30), buffer_size=1 << 20)
    assert list(bounded_lines(f, 1 << 20, "stream", counter)) == [b"next line"]
    assert counter.snapshot()["skipped/too_large"] == 1


def _bad_folder(root: Path) -> None:
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "a" / "x.txt").write_bytes(b"good line one\n\n   \nbad \xff\xfe utf8\ngood two\n")
    (root / "a" / "long.txt").write_bytes(b"z" * 3000 + b"\nafter the long line\n")
    (root / "b" / "y.txt").write_text("bonjour le monde\nsalut\n", encoding="utf-8")
    (root / "b" / "blob.bin").write_bytes(b"\x00\x01\x02" * 100)


def test_folder_reader_counts_bad_input(tmp_path):
    _bad_folder(tmp_path)
    counter = BadSampleCounter()
    recs, classes = read_records(str(tmp_path), max_bytes=1000, counter=counter)
    assert classes == ["a", "b"]
    assert sorted(recs) == sorted([(b"good line one", 0), (b"good two", 0),
                                   (b"after the long line", 0), (b"bonjour le monde", 1),
                                   (b"salut", 1)])  # fmt: skip
    snap = counter.snapshot()
    assert (snap["skipped/empty"], snap["skipped/invalid_utf8"]) == (2, 1)
    assert (snap["skipped/too_large"], snap["skipped/binary"]) == (1, 1)


def test_jsonl_and_csv_records(tmp_path):
    j = tmp_path / "d.jsonl"
    j.write_text('{"text": "hello", "label": "en"}\n{"text": "hallo", "label": "de"}\n'
                 'not json\n{"label": "en"}\n{"ids": [1, 2, 3], "label": "de"}\n')  # fmt: skip
    counter = BadSampleCounter()
    recs, classes = read_records(str(j), counter=counter)
    assert classes == ["de", "en"] and recs == [(b"hello", 1), (b"hallo", 0), ([1, 2, 3], 0)]
    assert counter.snapshot()["skipped/corrupt"] == 2
    c = tmp_path / "d.csv"
    c.write_text('label,text\nen,"hello, world"\nde,hallo\n')
    recs, classes = read_records(str(c), classes=["en", "de"])
    assert recs == [(b"hello, world", 0), (b"hallo", 1)]
    with pytest.raises(ValueError, match="no column 'body'"):
        read_records(str(c), text_key="body")


def test_windows_for_pretraining_and_one_window_for_classification():
    recs = [(b"x" * 100, 0), (b"y" * 10, 1)]
    ds = TextRecords(recs, ["a", "b"], context=32, windows=True, min_len=8)
    assert [len(ds[i][0]) for i in range(len(ds))] == [32, 32, 32, 10]  # the 4-byte tail dropped
    ds = TextRecords(recs, ["a", "b"], context=32, windows=False, augment=True)
    assert len(ds) == 2 and len(ds[0][0]) == 32
    batch, y = pad_collate([ds[0], ds[1]])
    assert batch["ids"].shape == (2, 32) and batch["lengths"].tolist() == [32, 10]


def test_pack_text_round_trip_via_cli(tmp_path):
    _bad_folder(tmp_path / "src")
    out = tmp_path / "shards"
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    res = subprocess.run([sys.executable, "-m", "unipred.cli", "data", "pack-text",
                          str(tmp_path / "src"), str(out), "--shard-size", "2",
                          "--max-record-bytes", "1000"],
                         capture_output=True, text=True, env=env)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "packed 5 samples" in res.stdout
    meta = json.loads((out / "meta.json").read_text())
    assert meta["skipped"]["skipped/total"] == 5 and meta["num_shards"] == 3
    got = sorted((bytes(x.tolist()), y) for x, y in TextShards(str(out), 64, training=False))
    assert got == sorted([(b"good line one", 0), (b"good two", 0), (b"after the long line", 0),
                          (b"bonjour le monde", 1), (b"salut", 1)])  # fmt: skip


def test_fit_on_a_folder_with_bad_input_reports_it(tmp_path):
    """`unipred fit` on a folder holding every kind of bad input: a run, and a report."""
    _bad_folder(tmp_path / "data")
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    cmd = [sys.executable, "-m", "unipred.cli", "fit", "task=text_pretrain",
           f"data.root={tmp_path / 'data'}", "model.name=nepa_text_debug", "data.num_workers=0",
           "data.max_record_bytes=1000", "data.max_bad_fraction=1.0", "trainer.global_batch=2",
           "trainer.max_steps=2",
           "trainer.accelerator=cpu", "trainer.precision=32-true", f"run_dir={run}",
           "trainer.loggers=[]", "trainer.progress_bar=false",
           "data.max_bad_fraction=1"]  # fmt: skip
    # (5 of 9 records are bad, above the default 5 %: the run goes on and reports them)
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    report = json.loads((run / "data_report.json").read_text())["total"]
    assert report["skipped/invalid_utf8"] == 1 and report["skipped/binary"] == 1
    assert report["skipped/empty"] == 2 and report["skipped/too_large"] == 1


# ------------------------------------------------------------------ baseline and corpora
def test_char_ngram_naive_bayes_learns_generated_languages():
    train = [(x, y) for x, y in generated_records(3, 60, 0, "train")]
    test = [(torch.frombuffer(bytearray(x), dtype=torch.uint8).long(), y)
            for x, y in generated_records(3, 30, 0, "val")]  # fmt: skip
    assert char_ngram_nb(train, test) > 0.9
    shuffled = [(x, (y + i) % 3) for i, (x, y) in enumerate(train)]  # labels carry nothing
    assert char_ngram_nb(shuffled, test) < 0.6


def test_roff_text_strips_markup():
    assert roff_text(r".SH NAME") == ""
    assert roff_text(r"\fBls\fP \- Verzeichnisinhalte \fI\,auflisten\/\fP") == (
        "ls - Verzeichnisinhalte auflisten"
    )


@pytest.mark.skipif(not Path("/usr/share/dict/ngerman").is_file(), reason="word lists absent")
def test_wordlang_is_built_from_the_debian_word_lists(tmp_path):
    from unipred.tasks.text.corpora import WORDLISTS, build_wordlang

    out = build_wordlang(tmp_path / "wl", train=20, test=5)
    if not all((Path("/usr/share/dict") / f).is_file() for _, f in WORDLISTS.values()):
        pytest.skip("some word lists absent")
    recs, classes = read_records(str(out / "train"))
    test, _ = read_records(str(out / "test"), classes=classes)
    assert classes == sorted(WORDLISTS) and len(recs) == 20 * len(WORDLISTS)
    assert not {x for x, _ in recs} & {x for x, _ in test}


def test_a_corpus_whose_packages_are_missing_stops_fit_with_one_line(tmp_path, monkeypatch, capsys):
    """`unipred fit text/pretrain data.corpus=manlang` without the translated man pages: one
    line naming the packages to install (exit 2), not a traceback from the corpus builder."""
    from unipred.tasks.text import corpora

    from unipred.cli import main

    monkeypatch.setitem(corpora.MANPAGES, "xx", "manpages-not-a-package")
    rc = main(["fit", "text/pretrain", "data.corpus=manlang", f"data.cache_dir={tmp_path / 'c'}",
               f"run_dir={tmp_path / 'run'}", "trainer.max_steps=1"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err[-20:]
    assert err[0].startswith("unipred fit: error: the translated man pages are not installed")
    assert "manpages-not-a-package" in err[0] and "UNIPRED_DEBUG=1" in err[0]


def test_text_demo_quick_plan_writes_the_table(tmp_path):
    from unipred.tasks.text import demo

    assert demo.main(["--quick", "--corpus", "generated", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "results.md").read_text()
    for _, label in demo.ROWS:
        row = next(line for line in table.splitlines() if line.startswith(f"| {label} |"))
        assert row.count("%") == 1, row
    assert "generated stand-in" in table
    assert json.loads((tmp_path / "results.json").read_text())["accuracy_pct"]["3"]["ft_nepa"] >= 0


@pytest.mark.parametrize("name", ["pretrain", "finetune", "probe"])
def test_text_recipes_load_and_name_a_text_model(name):
    from unipred.train.config import build_model_config, load_config, packaged_configs

    cfg = load_config(packaged_configs() / "text" / f"{name}.yaml", ["data.corpus=''"])
    assert cfg.task.startswith("text_")
    assert build_model_config(cfg.model).tokenizer == "text"


def test_a_root_given_to_a_text_recipe_replaces_its_corpus(tmp_path):
    """docs/first-hour.md adds data.root / data.val_root to the text recipes, whose base sets
    data.corpus=wordlang: the user's folders are read (not wordlang, and no "pick one" error)."""
    from unipred.tasks.text.tasks import uses_corpus

    from unipred.base.registry import TASKS
    from unipred.train.config import load_config, packaged_configs

    for split, words in (("train", ["alpha", "beta", "gamma"]), ("val", ["delta", "eps"])):
        for lang in ("xx", "yy", "zz"):
            d = tmp_path / split / lang
            d.mkdir(parents=True)
            (d / "w.txt").write_text("\n".join(f"{lang}{w}" for w in words) + "\n")
    over = [f"data.root={tmp_path / 'train'}", f"data.val_root={tmp_path / 'val'}"]
    cfg = load_config(packaged_configs() / "text" / "probe.yaml", over)
    assert cfg.data.corpus == "wordlang" and not uses_corpus(cfg.data)
    task = TASKS.get(cfg.task)(cfg)
    assert task.num_classes() == 3  # the folders' classes, not wordlang's 8
    assert len(task.feature_dataset("val")[0]) == 6
    plain = load_config(packaged_configs() / "text" / "probe.yaml", [])
    assert uses_corpus(plain.data)  # no root: the recipe's corpus


def test_a_text_task_on_image_model_is_one_line():
    from unipred.train.config import load_config, packaged_configs

    with pytest.raises(Exception, match="uses the 'image' tokenizer"):
        load_config(packaged_configs() / "text" / "probe.yaml", ["model.name=nepa_debug",
                                                                 "model.tokenizer=null"])  # fmt: skip


def test_eval_on_text_prints_the_ngram_and_raw_input_rows(tmp_path):
    """`unipred eval` on text: the backbone's row, then random init, raw one-hot input and
    the character n-gram naive Bayes (the source's own baseline)."""
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    cmd = [sys.executable, "-m", "unipred.cli", "eval", "text/probe", "protocol=knn",
           "ckpt=random", "data.corpus=''", "data.generated_per_class=30",
           "data.generated_val_per_class=10", "data.labels_per_class=5", "data.num_workers=0",
           "model.name=nepa_text_debug", f"run_dir={tmp_path}"]  # fmt: skip
    # the recipe appends every block below the top one: block 0 of the 2-block debug size
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    out = res.stdout + res.stderr
    assert "final norm + blocks [0], mean pooling" in out, out[-3000:]
    assert "char_ngram_nb" in out and "raw" in out, out[-3000:]
