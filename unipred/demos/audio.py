"""`unipred demo audio`: NEPA pretraining on synthesised speech, then digit recognition.

1. Data: spoken digits synthesised on the spot with espeak-ng and flite (many accents, voice
   variants, rates and pitches, with noise), written as WAV files and read back through
   torchcodec like any user's folder. Test clips use only *held-out voices* (see
   ``unipred.data.spoken_digits``).
2. ``audio_pretrain`` (configs/audio/digits_pretrain.yaml) on every training clip, labels unused.
3. ``audio_classify`` (configs/audio/digits_finetune.yaml) with only a few labelled clips per
   digit, once from scratch and once from the pretrained checkpoint, same recipe and steps;
   accuracy is measured on the held-out voices.
Everything runs through the engine (``unipred.engine.fit``). ``--quick`` is a smoke run.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import unipred
from unipred.demos import results_table

CONFIGS = Path(unipred.__file__).resolve().parent.parent / "configs" / "audio"


@dataclass
class Plan:
    train_per_class: int = 200  # synthesised training clips per digit (all used to pretrain)
    val_per_class: int = 40  # held-out-voice clips per digit
    pretrain_epochs: int = 40  # 8 were too few for pretraining to help (README)
    finetune_epochs: int = 30
    labels: tuple[int, ...] = (10,)  # labelled clips per digit for the fine-tuning rows


PLANS = {"full": Plan(), "quick": Plan(40, 10, 2, 6, (5,))}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unipred demo audio", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke run (~2 minutes)")
    p.add_argument("--out", default="runs/demo_audio", help="folder for data, runs and results")
    p.add_argument("--labels", default="", help="labelled clips per digit, e.g. '5,20'")
    p.add_argument("--seed", type=int, default=0)
    return p


def _fit(config: str, overrides: list[str]) -> dict[str, float]:
    """One engine run; returns the final logged metrics."""
    from unipred.config import load_config
    from unipred.engine import fit

    cfg = load_config(CONFIGS / config, overrides)
    trainer = fit(cfg)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}


def _data_overrides(out: Path, plan: Plan, stats: tuple[float, float]) -> list[str]:
    return [f"data.digits_dir={out / 'data'}", f"data.train_per_class={plan.train_per_class}",
            f"data.val_per_class={plan.val_per_class}", "trainer.progress_bar=false",
            f"model.tokenizer_args.mean={stats[0]:.4f}",
            f"model.tokenizer_args.std={stats[1]:.4f}"]  # fmt: skip


def prepare_data(out: Path, plan: Plan) -> tuple[Path, tuple[float, float], dict]:
    """Synthesise (or find) the digits; returns their folder, log-mel stats and the manifest."""
    import json

    from unipred.data.audio import ClipTransform, audio_dataset, logmel_stats
    from unipred.data.spoken_digits import available_engines, synthesize

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
    plan = PLANS["quick" if args.quick else "full"]
    if args.labels:
        plan.labels = tuple(int(x) for x in args.labels.split(","))
    out, t0 = Path(args.out), time.time()
    if not (CONFIGS / "digits_pretrain.yaml").is_file():
        raise SystemExit(f"demo configs not found in {CONFIGS}; run from a source checkout")
    print("[audio demo] synthesising spoken digits ...", flush=True)
    root, stats, manifest = prepare_data(out, plan)
    n_tr, n_te = manifest["counts"]["train"], manifest["counts"]["test"]
    print(f"[audio demo] {n_tr} training clips ({len(manifest['train_voices'])} voices), "
          f"{n_te} test clips ({len(manifest['test_voices'])} held-out voices) in {root}; "
          f"log-mel mean {stats[0]:.2f} std {stats[1]:.2f}  [{time.time() - t0:.0f}s]",
          flush=True)  # fmt: skip
    common = _data_overrides(out, plan, stats) + [f"seed={args.seed}"]
    _fit("digits_pretrain.yaml", common + [f"run_dir={out / 'pretrain'}",
         f"trainer.max_epochs={plan.pretrain_epochs}"])  # fmt: skip
    ckpt = out / "pretrain" / "checkpoints" / "last.ckpt"
    print(f"[audio demo] pretrained -> {ckpt}  [{time.time() - t0:.0f}s]", flush=True)
    rows = []
    for n in plan.labels:
        accs = []
        for kind, init in (("scratch", None), ("nepa", ckpt)):
            ov = common + [f"run_dir={out / f'finetune{n}_{kind}'}", f"data.max_per_class={n}",
                           f"trainer.max_epochs={plan.finetune_epochs}",
                           f"trainer.val_every_n_epochs={plan.finetune_epochs}"]  # fmt: skip
            if init is not None:
                ov.append(f"model.init=pretrain:{init}")
            accs.append(_fit("digits_finetune.yaml", ov)["val/acc1"])
        rows.append((f"fine-tune, {n} labelled clips per digit", n * 10, n_te, *accs))
        print(f"[audio demo] {n} labels/digit: scratch {accs[0]:.3f}, NEPA {accs[1]:.3f}  "
              f"[{time.time() - t0:.0f}s]", flush=True)  # fmt: skip
    table = _table(rows, plan, time.time() - t0)
    print(table)
    (out / "results.md").write_text(table + "\n")
    return 0


def _table(rows, plan: Plan, seconds: float) -> str:
    footer = (f"\ntest top-1 on voices never heard in training, after {plan.finetune_epochs} "
                 f"fine-tuning epochs; NEPA pretraining: {plan.pretrain_epochs} epochs on "
                 f"{plan.train_per_class * 10} unlabelled clips; total {seconds / 60:.1f} min")  # fmt: skip
    return results_table(
        (
            "setting",
            "labelled train clips",
            "held-out-voice test clips",
            "from scratch",
            "NEPA-pretrained",
        ),
        rows,
        footer.lstrip("\n"),
    )


if __name__ == "__main__":
    raise SystemExit(main())
