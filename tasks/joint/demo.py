"""`unipred demo joint`: one predictor pretrained on images, audio and video together.

1. Data, from the single-modality demos' builders: Fashion-MNIST (``unipred demo image``),
   spoken digits synthesised with espeak-ng / flite (``unipred demo audio``: held-out voices
   for testing), moving-shape clips (``unipred demo video``'s generator, kept in memory).
2. Pretraining, every run with the same architecture (dim 128, depth 4, 4 heads, RoPE in one
   (t, y, x) space), optimizer and batch (64):
   * one single-modality pretraining per modality (``fmnist_pretrain``, ``audio_pretrain``,
     ``video_pretrain``), N_image / N_audio / N_video steps;
   * one joint pretraining (``joint_pretrain``, configs/joint/demo_pretrain.yaml) of
     N_image + N_audio + N_video steps, each modality's turns in that ratio: every modality
     sees exactly as many samples as in its own run, so the joint run costs the three
     single-modality runs together.
3. Downstream, per modality, from scratch / from its own single-modality checkpoint / from
   the joint checkpoint (``model.init=pretrain:JOINT@image`` picks that modality's
   tokenizer), on the same seeds (paired: a seed fixes the labelled subset, the head init
   and the order for all three): Fashion-MNIST fine-tuning with few labels, spoken-digit
   fine-tuning with few labels (held-out voices), motion-direction fine-tuning.
4. One table (mean ± sd over the seeds, and joint − single per seed), in OUT/results.md and
   OUT/results.json with the time of every stage.

Every stage is an ordinary engine run of a packaged recipe plus overrides. ``--quick`` is a
smoke run; ``--data generated`` uses generated stand-in images (tests).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from unipred.base.threads import set_threads
from unipred.train.config import packaged_configs

CONFIGS = packaged_configs()
MODALITIES = ("image", "audio", "video")
RELEASE_OBJECTIVE = {"auto": "false", "loss": "cosine", "target_norm": "none", "horizon": 1,
                     "head": "none"}  # fmt: skip
AXES = {"image": [1, 2], "audio": [0, 1], "video": None}  # where each sits in (t, y, x)


@dataclass
class Plan:
    image_steps: int = 1000  # single-modality pretraining steps of `batch` (joint: the sum)
    audio_steps: int = 500
    video_steps: int = 400
    batch: int = 64
    image_labels: int = 20  # labelled images per class for fine-tuning
    image_finetune_steps: int = 100  # of 50 labelled images
    image_train: int = 0  # pretraining images (0 = all 60,000)
    test_images: int = 2000
    audio_train_per_class: int = 100  # synthesised clips per digit (all pretrain)
    audio_val_per_class: int = 20  # held-out-voice test clips per digit
    audio_labels: int = 10  # labelled clips per digit
    audio_finetune_epochs: int = 20
    video_clips: int = 2048  # unlabelled pretraining clips
    video_labels: int = 32  # labelled clips per direction (4 directions)
    video_val: int = 256  # validation clips
    video_finetune_epochs: int = 25
    seeds: int = 3  # paired fine-tuning seeds per arm


PLANS = {
    "full": Plan(),
    "quick": Plan(6, 4, 4, 8, 4, 4, 256, 64, 3, 2, 2, 2, 32, 4, 16, 2, 2),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unipred demo joint", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke run (its numbers mean nothing)")
    p.add_argument("--out", default="runs/demo_joint", help="folder for data, runs and results")
    p.add_argument("--data", default="", help="Fashion-MNIST IDX folder; 'generated' = stand-in "
                   "images (tests); default: Debian's, else torchvision's download")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="pretraining seed; fine-tuning seed+1..")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: the idle cores)")
    for f, v in asdict(Plan()).items():
        p.add_argument("--" + f.replace("_", "-"), type=int, default=None,
                       help=f"override the plan (full: {v})")  # fmt: skip
    return p


def _plan(args) -> Plan:
    plan = dataclasses.replace(PLANS["quick" if args.quick else "full"])
    for f in asdict(plan):
        if getattr(args, f) is not None:
            setattr(plan, f, getattr(args, f))
    return plan


def _q(v) -> str:
    return "''" if v == "" else str(v)


class Demo:
    """The stages; each is one ``fit`` of a packaged recipe plus overrides."""

    def __init__(self, out: Path, plan: Plan, fmnist: str, audio_stats, seed: int):
        self.out, self.plan, self.seed = out, plan, seed
        self.fmnist, self.stats = fmnist, audio_stats
        self.times: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    # -- per modality: data and tokenizer overrides, shared by pretraining and fine-tuning --
    def data(self, m: str) -> dict:
        p = self.plan
        if m == "image":
            d = {"root": self.fmnist, "val_samples": p.test_images}
            if not self.fmnist:
                d["generated_samples"] = max(512, p.test_images, 10 * p.image_labels)
            return d
        if m == "audio":
            return {"digits_dir": str(self.out / "data"), "train_per_class": p.audio_train_per_class,
                    "val_per_class": p.audio_val_per_class}  # fmt: skip
        return {"root": "", "train_samples": p.video_clips, "val_samples": p.video_val}

    def tokenizer(self, m: str) -> dict:
        if m == "audio":
            return {"mean": round(self.stats[0], 4), "std": round(self.stats[1], 4)}
        return {}

    def arch(self, m: str) -> list[str]:
        """The shared architecture (and its RoPE layout) in a single-modality run."""
        ov = ["model.predictor.dim=128", "model.predictor.depth=4", "model.predictor.heads=4",
              "model.predictor.qk_norm_affine=true", "model.predictor.rope_space=3"]  # fmt: skip
        if AXES[m] is not None:
            ov.append(f"model.predictor.rope_axes=[{','.join(map(str, AXES[m]))}]")
        return ov

    def common(self, m: str) -> list[str]:
        ov = [f"data.{k}={_q(v)}" for k, v in self.data(m).items()]
        ov += [f"model.tokenizer_args.{k}={v}" for k, v in self.tokenizer(m).items()]
        return ov + self.arch(m) + ["trainer.progress_bar=false"]

    # -- runs ---------------------------------------------------------------------------
    def fit(self, config: str, name: str, overrides: list[str]) -> dict[str, float]:
        from unipred.train.config import load_config
        from unipred.train.engine import fit

        run = self.out / name
        if run.exists():
            shutil.rmtree(run)
        cfg = load_config(CONFIGS / config, [*overrides, f"run_dir={run}"])
        t0, c0 = time.time(), time.process_time()
        trainer = fit(cfg, show_recipe=False)
        self.times[name], self.cpu[name] = time.time() - t0, time.process_time() - c0
        return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}

    def pretrain_opt(self) -> list[str]:
        """Optimizer and batch of every pretraining run (joint and single): the joint recipe's."""
        return [f"trainer.global_batch={self.plan.batch}", "optim.lr=1.5e-3",
                "optim.betas=[0.9,0.95]", "optim.weight_decay=0.05", "optim.schedule=cosine",
                "optim.warmup_ratio=0.05", "optim.grad_clip=1.0", "trainer.precision=bf16-mixed",
                "trainer.max_epochs=1000", "trainer.collapse_every_n_steps=50", "ema.enabled=false",
                "trainer.ckpt_every_n_steps=0", f"seed={self.seed}"]  # fmt: skip

    def steps(self, m: str) -> int:
        return getattr(self.plan, f"{m}_steps")

    def pretrain_single(self, m: str) -> Path:
        config = {"image": "demo/fmnist_pretrain.yaml", "audio": "audio/digits_pretrain.yaml",
                  "video": "video/demo_pretrain.yaml"}[m]  # fmt: skip
        ov = self.common(m) + self.pretrain_opt() + [f"trainer.max_steps={self.steps(m)}"]
        # the joint run's objective (the release's): the audio and video recipes set their own
        # small-data switches, which would make the table compare objectives, not joint vs single
        ov += [f"model.objective.{k}={v}" for k, v in RELEASE_OBJECTIVE.items()]
        if m == "image":
            ov.append(f"data.train_samples={self.plan.image_train}")
        if m == "video":
            ov += ["model.tokenizer_args.patch_size=8"]
        self.fit(config, f"pretrain_{m}", ov)
        return self.out / f"pretrain_{m}" / "checkpoints" / "last.ckpt"

    def pretrain_joint(self) -> Path:
        ov = self.pretrain_opt() + [f"trainer.max_steps={sum(self.steps(m) for m in MODALITIES)}",
                                    "trainer.progress_bar=false"]  # fmt: skip
        for m in MODALITIES:
            src = f"data.sources.{m}"
            data = dict(self.data(m))
            if m == "image":
                data["train_samples"] = self.plan.image_train
            ov += [f"{src}.data.{k}={_q(v)}" for k, v in data.items()]
            ov += [f"{src}.model.tokenizer_args.{k}={v}" for k, v in self.tokenizer(m).items()]
            ov.append(f"{src}.weight={self.steps(m)}")
        self.fit("joint/demo_pretrain.yaml", "pretrain_joint", ov)
        return self.out / "pretrain_joint" / "checkpoints" / "last.ckpt"

    def finetune(self, m: str, arm: str, init: str, seed: int) -> float:
        p, ov = self.plan, self.common(m) + [f"seed={seed}"]
        if m == "image":
            n = 10 * p.image_labels
            repeat = max(1, round(p.image_finetune_steps * 50 / n))
            ov += [f"data.labels_per_class={p.image_labels}", f"data.subset_seed={seed}",
                   f"data.repeat={repeat}", "trainer.global_batch=50", "model.predictor.depth=4"]  # fmt: skip
            config = "demo/fmnist_finetune.yaml"
            if init:
                ov.append("optim.freeze=[tokenizer.*]")  # as `unipred demo image` does
        elif m == "audio":
            ov += [f"data.max_per_class={p.audio_labels}", f"trainer.max_epochs={p.audio_finetune_epochs}",
                   f"trainer.val_every_n_epochs={p.audio_finetune_epochs}",
                   f"trainer.global_batch={min(20, 10 * p.audio_labels)}"]  # fmt: skip
            config = "audio/digits_finetune.yaml"
        else:
            ov += [f"data.train_samples={4 * p.video_labels}", "model.tokenizer_args.patch_size=8",
                   f"trainer.max_epochs={p.video_finetune_epochs}",
                   f"trainer.val_every_n_epochs={p.video_finetune_epochs}",
                   f"trainer.global_batch={min(32, 4 * p.video_labels)}"]  # fmt: skip
            config = "video/demo_classify.yaml"
        if init:
            ov.append(f"model.init=pretrain:{init}")
        return self.fit(config, f"{m}_{arm}_seed{seed}", ov)["val/acc1"]


