"""The baselines every evaluation of a backbone prints beside it, for any modality.

A frozen-feature number means little alone: on small data a random network or the raw input
often does as well. ``unipred eval protocol=...`` and ``unipred evaluate-suite`` therefore add,
unless ``baselines=false``:

* **random init**: the same protocols on the config's model at its random init (``ckpt=random``,
  seeded by the run's ``seed``); for ``protocol=finetune`` the same recipe from scratch.
* **raw input** (weights ``input``): k-NN and the linear probe on the tokenizer's raw patches
  (``patches(x)``, the view ``model.objective.target=patch`` predicts: pixels, log-mel
  patches, voxels, waveform frames) read out exactly as the backbone's tokens are: the same
  ``features.pool`` (``grid`` / ``mean`` / ``last``; ``cls``, which raw patches lack, reads
  their mean) over the tokenizer's own coordinates and real-token mask, after the same
  ``features.norm``. Above ``raw.max_dim`` values per sample each cell is averaged down
  (``adaptive_avg_pool1d``). A fair baseline: the backbone is compared with its own input
  seen through its own read-out.
* **raw input, flattened** (weights ``input_flat``, ``raw.flat=false`` drops it): the patches
  flattened position by position, zero-padded to the longest sample, each patch averaged down
  to ``max_dim // tokens`` values when needed (so a 224 px image fits in memory). It keeps
  where each pixel is, which suits aligned images and suits badly inputs whose content moves
  (a word starting at any time of a clip).
* **the data source's own**: ``DataSource.baseline_scores(train, test)`` (default none), e.g. a
  character n-gram classifier for text; each name becomes one row.

Nothing here knows a modality: the tokenizer and the data source supply the views.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch
import torch.nn.functional as F

from unipred.protocols.features import Features, _labels, _to, grid_pool, normalise_tokens
from unipred.protocols.knn import run_knn
from unipred.protocols.linear import run_linear
from unipred.protocols.report import format_row
from unipred.protocols.settings import RANDOM, EvalSettings, ProtocolError, pool_parts
from unipred.protocols.suite import _loader, _num_classes, apply_threads, demo_settings

INPUT = "input"  # the weights column of the raw-input rows (the backbone's read-out)
INPUT_FLAT = "input_flat"  # ... of the flattened raw patches
SOURCE = "data"  # ... of the data source's own baselines
RAW_PROTOCOLS = ("knn", "linear")


def raw_patches(tokenizer, x) -> torch.Tensor:
    """The tokenizer's raw patch view (B, N, P) of a batch; ProtocolError naming the tokenizer
    when it has none (``patches(x)`` is optional in the Tokenizer contract)."""
    if not callable(getattr(tokenizer, "patches", None)):
        raise ProtocolError(
            f"tokenizer {type(tokenizer).__name__} has no patches(x): no raw-input baseline "
            "(implement patches(x) -> (B, N, P), see docs/adding-a-modality.md)"
        )
    return tokenizer.patches(x)


def flatten_patches(p: torch.Tensor, max_dim: int) -> torch.Tensor:
    """(B, N, P) -> (B, N * P'), P' = P, or ``max(1, max_dim // N)`` when N * P > max_dim (each
    patch averaged down to P' values)."""
    B, N, P = p.shape
    p = p.float()
    if max_dim and N * P > max_dim:
        keep = max(1, max_dim // N)
        p = F.adaptive_avg_pool1d(p.reshape(B * N, 1, P), keep).reshape(B, N, keep)
    return p.reshape(B, -1)


@torch.no_grad()
def raw_chunks(tokenizer, batches, inputs, max_samples: int = 0, views: list | None = None):
    """One pass: the raw patches (B, N_i, P) of every batch and the labels; with a list
    ``views``, each batch's (real-token mask (B, N_i) or None, coordinates) is appended to it
    (the tokenizer's own forward gives them, as the backbone's read-out sees them)."""
    tokenizer.eval()
    rows, labels, n = [], [], 0
    for batch in batches:
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            raise ProtocolError("the data carry no labels: give a classification config")
        x = _to(inputs(batch), "cpu")
        p = raw_patches(tokenizer, x)
        if views is not None:
            t = tokenizer(x)
            if t.coords.shape[-2] != p.shape[1]:
                raise ProtocolError(
                    f"tokenizer {type(tokenizer).__name__}: patches(x) gives {p.shape[1]} "
                    f"patches but its forward {t.coords.shape[-2]} token coordinates"
                )
            views.append((t.valid, t.coords))
        rows.append(p.float())
        labels.append(_labels(batch[1]))
        n += p.shape[0]
        if max_samples and n >= max_samples:
            break
    if not rows:
        raise ProtocolError("the data set yielded no batches")
    return rows, torch.cat(labels)


def pooled_chunks(rows, views, labels, pool: str, cells: int, norm: str, max_dim: int,
                  max_samples: int = 0) -> Features:  # fmt: skip
    """Raw-input features through a backbone read-out: each batch's patches standardised per
    sample (``norm``), then pooled (``grid`` with ``cells`` bins per axis of the tokenizer's
    coordinates, ``mean``, ``last``; anything else reads the mean; several joined by '+'
    concatenated, as the backbone's rows), each sample's own real tokens only; cells averaged
    down when the result exceeds ``max_dim`` values."""
    out = []
    for p, (valid, coords) in zip(rows, views):
        v = None if valid is None else valid.to(p.device).bool()
        p = normalise_tokens(p, v, norm)
        fs = []
        for part in pool_parts(pool):  # mean+last: the mean patch, then the last one
            if part == "last":
                fs.append(pool_tokens_last(p, v)[:, None])
            else:
                f = grid_pool(p, 0, v, coords, cells if part == "grid" else 1)
                fs.append(f.reshape(p.shape[0], -1, p.shape[2]))
        out.append(flatten_patches(torch.cat(fs, 1), max_dim))
    x = torch.cat(out)
    if max_samples:
        x, labels = x[:max_samples], labels[:max_samples]
    return Features(x, labels)


def pool_tokens_last(p: torch.Tensor, valid) -> torch.Tensor:
    """(B, N, P) -> (B, P): each sample's last real patch."""
    from unipred.nn.heads import pool_tokens

    return pool_tokens(p, 0, valid, "last")


def flatten_chunks(rows, labels, tokens: int, max_dim: int, max_samples: int = 0) -> Features:
    """Raw-input features: every sample padded with zeros (or cut) to ``tokens`` patches, so
    that train and val flatten to the same length, then ``flatten_patches``."""
    rows = [F.pad(r, (0, 0, 0, tokens - r.shape[1])) if r.shape[1] < tokens else r[:, :tokens]
            for r in rows]  # fmt: skip
    x = torch.cat([flatten_patches(r, max_dim) for r in rows])
    if max_samples:
        x, labels = x[:max_samples], labels[:max_samples]
    return Features(x, labels)


def raw_features(tokenizer, batches, inputs, max_dim: int = 4096, max_samples: int = 0,
                 tokens: int = 0) -> Features:  # fmt: skip
    """Features of the raw input of one split: flattened patches (fp32) and labels; ``tokens``
    fixes the patch count (0 = the split's longest sample)."""
    rows, labels = raw_chunks(tokenizer, batches, inputs, max_samples)
    n = tokens or max(r.shape[1] for r in rows)
    return flatten_chunks(rows, labels, n, max_dim, max_samples)


def _task_and_model(cfg):
    from unipred.base.registry import TASKS

    task = TASKS.get(cfg.task)(cfg)
    torch.manual_seed(cfg.seed)
    return task, task.build_model()


def raw_eval(config, overrides: list[str], settings=(), log=print,
             recipe_defaults: bool = False) -> list[dict]:  # fmt: skip
    """The raw-input rows (k-NN and linear probe on the tokenizer's flattened patches) of
    ``config`` with ``overrides``, the settings read as ``frozen_eval`` reads them: the demos'
    third column beside the backbone and its random init."""
    from unipred.train.config import load_config

    cfg = load_config(config, [*overrides, f"ckpt={RANDOM}"])
    return run_raw(cfg, demo_settings(cfg, settings, recipe_defaults), log)


def run_raw(cfg, settings: EvalSettings, log=print) -> list[dict]:
    """k-NN and linear probe on the raw patches of ``cfg``'s data (the label budget applied):
    through the backbone rows' read-out (``input``) and flattened (``input_flat``)."""
    apply_threads(cfg, log)
    task, model = _task_and_model(cfg)
    fs = settings.features
    workers = int(getattr(cfg.data, "num_workers", 0))
    t0 = time.perf_counter()
    chunks = {}
    for split, limit in (("train", fs.max_train), ("val", fs.max_val)):
        loader = _loader(task, split, fs, workers)
        views: list = []
        rows, y = raw_chunks(model.tokenizer, loader, task.inputs, limit, views)
        chunks[split] = (rows, views, y, limit)
    tok = type(model.tokenizer).__name__
    how = " + ".join({"grid": f"grid {fs.grid} per axis", "last": "last patch"}.get(p, "mean")
                     for p in pool_parts(fs.pool))  # fmt: skip
    how += f", standardised per {fs.norm}" if fs.norm != "none" else ""
    feats = {INPUT: [pooled_chunks(rows, views, y, fs.pool, fs.grid, fs.norm,
                                   settings.raw.max_dim, lim)
                     for rows, views, y, lim in (chunks["train"], chunks["val"])]}  # fmt: skip
    if settings.raw.flat:
        # one patch count for both splits (variable-length samples: the longest of either)
        n = max(r.shape[1] for rows, _, _, _ in chunks.values() for r in rows)
        feats[INPUT_FLAT] = [flatten_chunks(rows, y, n, settings.raw.max_dim, lim)
                             for rows, _, y, lim in (chunks["train"], chunks["val"])]  # fmt: skip
    tr, va = feats[INPUT]
    C = _num_classes(task, tr.labels, va.labels)
    log(f"[{INPUT}] raw patches of {tok} ({how}): {len(tr.labels)} train / {len(va.labels)} "
        f"val samples, {tr.pooled.shape[1]} values each; [{INPUT_FLAT}] flattened: "
        + (f"{feats[INPUT_FLAT][0].pooled.shape[1]} values" if INPUT_FLAT in feats else "off")
        + f"; {time.perf_counter() - t0:.1f} s")  # fmt: skip
    out = []
    for weights, (tr, va) in feats.items():
        for proto in RAW_PROTOCOLS:
            t0 = time.perf_counter()
            if proto == "knn":
                r = run_knn(tr, va, C, settings.knn)
            else:
                r = run_linear(tr, va, C, settings.linear, settings.seed)
            out.append({"protocol": proto, "weights": weights, **r, "dim": tr.pooled.shape[1],
                        "seconds": round(time.perf_counter() - t0, 2)})  # fmt: skip
            log(format_row(out[-1]))
    return out


def _items(ds, limit: int) -> list[tuple]:
    out = []
    for i in range(len(ds)):
        if limit and len(out) >= limit:
            break
        item = ds[i]
        out.append((item[0], int(torch.as_tensor(item[1]).reshape(-1)[0])))
    return out


def has_source_baselines(task) -> bool:
    from unipred.task import DataSource

    src = getattr(task, "source", None)
    return src is not None and type(src).baseline_scores is not DataSource.baseline_scores


def run_source(cfg, settings: EvalSettings, log=print) -> list[dict]:
    """The data source's ``baseline_scores`` on the protocols' train (label budget) and val
    items; one row per name. Nothing is read when the source has none."""
    from unipred.base.registry import TASKS

    task = TASKS.get(cfg.task)(cfg)
    if not has_source_baselines(task):
        return []
    t0 = time.perf_counter()
    train, _ = task.feature_dataset("train")
    val, _ = task.feature_dataset("val")
    if train is None or val is None or not hasattr(train, "__len__"):
        log("[data] the source's baselines need map-style train and val splits: skipped")
        return []
    fs = settings.features
    scores = task.source.baseline_scores(_items(train, fs.max_train), _items(val, fs.max_val))
    sec = round(time.perf_counter() - t0, 2)
    rows = []
    for name, acc in scores.items():
        acc = float(acc)
        if not 0.0 <= acc <= 1.0 or math.isnan(acc):
            raise ProtocolError(f"baseline_scores()[{name!r}] = {acc}: give a fraction in [0, 1]")
        rows.append({"protocol": str(name), "weights": SOURCE, "top1": acc, "top5": None,
                     "seconds": sec})  # fmt: skip
        log(format_row(rows[-1]))
    return rows


def run_random(cfg, settings: EvalSettings, protocols, log=print) -> list[dict]:
    """The requested frozen protocols on the config's model at its random init."""
    from unipred.protocols.suite import run_protocols

    s = dataclasses.replace(settings, ema="false")
    return run_protocols(dataclasses.replace(cfg, ckpt=RANDOM), s, protocols, log)["rows"]


def baseline_rows(cfg, settings: EvalSettings, protocols, log=print) -> list[dict]:
    """Every baseline for ``protocols`` (frozen names and/or "finetune"): random init (scratch
    for fine-tuning; skipped when ``cfg.ckpt`` is already random), raw input, the source's."""
    if not settings.baselines:
        return []
    log("baselines (baselines=false skips them):")
    rows = []
    frozen = [p for p in protocols if p != "finetune"]
    if cfg.ckpt != RANDOM:
        if frozen:
            rows += run_random(cfg, settings, frozen, log)
        if "finetune" in protocols:
            from unipred.protocols.suite import run_finetune

            s = dataclasses.replace(settings, ema="false")
            rows += run_finetune(dataclasses.replace(cfg, ckpt=RANDOM), s, log)["rows"]
    try:
        rows += run_raw(cfg, settings, log)
    except ProtocolError as e:
        if "patches(x)" not in str(e):
            raise
        log(f"[{INPUT}] {e}")
    rows += run_source(cfg, settings, log)
    return rows


def run_with_baselines(cfg, settings: EvalSettings, protocols, log=print) -> dict:
    """``run_protocols`` (or ``run_finetune``) on ``cfg.ckpt``, then the baselines' rows."""
    from unipred.protocols.suite import run_finetune, run_protocols

    protocols = list(protocols)
    frozen = [p for p in protocols if p != "finetune"]
    out = run_protocols(cfg, settings, frozen, log) if frozen else {"rows": [], "meta": {}}
    if "finetune" in protocols:
        out["rows"] += run_finetune(cfg, settings, log)["rows"]
    out["rows"] += baseline_rows(cfg, settings, protocols, log)
    return out
