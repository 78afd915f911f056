"""`unipred demo audio`: NEPA pretraining on synthesised speech, then digit recognition.

1. Data: spoken digits synthesised on the spot with espeak-ng and flite (many accents, voice
   variants, rates and pitches, with noise), written as WAV files and read back through
   torchcodec like any user's folder. Test clips use only *held-out voices* (see
   ``unipred.tasks.audio.spoken_digits``).
2. ``audio_pretrain`` (configs/audio/digits_pretrain.yaml) on every training clip, labels unused.
3. ``audio_classify`` (configs/audio/digits_finetune.yaml) with only a few labelled clips per
   digit, from scratch and from the pretrained checkpoint, same recipe and steps, repeated for
   several seeds (each seed draws the labelled clips, the init and the order for both runs, so
   the comparison is paired); accuracy on the held-out voices, mean ± sd over the seeds.
4. The frozen-feature protocols of ``unipred.protocols`` (kNN, linear, attentive, per-layer)
   with every training clip labelled (configs/audio/digits_linprobe.yaml, read out as its
   ``eval_defaults`` say), on the NEPA backbone and on the same backbone at random init, and
   k-NN and linear on the raw log-mel patches (read out alike, and flattened).
Everything runs through the engine (``unipred.train.engine.fit``). ``--quick`` is a smoke run.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from unipred.base.threads import set_threads
from unipred.train.config import packaged_configs

CONFIGS = packaged_configs() / "audio"


@dataclass
class Plan:
    train_per_class: int = 200  # synthesised training clips per digit (all used to pretrain)
    val_per_class: int = 40  # held-out-voice clips per digit
    pretrain_epochs: int = 150  # gain over scratch grows with pretraining: see the README
    finetune_epochs: int = 30
    labels: tuple[int, ...] = (10,)  # labelled clips per digit for the fine-tuning rows
    seeds: int = 5  # fine-tuning seeds per row (labelled subset, init, order): mean +- spread
    probe_epochs: int = 100  # linear and per-layer probes (cached features)
    attentive_epochs: int = 20


PLANS = {"full": Plan(), "quick": Plan(40, 10, 2, 4, (5,), 1, 2, 1)}
PROTOCOLS = ("knn", "linear", "attentive", "layers")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unipred demo audio", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke run (~2 minutes)")
    p.add_argument("--out", default="runs/demo_audio", help="folder for data, runs and results")
    p.add_argument("--labels", default="", help="labelled clips per digit, e.g. '5,20'")
    p.add_argument("--seeds", type=int, default=0, help="fine-tuning seeds per row (0 = plan's)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: the idle cores)")
    p.add_argument(
        "--seed", type=int, default=0, help="pretraining seed; fine-tuning uses seed+1.."
    )
    return p


def _fit(config: str, overrides: list[str]) -> dict[str, float]:
    """One engine run; returns the final logged metrics."""
    from unipred.train.config import load_config
    from unipred.train.engine import fit

    cfg = load_config(CONFIGS / config, overrides)
    trainer = fit(cfg, show_recipe="pretrain" in config)  # the others: recipe.json
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}


def _data_overrides(out: Path, plan: Plan, stats: tuple[float, float]) -> list[str]:
    return [f"data.digits_dir={out / 'data'}", f"data.train_per_class={plan.train_per_class}",
            f"data.val_per_class={plan.val_per_class}", "trainer.progress_bar=false",
            f"model.tokenizer_args.mean={stats[0]:.4f}",
            f"model.tokenizer_args.std={stats[1]:.4f}"]  # fmt: skip


def prepare_data(out: Path, plan: Plan) -> tuple[Path, tuple[float, float], dict]:
    """Synthesise (or find) the digits; returns their folder, log-mel stats and the manifest."""
    import json

    from unipred.tasks.audio.data import ClipTransform, audio_dataset, logmel_stats
    from unipred.tasks.audio.spoken_digits import available_engines, synthesize

    if not available_engines():
        raise SystemExit("the audio demo needs espeak-ng and/or flite: "
                         "apt-get install -y espeak-ng flite")  # fmt: skip
    name = f"spoken_digits_{plan.train_per_class}_{plan.val_per_class}_0"
    root = synthesize(out / "data" / name, plan.train_per_class, plan.val_per_class, seed=0)
    train = audio_dataset(str(root / "train"), ClipTransform(16000, 2.0, 0.5))
    stats = logmel_stats(train, {"n_mels": 64}, max_clips=300)
    return root, stats, json.loads((root / "manifest.json").read_text())


def main(argv: list[str] | None = None) -> int:
    """Run the demo; prints a results table and writes it to OUT/results.md."""
    args = _parser().parse_args(argv)
    plan = dataclasses.replace(PLANS["quick" if args.quick else "full"])  # a copy: edited below
    if args.labels:
        plan.labels = tuple(int(x) for x in args.labels.split(","))
    plan.seeds = args.seeds or plan.seeds
    out, t0 = Path(args.out), time.time()
    print(f"[audio demo] synthesising spoken digits ... ({set_threads(args.threads)})", flush=True)
    root, stats, manifest = prepare_data(out, plan)
    n_tr, n_te = manifest["counts"]["train"], manifest["counts"]["test"]
    print(f"[audio demo] {n_tr} training clips ({len(manifest['train_voices'])} voices), "
          f"{n_te} test clips ({len(manifest['test_voices'])} held-out voices) in {root}; "
          f"log-mel mean {stats[0]:.2f} std {stats[1]:.2f}  [{time.time() - t0:.0f}s]",
          flush=True)  # fmt: skip
    common = _data_overrides(out, plan, stats)
    _fit("digits_pretrain.yaml", common + [f"seed={args.seed}", f"run_dir={out / 'pretrain'}",
         f"trainer.max_epochs={plan.pretrain_epochs}",
         f"trainer.global_batch={min(64, n_tr)}"])  # tiny plans: one batch at most  # fmt: skip
    ckpt = out / "pretrain" / "checkpoints" / "last.ckpt"
    print(f"[audio demo] pretrained -> {ckpt}  [{time.time() - t0:.0f}s]", flush=True)
    rows = [_finetune_row(out, plan, common, n, ckpt, args.seed, t0) for n in plan.labels]
    frozen = frozen_rows(out, plan, common, str(ckpt), args.seed)
    table = _table(rows, plan, n_te, time.time() - t0, *frozen)
    print(table)
    (out / "results.md").write_text(table + "\n")
    return 0


def _finetune_row(out: Path, plan: Plan, common: list[str], n: int, ckpt: Path, seed: int,
                  t0: float) -> tuple[int, list[float], list[float]]:  # fmt: skip
    """Fine-tune from scratch and from ``ckpt`` with n labels per digit, once per seed. A seed
    fixes the labelled subset, the head init and the data order for both runs (paired)."""
    accs: dict[str, list[float]] = {"scratch": [], "nepa": []}
    for s in range(seed + 1, seed + 1 + plan.seeds):
        for kind in accs:
            ov = common + [f"seed={s}", f"run_dir={out / f'finetune{n}_{kind}_seed{s}'}",
                           f"data.max_per_class={n}", f"trainer.max_epochs={plan.finetune_epochs}",
                           f"trainer.val_every_n_epochs={plan.finetune_epochs}",
                           f"trainer.global_batch={min(20, 10 * n)}"]  # fmt: skip
            if kind == "nepa":
                ov.append(f"model.init=pretrain:{ckpt}")
            accs[kind].append(_fit("digits_finetune.yaml", ov)["val/acc1"])
        print(f"[audio demo] {n} labels/digit, seed {s}: scratch {accs['scratch'][-1]:.3f}, "
              f"NEPA {accs['nepa'][-1]:.3f}  [{time.time() - t0:.0f}s]", flush=True)  # fmt: skip
    return n, accs["scratch"], accs["nepa"]


def frozen_rows(out: Path, plan: Plan, common: list[str], ckpt: str, seed: int):
    """kNN, linear, attentive and per-layer probes of the frozen backbone ``ckpt`` and of the
    random-init backbone, and k-NN and linear on the raw input, with every training clip
    labelled, through the probe recipe's read-out (its ``eval_defaults``, as ``unipred eval``);
    (columns, the read-out in words)."""
    from unipred.protocols import frozen_columns

    return frozen_columns(
        CONFIGS / "digits_linprobe.yaml",
        [*common, f"seed={seed}", "data.max_per_class=0"], ckpt, PROTOCOLS,
        [f"linear.epochs={plan.probe_epochs}", f"layers.epochs={plan.probe_epochs}",
         f"attentive.epochs={plan.attentive_epochs}", "linear.batch=256", "layers.batch=256"],
        run_dirs={"NEPA": out / "frozen_nepa", "random init": out / "frozen_random",
                  "raw input": out / "frozen_input"},
        log=lambda line: print(f"[audio demo] frozen {line}", flush=True),
    )  # fmt: skip


def _mean_sd(xs: list[float]) -> str:
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return f"{m:.1%}"
    sd = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5
    return f"{m:.1%} ± {100 * sd:.1f}"


def _table(rows, plan: Plan, n_test: int, seconds: float, frozen: dict | None = None,
           readout: str = "") -> str:  # fmt: skip
    """Markdown: per label count, mean ± sd over seeds and the paired per-seed differences."""
    head = ("setting", "labelled train clips", "held-out-voice test clips",
            "from scratch", "NEPA-pretrained", "NEPA − scratch, per seed")  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n, scratch, nepa in rows:
        diffs = ", ".join(f"{100 * (b - a):+.1f}" for a, b in zip(scratch, nepa))
        lines.append(f"| fine-tune, {n} labelled clips per digit | {n * 10} | {n_test} | "
                     f"{_mean_sd(scratch)} | {_mean_sd(nepa)} | {diffs} |")  # fmt: skip
    lines += ["", f"test top-1 on voices never heard in training, mean ± sd over {plan.seeds} "
              f"fine-tuning seed(s) (labelled subset, init, order; paired); {plan.finetune_epochs} "
              f"fine-tuning epochs; NEPA pretraining: {plan.pretrain_epochs} epochs on "
              f"{plan.train_per_class * 10} unlabelled clips; total {seconds / 60:.1f} min"]  # fmt: skip
    if frozen:
        from unipred.protocols import comparison_markdown

        lines += ["", f"Frozen backbone, all {plan.train_per_class * 10} training clips labelled, "
                  f"test on the held-out voices; k-NN and linear read the probe recipe's {readout} "
                  f"(the raw input: its log-mel patches read alike, and flattened); linear / "
                  f"per-layer {plan.probe_epochs} epochs, attentive {plan.attentive_epochs}:", "",
                  comparison_markdown(frozen)]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