# --------------------------------------------------------------------------------- data
def prepare(out: Path, plan: Plan, spec: str) -> tuple[str, tuple[float, float]]:
    """Fashion-MNIST's folder ('' = generated) and the spoken digits' log-mel statistics."""
    from unipred.tasks.audio.demo import Plan as AudioPlan
    from unipred.tasks.audio.demo import prepare_data
    from unipred.tasks.image.demo import data_root

    fmnist = data_root(spec)
    ap = AudioPlan(
        train_per_class=plan.audio_train_per_class, val_per_class=plan.audio_val_per_class
    )
    _, stats, manifest = prepare_data(out, ap)
    return fmnist, stats


# --------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    """Run the demo; prints the table and writes OUT/results.md and OUT/results.json."""
    args = _parser().parse_args(argv)
    _quiet()
    plan, out, t0 = _plan(args), Path(args.out), time.time()
    threads = set_threads(args.threads)
    try:
        fmnist, stats = prepare(out, plan, args.data)
    except FileNotFoundError as e:
        print(f"unipred demo joint: {e}", flush=True)
        return 2
    load0 = os.getloadavg()
    print(f"[joint demo] data ready [{time.time() - t0:.0f}s]; plan: {plan}; {threads}", flush=True)
    demo = Demo(out, plan, fmnist, stats, args.seed)
    ckpts = {}
    for m in MODALITIES:
        ckpts[m] = str(demo.pretrain_single(m))
        print(f"[joint demo] pretrained {m} alone: {demo.steps(m)} steps "
              f"[{time.time() - t0:.0f}s]", flush=True)  # fmt: skip
    joint = demo.pretrain_joint()
    print(f"[joint demo] pretrained jointly: {sum(demo.steps(m) for m in MODALITIES)} steps "
          f"[{time.time() - t0:.0f}s]", flush=True)  # fmt: skip
    acc: dict[str, dict[str, list[float]]] = {}
    for m in MODALITIES:
        acc[m] = {"scratch": [], "single": [], "joint": []}
        for s in range(args.seed + 1, args.seed + 1 + plan.seeds):
            for arm, init in (("scratch", ""), ("single", ckpts[m]), ("joint", f"{joint}@{m}")):
                acc[m][arm].append(demo.finetune(m, arm, init, s))
            print(f"[joint demo] {m} seed {s}: " + ", ".join(
                f"{a} {v[-1]:.3f}" for a, v in acc[m].items()) + f"  [{time.time() - t0:.0f}s]",
                flush=True)  # fmt: skip
    seconds, load1 = time.time() - t0, os.getloadavg()
    table = results_table(acc, plan, demo, seconds, (load0[0], load1[0]), bool(fmnist), threads)
    print(table, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table + "\n")
    from unipred.protocols.report import percent_tree

    info = {"accuracy_pct": percent_tree(acc), "units": {"accuracy_pct": "percent (top-1)"},
            "plan": asdict(plan), "seconds": demo.times, "cpu_seconds": demo.cpu,
            "total_seconds": seconds, "load_average": [load0[0], load1[0]], "threads": threads,
            "fashion_mnist": fmnist or "generated", "argv": sys.argv[1:] if argv is None else argv}  # fmt: skip
    (out / "results.json").write_text(json.dumps(info, indent=2) + "\n")
    return 0


