"""The NEPA paper's ablations and its successors' variants on the image demo's recipe.

For each setting of the objective switches (docs/objectives.md) this runs the three stages of
`unipred demo image` (configs/demo/) at a reduced budget: pretraining on Fashion-MNIST, a
linear probe of the frozen backbone, and fine-tuning with 1,000 labels; plus one row for the
backbone at random init (no pretraining). It prints one markdown table: final pretraining
loss, collapse indicators (effective rank of predictions and targets at the end, the step of
the collapse monitor's first warning), probe and fine-tune top-1 on the test images.

    nice .venv/bin/python benchmarks/ablations.py --steps 300 --out runs/ablations
    nice .venv/bin/python benchmarks/ablations.py --only default,no_stop_grad   # a subset

Losses of different kinds (cosine, MSE, InfoNCE) and targets are not comparable with each
other; they say whether a run reached its trivial optimum (-1 for cosine).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import warnings
from pathlib import Path

# name -> (what, overrides of every stage (architecture), overrides of pretraining only)
SETTINGS: dict[str, tuple[str, list[str], list[str]]] = {
    "default": ("release objective", [], []),
    "no_shift": ("no shift", [], ["model.objective.shift=false"]),
    "no_stop_grad": ("no stop-gradient", [], ["model.objective.stop_grad=false"]),
    "bidirectional": ("bidirectional pretraining", [], ["model.predictor.causal=false"]),
    "mask_0.4": ("40 % input masking", [], ["model.objective.mask_ratio=0.4"]),
    "mse": ("loss mse", [], ["model.objective.loss=mse"]),
    "smooth_l1": ("loss smooth_l1", [], ["model.objective.loss=smooth_l1"]),
    "infonce": ("loss infonce", [], ["model.objective.loss=infonce"]),
    "target_block3": ("target: block 3 of 6", [],
                      ["model.objective.target=layer", "model.objective.target_layer=2"]),
    "target_pixels": ("target: normalised pixels", [], ["model.objective.target=patch"]),
    "horizon_3": ("horizon K=3", [], ["model.objective.horizon=3"]),
    "reverse": ("order reverse", [], ["model.objective.order=reverse"]),
    "random_fixed": ("order: fixed random permutation", [],
                     ["model.objective.order=random_fixed"]),
    "random": ("order: random per sample", [], ["model.objective.order=random"]),
    "registers_4": ("4 register tokens", ["model.registers=4"], []),
    "mlp_head": ("MLP predictor head", [], ["model.objective.head=mlp"]),
}  # fmt: skip


def _parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/ablations")
    p.add_argument("--data", default="", help="Fashion-MNIST IDX folder; default: Debian's")
    p.add_argument("--only", default="", help="comma-separated setting names (default: all)")
    p.add_argument("--steps", type=int, default=300, help="pretraining steps")
    p.add_argument("--batch", type=int, default=256, help="pretraining batch; the demo's lr "
                   "(3e-3 at 256) is scaled by sqrt(batch / 256)")  # fmt: skip
    p.add_argument("--train-images", type=int, default=20_000, help="pretraining/probe images")
    p.add_argument("--test-images", type=int, default=2_000)
    p.add_argument("--probe-epochs", type=int, default=10)
    p.add_argument("--finetune-steps", type=int, default=100, help="batch 100, 1,000 labels")
    p.add_argument("--collapse-every", type=int, default=25, help="collapse monitor period")
    p.add_argument("--no-random-row", action="store_true", help="skip the random-init row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    return p


class Runner:
    def __init__(self, args, root: str):
        self.args, self.out = args, Path(args.out)
        self.common = [f"data.root={root}", f"seed={args.seed}",
                       f"data.val_samples={args.test_images}", "trainer.progress_bar=false"]  # fmt: skip

    def fit(self, config: str, name: str, overrides: list[str]):
        from unipred.train.callbacks import CollapseMonitor
        from unipred.train.config import load_config, packaged_configs
        from unipred.train.engine import fit

        run = self.out / name
        if run.exists():
            shutil.rmtree(run)
        cfg = load_config(
            packaged_configs() / "demo" / config, [*self.common, f"run_dir={run}", *overrides]
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the monitor's warnings are read from the callback
            trainer = fit(cfg)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        mon = next((c for c in trainer.callbacks if isinstance(c, CollapseMonitor)), None)
        return metrics, mon, run

    def setting(self, name: str) -> dict:
        a = self.args
        _, arch, pre = SETTINGS[name] if name in SETTINGS else ("", [], [])
        t0 = time.time()
        row: dict = {"name": name}
        init: list[str] = []
        if name != "random_init":
            m, mon, run = self.fit("fmnist_pretrain.yaml", f"{name}/pretrain", [
                f"trainer.max_steps={a.steps}", f"data.train_samples={a.train_images}",
                f"trainer.global_batch={a.batch}", f"optim.lr={3e-3 * (a.batch / 256) ** 0.5:.4g}",
                f"trainer.collapse_every_n_steps={a.collapse_every}", *arch, *pre])  # fmt: skip
            row.update(_collapse_row(run, m, mon))
            init = [f"model.init=pretrain:{run / 'checkpoints' / 'last.ckpt'}"]
        # the probe uses the attention the backbone was pretrained with
        causal = [o for o in pre if o.startswith("model.predictor.causal")]
        m, _, _ = self.fit("fmnist_probe.yaml", f"{name}/probe", [
            f"data.train_samples={a.train_images}", f"trainer.max_epochs={a.probe_epochs}",
            f"trainer.val_every_n_epochs={a.probe_epochs}", *arch, *causal, *init])  # fmt: skip
        row["probe"] = m["val/acc1"]
        repeat = a.finetune_steps * 100 // 1000
        m, _, _ = self.fit("fmnist_finetune.yaml", f"{name}/finetune", [
            "data.labels_per_class=100", f"data.repeat={repeat}", *arch,
            *([*init, "optim.freeze=[tokenizer.*]"] if init else [])])  # fmt: skip
        row["finetune"] = m["val/acc1"]
        row["seconds"] = time.time() - t0
        print(f"[ablations] {name}: {json.dumps(_rounded(row))}", flush=True)
        return row


def _collapse_row(run: Path, metrics: dict, mon) -> dict:
    from unipred.tasks.image.demo_plots import read_metrics

    losses = [r["train/loss"] for r in read_metrics(run) if "train/loss" in r]
    hist = mon.history if mon is not None else []
    first, last = (hist[0], hist[-1]) if hist else ({}, {})
    nan = float("nan")
    return {
        "loss": sum(losses[-5:]) / max(1, len(losses[-5:])) if losses else nan,
        "erank_pred": last.get("erank", nan),
        "erank_target": last.get("target_erank", nan),
        "erank_target_start": first.get("target_erank", nan),
        "std_target": last.get("target_std_mean", nan),
        "spread_pred": last.get("spread", nan),
        "spread_target": last.get("target_spread", nan),
        "min_spread": min(
            (min(h.get("spread", 1), h.get("target_spread", 1)) for h in hist), default=nan
        ),  # fmt: skip
        "warned_at": None if mon is None else mon.first_step,
        "warnings": 0 if mon is None else mon.warned,
        "history": hist,
    }


def _rounded(row: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


def table(rows: list[dict]) -> str:
    head = ("setting", "pretrain loss", "erank pred / target", "spread pred / target (min)",
            "monitor warned at step", "probe top-1", "fine-tune top-1 (1,000 labels)")  # fmt: skip
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        what = SETTINGS[r["name"]][0] if r["name"] in SETTINGS else "random init, no pretraining"
        if "loss" in r:
            w = "never" if r["warned_at"] is None else f"{r['warned_at']} ({r['warnings']}x)"
            cells = [f"{r['loss']:.4f}", f"{r['erank_pred']:.1f} / {r['erank_target']:.1f}",
                     f"{r['spread_pred']:.2f} / {r['spread_target']:.2f} ({r['min_spread']:.2f})",
                     w]  # fmt: skip
        else:
            cells = ["-"] * 4
        cells += [f"{r['probe']:.1%}", f"{r['finetune']:.1%}"]
        out.append(f"| {what} (`{r['name']}`) | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from unipred.tasks.image.demo import _quiet, data_root

    from unipred.base.threads import set_threads

    _quiet()
    names = [n for n in args.only.split(",") if n] or list(SETTINGS)
    unknown = [n for n in names if n not in SETTINGS and n != "random_init"]
    if unknown:
        print(f"ablations: unknown setting(s) {unknown}; known: {', '.join(SETTINGS)}")
        return 2
    if not args.only and not args.no_random_row:
        names.append("random_init")
    threads = set_threads(args.threads)
    root = data_root(args.data)
    print(f"[ablations] data {root}; {threads}; {vars(args)}", flush=True)
    t0, rows = time.time(), []
    runner = Runner(args, root)
    for n in names:
        rows.append(runner.setting(n))
    text = table(rows) + (
        f"\n\n{args.steps} pretraining steps x {args.batch} of {args.train_images:,} images; probe "
        f"{args.probe_epochs} epochs; fine-tune {args.finetune_steps} steps x 100 (1,000 "
        f"labels); {args.test_images:,} test images. Total {(time.time() - t0) / 60:.1f} min."
    )
    print(text, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps([_rounded(r) for r in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
