"""Plots of `unipred demo image`: loss curves, accuracy bars, next-embedding prediction maps.

The prediction maps reuse ``unipred.tasks.image.visualize`` (the release's map: cosine of a patch's
predicted embedding with every input patch embedding, softmaxed, drawn as (p / max) ** gamma).
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch


def read_metrics(run: Path) -> list[dict[str, float]]:
    """Rows of the run's CSV log (logs/version_*/metrics.csv, newest version), numbers only."""
    files = sorted(Path(run).glob("logs/version_*/metrics.csv"))
    if not files:
        return []
    rows = []
    with open(files[-1], newline="") as f:
        for r in csv.DictReader(f):
            rows.append({k: float(v) for k, v in r.items() if v not in ("", None)})
    return rows


def _series(run: Path, key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in read_metrics(run) if key in r and "step" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curves(out: Path, path: Path) -> None:
    """Pretraining next-embedding loss; fine-tuning losses (NEPA init vs scratch)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    x, y = _series(out / "pretrain", "train/loss")
    axes[0].plot(x, y, color="C0")
    axes[0].set(title="NEPA pretraining (no labels)", xlabel="step",
                ylabel="next-embedding loss (-cosine)")  # fmt: skip
    for name, label, c in (("finetune_nepa", "NEPA init", "C0"), ("finetune_scratch", "scratch", "C1")):  # fmt: skip
        x, y = _series(out / name, "train/loss")
        axes[1].plot(x, y, label=label, color=c)
    axes[1].set(title="fine-tuning, 1,000 labels", xlabel="step", ylabel="cross-entropy (train)")
    axes[1].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def accuracy_bars(acc: dict[str, float], path: Path, n_test: int = 10_000) -> None:
    """Test top-1 of the four runs as grouped bars (NEPA vs baseline per protocol)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    groups = (("fine-tune\n(1,000 labels)", "finetune_nepa", "finetune_scratch", "scratch"),
              ("linear probe\n(all labels)", "probe_nepa", "probe_random", "random init"))  # fmt: skip
    for i, (_, nepa, base, base_label) in enumerate(groups):
        for j, (key, label, c) in enumerate(((nepa, "NEPA", "C0"), (base, base_label, "C1"))):
            v = 100 * acc[key]
            ax.bar(i + (j - 0.5) * 0.38, v, 0.36, color=c, label=label if i == 0 or j else None)
            ax.text(i + (j - 0.5) * 0.38, v + 1, f"{v:.1f}", ha="center", fontsize=9)
    ax.set_xticks([0, 1], [g[0] for g in groups])
    ax.set(ylabel="test top-1 (%)", ylim=(0, 115), title=f"Fashion-MNIST, {n_test:,} test images")
    ax.set_yticks(range(0, 101, 20))
    ax.legend(loc="upper center", ncols=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _models(out: Path, seed: int):
    """The pretrained model (last.ckpt) and the same architecture at random init, eval mode."""
    from omegaconf import OmegaConf
    from unipred.tasks.image.visualize import load_model

    from unipred.base.registry import TASKS
    from unipred.train.checkpoint import read_checkpoint
    from unipred.train.config import schema_for

    ckpt = out / "pretrain" / "checkpoints" / "last.ckpt"
    args = type("Args", (), {"ckpt": str(ckpt), "ema": False, "official": "", "seed": seed})
    nepa = load_model(args)
    raw = read_checkpoint(ckpt)["unipred_config"]
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema_for(raw["task"])), raw))
    cfg.model.init = ""
    torch.manual_seed(seed)
    return nepa, TASKS.get(cfg.task)(cfg).build_model().eval(), cfg


def prediction_maps(out: Path, root: str, path: Path, n: int = 6, seed: int = 0) -> list[str]:
    """A grid (image / NEPA map / random-init map) for n test images, plus the 4-panel PNGs of
    ``unipred visualize`` (image, patch, attention, prediction) for the NEPA model."""
    from unipred.tasks.image.fashion_mnist import Collate, load_arrays
    from unipred.tasks.image.visualize import draw, maps

    nepa, rand, cfg = _models(out, seed)
    cfg.data.root, cfg.data.val_samples = root, n
    x_u8, y = load_arrays(cfg.data, "val", seed)
    x = Collate(cfg.data, train=False)([(img[None], int(c)) for img, c in zip(x_u8, y)])[0]
    n_h, n_w = nepa.tokenizer.grid(x.shape[2], x.shape[3])
    g = torch.Generator().manual_seed(seed)
    # a patch in the middle rows: its successor (what a causal model predicts) is on the object
    patches = torch.randint(n_w, n_h * n_w - n_w, (len(x),), generator=g).tolist()
    plt = _plt()
    fig, axes = plt.subplots(3, len(x), figsize=(1.8 * len(x), 5.6), squeeze=False)
    files = []
    for i, (img, p) in enumerate(zip(x, patches)):
        for row, (model, name) in enumerate(((nepa, "NEPA"), (rand, "random init"))):
            m = maps(model, img, p)
            heat = (m["prediction"] / m["prediction"].max()) ** 10
            _panel(axes[row + 1][i], img, heat, p, n_w, f"{name}: p{p}")
            if row == 0:
                f = path.parent / "maps" / f"test{i}_p{p}.png"
                f.parent.mkdir(parents=True, exist_ok=True)
                draw(str(f), img.expand(3, -1, -1), m, p, 10.0, bool(nepa.predictor.cfg.causal))
                files.append(str(f))
        _panel(axes[0][i], img, None, p, n_w, f"test {i}")
    fig.suptitle("next-embedding prediction maps (cosine of patch p's prediction with every "
                 "input patch; cyan: p, green: p+1)", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return files


def _panel(ax, img, heat, p, n_w, title):
    from matplotlib.patches import Rectangle

    side = img.shape[-1] / n_w
    ax.imshow(((img[0] + 1) / 2).clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
    if heat is not None:
        ext = (0, img.shape[-1], img.shape[-2], 0)
        ax.imshow(heat, cmap="inferno", alpha=0.6, extent=ext, interpolation="nearest")
    for q, colour, ls in ((p, "cyan", "-"), (p + 1, "lime", "--")):
        r, c = divmod(q, n_w)
        ax.add_patch(Rectangle((c * side - 0.5, r * side - 0.5), side, side, fill=False,
                               ec=colour, lw=1.5, ls=ls))  # fmt: skip
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def write_all(out: Path, acc: dict[str, float], demo, root: str) -> list[str]:
    """All plots of the demo into OUT/plots/; returns the written paths."""
    d = out / "plots"
    d.mkdir(parents=True, exist_ok=True)
    loss_curves(out, d / "loss_curves.png")
    accuracy_bars(acc, d / "accuracy.png", demo.plan.test_images or 10_000)
    files = prediction_maps(out, root, d / "prediction_maps.png", seed=demo.seed)
    return [str(d / "loss_curves.png"), str(d / "accuracy.png"), str(d / "prediction_maps.png"),
            *files]  # fmt: skip
