"""Which read-out of a frozen backbone: every pooling beside the random-init backbone and the
raw input, per label budget and seed, from one feature pass per weight set.

    python benchmarks/readouts.py CONFIG CKPT [key=value ...] [--labels 10,20] [--seeds 0,1,2]
                                  [--grids 1,2,3,5] [--block I] [--norms none,sample,feature]
                                  [--out FILE.json]

CONFIG is a classification recipe (e.g. small/probe, audio/digits_linprobe,
video/demo_classify) and the overrides point it at the data (``data.root=DIR/train
data.val_root=DIR/val``). For every budget K and seed S (``data.labels_per_class=K
data.subset_seed=S``, probe seed S) it extracts the final-norm tokens (``--block I``: block I's
output) of CKPT and of the config's random-init model (``ckpt=random``, the config's ``seed``,
as ``unipred compare``), with each sample's own token coordinates, so variable-length inputs
(audio clips) work; the validation features once per run. Then it runs the k-NN and the linear
probe of ``unipred eval`` on each read-out: ``features.pool=grid`` with ``features.grid=G`` for
each G of --grids (G = 1 is the mean pooling) through the shipped
``unipred.protocols.features.grid_pool``, the last token and the cls token (not on a causal
backbone, whose cls token sees only itself), and the k-NN also
on features standardised with the training features' mean and std. The raw-input rows are the
baseline of ``unipred eval`` (the tokenizer's flattened patches) and the same raw patches
through each grid read-out. ``--norms`` repeats every read-out after the per-sample
standardisation of ``features.norm`` (``unipred.protocols.features.normalise_tokens``: ``sample``
one mean and std per sample, ``feature`` each feature's per sample, i.e. cepstral mean/variance
normalisation on log-mel patches; the mean read-out is skipped there, it is zero), the same for
the backbone, the random-init and the raw rows. Prints one markdown table, mean over the seeds
(min-max).
``unipred eval`` / ``unipred compare`` with ``features.pool=grid features.grid=G`` give the
backbone's figures one read-out at a time.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from unipred.base.registry import TASKS
from unipred.nn.heads import pool_tokens
from unipred.protocols.baselines import flatten_chunks, raw_chunks, raw_patches
from unipred.protocols.features import (
    Features,
    cls_unusable,
    grid_pool,
    load_backbone_weights,
    normalise_tokens,
    weight_sets,
)
from unipred.protocols.knn import run_knn
from unipred.protocols.linear import run_linear
from unipred.protocols.settings import FeatureSettings, KNNSettings, ProbeSettings, RawSettings
from unipred.protocols.suite import _loader
from unipred.train.config import load_config


def _standardise(tr: torch.Tensor, va: torch.Tensor):
    m, s = tr.mean(0), tr.std(0).clamp_min(1e-6)
    return (tr - m) / s, (va - m) / s


def _pad(chunks: list[torch.Tensor], value=0) -> torch.Tensor:
    """(B_i, T_i, ...) chunks -> one (sum B_i, max T_i, ...) tensor, padded with ``value``."""
    T = max(c.shape[1] for c in chunks)
    return torch.cat([torch.cat([c, c.new_full((c.shape[0], T - c.shape[1], *c.shape[2:]),
                                               value)], 1) for c in chunks])  # fmt: skip


@torch.no_grad()
def _tokens(model, loader, inputs, block: int | None):
    """Every sample's patch tokens (final norm, or block ``block``'s output), the prefix tokens,
    the real-token mask and each token's coordinates, padded to the longest sample: per-sample
    coordinates, so variable-length inputs (audio clips, text) bin by their own length."""
    model.eval()
    n_prefix = int(getattr(model, "n_prefix", 0))
    want = () if block is None else (block % len(model.predictor.blocks),)
    toks, pre, valid, coords, labels = [], [], [], [], []
    for batch in loader:
        out = model.forward_features(inputs(batch), layers=want)
        h = (out.hidden if block is None else out.layers[0]).float()
        B, N = h.shape[0], h.shape[1] - n_prefix
        toks.append(h[:, n_prefix:])
        pre.append(h[:, :n_prefix])
        v = out.valid
        valid.append(torch.ones(B, N, dtype=torch.bool) if v is None else v[:, n_prefix:].bool())
        c = out.coords.float()
        coords.append(c.expand(B, *c.shape[-2:]) if c.dim() == 2 else c)
        labels.append(torch.as_tensor(batch[1]).long().reshape(-1))
    return (_pad(toks), torch.cat(pre), _pad(valid, False), _pad(coords), torch.cat(labels))


@torch.no_grad()
def _raw(model, loader, inputs):
    """The tokenizer's raw patches (the raw-input baseline's view), its real-token mask and
    coordinates, padded to the longest sample, and the labels."""
    model.tokenizer.eval()
    rows, valid, coords, labels = [], [], [], []
    for batch in loader:
        x = inputs(batch)
        p, t = raw_patches(model.tokenizer, x).float(), model.tokenizer(x)
        B, N = p.shape[:2]
        rows.append(p)
        valid.append(torch.ones(B, N, dtype=torch.bool) if t.valid is None else t.valid.bool())
        c = t.coords.float()
        coords.append(c.expand(B, *c.shape[-2:]) if c.dim() == 2 else c)
        labels.append(torch.as_tensor(batch[1]).long().reshape(-1))
    return _pad(rows), _pad(valid, False), _pad(coords), torch.cat(labels)


def _pools(toks, pre, valid, coords, grids, norms=("none",), use_cls=True) -> dict:
    """{read-out name: (N, F) features} of one weight set, per norm of ``norms``."""
    out = {}
    for norm in norms:
        t = normalise_tokens(toks, valid, norm)
        tag = "" if norm == "none" else f", norm {norm}"
        for g in grids:
            if g == 1 and norm == "feature":
                continue  # zero: each feature's own mean was removed
            out[("mean" if g == 1 else f"grid {g}") + tag] = grid_pool(t, 0, valid, coords, g)
        out["last" + tag] = pool_tokens(t, 0, valid, "last")
    if pre.shape[1] and use_cls:  # a causal backbone's cls token is the same for every input
        out["cls"] = pre[:, 0]
    return out


def _scores(tr: Features, va: Features, C: int, seed: int, lr_grid=()) -> dict:
    """k-NN, standardised k-NN and the linear probe (its lr by CV on ``tr`` when ``lr_grid``)."""
    out = {"knn": run_knn(tr, va, C, KNNSettings())["top1"]}
    a, b = _standardise(tr.pooled, va.pooled)
    out["knn_std"] = run_knn(Features(a, tr.labels), Features(b, va.labels), C, KNNSettings())[
        "top1"
    ]
    out["linear"] = run_linear(tr, va, C, ProbeSettings(lr_grid=list(lr_grid)), seed)["top1"]
    return out


_VAL: dict = {}


def _once(key, split: str, fn, *args):
    """``fn(*args)``, kept for the validation split: it is the same for every label budget and
    seed of one run (the budget and seed pick training samples only)."""
    if split != "val":
        return fn(*args)
    if (key, split) not in _VAL:
        _VAL[key, split] = fn(*args)
    return _VAL[key, split]


def one(config: str, ckpt: str, overrides: list[str], k: int, seed: int, grids,
        block: int | None = None, norms=("none",), lr_grid=()) -> dict:  # fmt: skip
    """{row name: {knn, knn_std, linear}} for one budget and seed."""
    cfg = load_config(
        config,
        [*overrides, f"data.labels_per_class={k}", f"data.subset_seed={seed}"],
    )
    task = TASKS.get(cfg.task)(cfg)
    fs = FeatureSettings()
    rows = {}
    for name, path in (("NEPA", ckpt), ("random init", "random")):
        # the random-init baseline: the config's model at the config's seed, one network for
        # every S, as `unipred compare` (whose seed=S is the probe's)
        torch.manual_seed(cfg.seed)
        model = task.build_model()
        sets = weight_sets(path, "false")
        if sets[0][1] is not None:
            load_backbone_weights(model, sets[0][1], path)
        f = {s: _once((path, block), s, _tokens, model, _loader(task, s, fs, 0), task.inputs,
                      block) for s in ("train", "val")}  # fmt: skip
        pools = {s: _pools(*f[s][:4], grids, norms, cls_unusable(model) is None) for s in f}
        C = int(max(f["train"][4].max(), f["val"][4].max())) + 1
        for label in pools["train"]:
            tr, va = (Features(pools[s][label], f[s][4]) for s in ("train", "val"))
            rows[f"{name}: {label} ({tr.pooled.shape[1]} values)"] = _scores(
                tr, va, C, seed, lr_grid
            )
    # one patch count for both splits: variable-length samples pad to the longest of either
    chunks = {s: _once("chunks", s, raw_chunks, model.tokenizer, _loader(task, s, fs, 0),
                       task.inputs) for s in ("train", "val")}  # fmt: skip
    n = max(r.shape[1] for rows_, _ in chunks.values() for r in rows_)
    tr, va = (flatten_chunks(*chunks[s], n, RawSettings().max_dim, 0) for s in ("train", "val"))
    # no value count in the name: the longest clip of a labelled subset sets it, and one row
    # per count would split the seeds of a budget into several rows
    rows["raw input: flattened patches (the eval's input_flat)"] = _scores(tr, va, C, seed, lr_grid)
    # the raw patches through the same read-outs: flattened position by position, clips whose
    # words start at different times are hardly comparable; per-sample cells are
    raw = {s: _once("raw", s, _raw, model, _loader(task, s, fs, 0), task.inputs)
           for s in ("train", "val")}  # fmt: skip
    pools = {s: _pools(r[0], r[0][:, :0], r[1], r[2], grids, norms) for s, r in raw.items()}
    for label in pools["train"]:
        tr, va = (Features(pools[s][label], raw[s][3]) for s in ("train", "val"))
        rows[f"raw input: patches, {label} ({tr.pooled.shape[1]} values)"] = _scores(
            tr, va, C, seed, lr_grid
        )
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/readouts.py", description=__doc__.split("\n")[0])
    p.add_argument("config")
    p.add_argument("ckpt")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--labels", default="10,20")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--grids", default="1,2,3,5")
    p.add_argument(
        "--block",
        type=int,
        default=None,
        help="read block BLOCK's output (negative: from the top) instead of the final norm",
    )
    p.add_argument("--norms", default="none", help="features.norm values, e.g. none,feature")
    p.add_argument(
        "--lr-grid",
        default="",
        help="e.g. 3e-4,1e-3,3e-3,1e-2: the linear probe's lr per row by 5-fold CV on the "
        "training labels (unipred eval's linear.lr_grid); default: the fixed linear.lr",
    )
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    lr_grid = [float(v) for v in a.lr_grid.split(",") if v]
    torch.set_num_threads(1)
    grids = [int(g) for g in a.grids.split(",")]
    table, cols = {}, ("knn", "knn_std", "linear")
    for k in (int(v) for v in a.labels.split(",")):
        for seed in (int(v) for v in a.seeds.split(",")):
            rows = one(a.config, a.ckpt, a.overrides, k, seed, grids, a.block,
                       a.norms.split(","), lr_grid)  # fmt: skip
            for row, sc in rows.items():
                for c in cols:
                    table.setdefault((k, row), {}).setdefault(c, []).append(100 * sc[c])
            print(f"labels {k} seed {seed}: done", file=sys.stderr, flush=True)
    lines = ["| labels per class | read-out | k-NN | k-NN, standardised | linear |",
             "|---:|---|---:|---:|---:|"]  # fmt: skip
    for (k, row), sc in table.items():
        cells = [f"{sum(v) / len(v):.1f} % ({min(v):.1f}-{max(v):.1f})" for v in
                 (sc[c] for c in cols)]  # fmt: skip
        lines.append(f"| {k} | {row} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    if a.out:
        with open(a.out, "w") as f:
            json.dump({f"{k}|{row}": sc for (k, row), sc in table.items()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