def _quiet() -> None:
    import logging
    import warnings

    for name in ("lightning.pytorch", "lightning.fabric", "unipred.tasks.image.fashion_mnist"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for msg in ("Total length of", ".*LeafSpec", ".*does not have many workers",
                ".*IterableDataset.*__len__"):  # fmt: skip
        warnings.filterwarnings("ignore", message=msg)


def _mean_sd(xs: list[float]) -> str:
    from unipred.tasks.audio.demo import _mean_sd as mean_sd  # one formatting for both tables

    return mean_sd(xs)


def results_table(acc, plan: Plan, demo: Demo, seconds: float, load, real: bool, threads) -> str:
    """Markdown: per downstream task, mean ± sd over the paired seeds for each init, and the
    per-seed differences joint − single and joint − scratch (points)."""
    names = {
        "image": (f"{'Fashion-MNIST' if real else 'generated images'}: fine-tune, "
                  f"{plan.image_labels} labels/class", f"{plan.test_images or 10_000} test images"),
        "audio": (f"spoken digits: fine-tune, {plan.audio_labels} clips/digit",
                  f"{10 * plan.audio_val_per_class} held-out-voice clips"),
        "video": (f"motion direction: fine-tune, {plan.video_labels} clips/direction",
                  f"{plan.video_val} clips"),
    }  # fmt: skip
    head = ("downstream task", "test set", "scratch", "single-modality NEPA", "joint NEPA",
            "joint − single, per seed", "joint − scratch, per seed")  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in MODALITIES:
        a = acc[m]
        d1 = ", ".join(f"{100 * (j - s):+.1f}" for j, s in zip(a["joint"], a["single"]))
        d2 = ", ".join(f"{100 * (j - s):+.1f}" for j, s in zip(a["joint"], a["scratch"]))
        lines.append(f"| {names[m][0]} | {names[m][1]} | {_mean_sd(a['scratch'])} | "
                     f"{_mean_sd(a['single'])} | {_mean_sd(a['joint'])} | {d1} | {d2} |")  # fmt: skip
    single = sum(demo.times.get(f"pretrain_{m}", 0) for m in MODALITIES)
    steps = " + ".join(f"{demo.steps(m)} ({m})" for m in MODALITIES)
    lines += ["", f"Top-1, mean ± sd over {plan.seeds} paired fine-tuning seeds. Pretraining, batch "
              f"{plan.batch}, one architecture (dim 128, depth 4, 4 heads, (t, y, x) RoPE): "
              f"single-modality {steps} steps ({single:.0f} s wall together), joint "
              f"{sum(demo.steps(m) for m in MODALITIES)} steps "
              f"({demo.times.get('pretrain_joint', 0):.0f} s wall). Total {seconds / 60:.1f} min, "
              f"{threads}, {os.cpu_count()} CPUs, load average {load[0]:.1f} at the start, "
              f"{load[1]:.1f} at the end."]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
