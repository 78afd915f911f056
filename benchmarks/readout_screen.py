"""Screens of the frozen read-out beyond ``benchmarks/readouts.py``, each applied identically to
the NEPA checkpoint(s), the random-init backbone and (where it applies) the raw input.

    python benchmarks/readout_screen.py blocks CKPT DATA [--labels 10,20] [--seeds 0,1,2]
    python benchmarks/readout_screen.py probe DATA NAME=CKPT [NAME=CKPT ...] [--labels ...]
                                        [--seeds ...] [--cache DIR]

DATA holds DATA/train and DATA/val (class sub-folders); the recipe is ``small/probe`` with
``data.num_workers=0 trainer.threads=1`` (and ``data.aug.img_size=20`` when DATA's name says
fmnist, as the tuning runs). Seed S: ``data.labels_per_class=K data.subset_seed=S``, probe seed
S, the random network at the config's seed (as ``unipred compare``).

``blocks``: every block's output (before the final norm) read as a 3 x 3 grid, the final norm's
grid 3 and mean, grid 3 + mean, and concatenations of standardised blocks (index 4 = the final
norm), each with the shipped k-NN and linear probe, on raw and on standardised features.
``probe``: the linear probe's learning rate, weight decay and epochs, on the final norm's and
block 2's grid 3 and on the raw input, from one cached feature pass per budget and seed.
Prints one markdown table, mean over the seeds (min-max). ``unipred eval small/probe
protocol=linear features.block=2 linear.lr=1e-3 ...`` gives one row at a time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from unipred.base.registry import TASKS
from unipred.protocols.baselines import raw_features
from unipred.protocols.features import (
    Features,
    extract_features,
    load_backbone_weights,
    weight_sets,
)
from unipred.protocols.knn import run_knn
from unipred.protocols.linear import run_linear
from unipred.protocols.settings import FeatureSettings, KNNSettings, ProbeSettings
from unipred.protocols.suite import _loader
from unipred.train.config import load_config

# the linear-probe settings of `probe` (the first is the protocol's default)
PROBE_SETTINGS = [
    ("lr 1e-2, wd 0, 100 epochs (default)", ProbeSettings()),
    ("lr 1e-3", ProbeSettings(lr=1e-3)),
    ("lr 1e-1", ProbeSettings(lr=1e-1)),
    ("wd 0.05", ProbeSettings(weight_decay=0.05)),
    ("wd 0.5", ProbeSettings(weight_decay=0.5)),
    ("wd 5", ProbeSettings(weight_decay=5.0)),
    ("300 epochs", ProbeSettings(epochs=300)),
    ("30 epochs", ProbeSettings(epochs=30)),
]


def _std(tr: torch.Tensor, va: torch.Tensor):
    m, s = tr.mean(0), tr.std(0).clamp_min(1e-6)
    return (tr - m) / s, (va - m) / s


def _task(data: str, k: int, seed: int):
    ov = [f"data.root={data}/train", f"data.val_root={data}/val", "data.num_workers=0",
          "trainer.threads=1", f"data.labels_per_class={k}", f"data.subset_seed={seed}"]  # fmt: skip
    if "fmnist" in data:
        ov.append("data.aug.img_size=20")
    cfg = load_config("small/probe", ov)
    return cfg, TASKS.get(cfg.task)(cfg)


def _model(cfg, task, path: str):
    torch.manual_seed(cfg.seed)
    model = task.build_model()
    sets = weight_sets(path, "false")
    if sets[0][1] is not None:
        load_backbone_weights(model, sets[0][1], path)
    return model


def _feats(task, model, pool: str) -> dict:
    """{split: Features} with ``layers``: (blocks + 1, N, D), every block, then the final norm."""
    fs = FeatureSettings()
    return {s: extract_features(model, _loader(task, s, fs, 0), inputs=task.inputs, pool=pool,
                                cells=3, layers=True) for s in ("train", "val")}  # fmt: skip


def _raw(task, model):
    fs = FeatureSettings()
    tr, va = (raw_features(model.tokenizer, _loader(task, s, fs, 0), task.inputs)
              for s in ("train", "val"))  # fmt: skip
    return tr.pooled, va.pooled, tr.labels, va.labels


def blocks_rows(ckpt: str, data: str, k: int, seed: int) -> dict:
    cfg, task = _task(data, k, seed)
    rows = {}
    for name, path in (("NEPA", ckpt), ("random", "random")):
        model = _model(cfg, task, path)
        g, m = _feats(task, model, "grid"), _feats(task, model, "mean")
        ya, yb = g["train"].labels, g["val"].labels
        G, Gv, M, Mv = g["train"].layers, g["val"].layers, m["train"].layers, m["val"].layers
        rows[f"{name}: final grid3"] = (G[-1], Gv[-1], ya, yb)
        rows[f"{name}: final mean"] = (M[-1], Mv[-1], ya, yb)
        for b in range(G.shape[0] - 1):
            rows[f"{name}: block{b} grid3"] = (G[b], Gv[b], ya, yb)
        rows[f"{name}: final grid3 + mean"] = (torch.cat([G[-1], M[-1]], 1),
                                               torch.cat([Gv[-1], Mv[-1]], 1), ya, yb)  # fmt: skip
        for combo in ((2, 4), (1, 2, 4), (1, 4), (0, 1, 2, 3, 4)):
            parts = [_std(G[i], Gv[i]) for i in combo]
            rows[f"{name}: std-cat blocks {combo} grid3"] = (
                torch.cat([p[0] for p in parts], 1),
                torch.cat([p[1] for p in parts], 1),
                ya,
                yb,
            )
    rows["raw input"] = _raw(task, model)
    out = {}
    for r, (a, b, ya, yb) in rows.items():
        sa, sb = _std(a, b)
        out[(r, a.shape[1])] = {
            "k-NN": run_knn(Features(a, ya), Features(b, yb), 10, KNNSettings())["top1"],
            "k-NN std": run_knn(Features(sa, ya), Features(sb, yb), 10, KNNSettings())["top1"],
            "linear": run_linear(Features(a, ya), Features(b, yb), 10, ProbeSettings(), seed)["top1"],
            "linear std": run_linear(Features(sa, ya), Features(sb, yb), 10, ProbeSettings(),
                                     seed)["top1"],
        }  # fmt: skip
    return out


def probe_rows(ckpts: dict, data: str, k: int, seed: int, cache: str) -> dict:
    path = os.path.join(cache, f"{os.path.basename(data.rstrip('/'))}_{k}_{seed}.pt")
    if cache and os.path.exists(path):
        rows = torch.load(path)
    else:
        cfg, task = _task(data, k, seed)
        rows = {}
        for name, ck in {**ckpts, "random": "random"}.items():
            model = _model(cfg, task, ck)
            f = _feats(task, model, "grid")
            for label, i in (("final grid3", -1), ("block2 grid3", 2)):
                rows[f"{name}: {label}"] = (f["train"].layers[i], f["val"].layers[i],
                                            f["train"].labels, f["val"].labels)  # fmt: skip
        rows["raw input"] = _raw(task, model)
        if cache:
            os.makedirs(cache, exist_ok=True)
            torch.save(rows, path)
    out = {}
    for r, (a, b, ya, yb) in rows.items():
        for sn, s in PROBE_SETTINGS:
            out[(sn, r)] = {
                "linear": run_linear(Features(a, ya), Features(b, yb), 10, s, seed)["top1"]
            }
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="benchmarks/readout_screen.py", description=__doc__.split("\n")[0]
    )
    sub = p.add_subparsers(dest="mode", required=True)
    b = sub.add_parser("blocks")
    b.add_argument("ckpt")
    b.add_argument("data")
    q = sub.add_parser("probe")
    q.add_argument("data")
    q.add_argument("ckpts", nargs="+", help="NAME=CKPT")
    q.add_argument("--cache", default="", help="feature cache folder (keyed by data, K, S only)")
    for s in (b, q):
        s.add_argument("--labels", default="10,20")
        s.add_argument("--seeds", default="0,1,2")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    table: dict = {}
    for k in (int(v) for v in a.labels.split(",")):
        for seed in (int(v) for v in a.seeds.split(",")):
            if a.mode == "blocks":
                rows = blocks_rows(a.ckpt, a.data, k, seed)
            else:
                ckpts = dict(c.split("=", 1) for c in a.ckpts)
                rows = probe_rows(ckpts, a.data, k, seed, a.cache)
            for key, sc in rows.items():
                for c, v in sc.items():
                    table.setdefault((k, *key), {}).setdefault(c, []).append(100 * v)
            print(f"labels {k} seed {seed}: done {time.strftime('%H:%M:%S')}", file=sys.stderr,
                  flush=True)  # fmt: skip
    cols = list(next(iter(table.values())))
    head = "| labels | read-out | values |" if a.mode == "blocks" else "| labels | setting | row |"
    print(head + "".join(f" {c} |" for c in cols))
    print("|---:|---|---|" + "---:|" * len(cols))
    for key, sc in table.items():
        cells = [f"{sum(v) / len(v):.1f} % ({min(v):.1f}-{max(v):.1f})" for v in sc.values()]
        print("| " + " | ".join(str(x) for x in key) + " | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
