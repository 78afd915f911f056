"""Which read-out of a frozen backbone: every pooling beside the random-init backbone and the
raw input, per label budget and seed, from one feature pass per weight set.

    python benchmarks/readouts.py CONFIG CKPT [key=value ...] [--labels 10,20] [--seeds 0,1,2]
                                  [--grids 1,2,3,5] [--out FILE.json]

CONFIG is a classification recipe (e.g. small/probe) and the overrides point it at the data
(``data.root=DIR/train data.val_root=DIR/val``). For every budget K and seed S
(``data.labels_per_class=K data.subset_seed=S``, probe seed S) it extracts the final-norm
tokens of CKPT and of the config's random-init model (``ckpt=random``, the config's ``seed``,
as ``unipred compare``) once,
then runs the k-NN and the linear probe of ``unipred eval`` on each read-out: ``features.pool=
grid`` with ``features.grid=G`` for each G of --grids (G = 1 is the mean pooling) through the
shipped ``unipred.protocols.features.grid_pool``, and the k-NN also on features standardised
with the training features' mean and std. The raw-input rows are the baseline of
``unipred eval`` (the tokenizer's flattened patches). Prints one markdown table, mean over the
seeds (min-max). ``unipred eval`` / ``unipred compare`` with ``features.pool=grid
features.grid=G`` give the same figures one read-out at a time.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from unipred.base.registry import TASKS
from unipred.protocols.baselines import raw_features
from unipred.protocols.features import (
    Features,
    extract_features,
    grid_pool,
    load_backbone_weights,
    weight_sets,
)
from unipred.protocols.knn import run_knn
from unipred.protocols.linear import run_linear
from unipred.protocols.settings import FeatureSettings, KNNSettings, ProbeSettings
from unipred.protocols.suite import _loader
from unipred.train.config import load_config


def _standardise(tr: torch.Tensor, va: torch.Tensor):
    m, s = tr.mean(0), tr.std(0).clamp_min(1e-6)
    return (tr - m) / s, (va - m) / s


def _coords(model, task, loader):
    x = task.inputs(next(iter(loader)))
    with torch.no_grad():
        return model.tokenizer(x).coords


def _scores(tr: Features, va: Features, C: int, seed: int, linear: bool = True) -> dict:
    out = {"knn": run_knn(tr, va, C, KNNSettings())["top1"]}
    a, b = _standardise(tr.pooled, va.pooled)
    out["knn_std"] = run_knn(Features(a, tr.labels), Features(b, va.labels), C, KNNSettings())[
        "top1"
    ]
    if linear:
        out["linear"] = run_linear(tr, va, C, ProbeSettings(), seed)["top1"]
    return out


def one(config: str, ckpt: str, overrides: list[str], k: int, seed: int, grids) -> dict:
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
        f = {s: extract_features(model, _loader(task, s, fs, 0), inputs=task.inputs, tokens=True)
             for s in ("train", "val")}  # fmt: skip
        coords = _coords(model, task, _loader(task, "train", fs, 0))
        C = int(max(f["train"].labels.max(), f["val"].labels.max())) + 1
        for g in grids:
            pooled = {s: grid_pool(f[s].tokens.float(), 0, f[s].valid, coords, g) for s in f}
            tr, va = (Features(pooled[s], f[s].labels) for s in ("train", "val"))
            label = "mean" if g == 1 else f"grid {g}"
            rows[f"{name}: {label} ({tr.pooled.shape[1]} values)"] = _scores(tr, va, C, seed)
    tr, va = (raw_features(model.tokenizer, _loader(task, s, fs, 0), task.inputs)
              for s in ("train", "val"))  # fmt: skip
    rows[f"raw input: flattened patches ({tr.pooled.shape[1]} values)"] = _scores(tr, va, C, seed)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/readouts.py", description=__doc__.split("\n")[0])
    p.add_argument("config")
    p.add_argument("ckpt")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--labels", default="10,20")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--grids", default="1,2,3,5")
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    grids = [int(g) for g in a.grids.split(",")]
    table, cols = {}, ("knn", "knn_std", "linear")
    for k in (int(v) for v in a.labels.split(",")):
        for seed in (int(v) for v in a.seeds.split(",")):
            for row, sc in one(a.config, a.ckpt, a.overrides, k, seed, grids).items():
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
