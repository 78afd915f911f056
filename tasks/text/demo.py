"""`unipred demo text`: NEPA on UTF-8 bytes, language identification of single words.

1. Data: the ``wordlang`` set built from Debian's word lists (8 languages; ``apt-get install
   wamerican wngerman wfrench wspanish witalian wportuguese wdutch wswedish``; see
   ``unipred.tasks.text.corpora``), or ``--corpus manlang`` (lines of translated man pages).
   Without the packages, generated stand-in "languages" (said in the table).
2. ``text_pretrain`` (configs/text/pretrain.yaml) on the training words, labels unused.
3. For each label budget (labelled words per language): ``text_classify`` fine-tuning
   (configs/text/finetune.yaml) from the checkpoint and from scratch, same recipe and subset;
   the frozen k-NN and linear probe (``unipred.protocols``, configs/text/probe.yaml; read out
   as the mean of the tokens and at the last real token) of the checkpoint, of the same network at random init and of the
   raw input (the tokenizer's one-hot bytes, flattened); the character 1-3-gram naive Bayes
   on the same labelled words (``DataSource.baseline_scores``).
4. One table of test top-1: printed and written to OUT/results.md / results.json.

Every stage is an ordinary engine run a user can repeat with ``unipred fit text/...``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass
from itertools import product
from pathlib import Path

from unipred.base.threads import set_threads
from unipred.train.config import packaged_configs

CONFIGS = packaged_configs() / "text"
# Two read-outs of the frozen backbones: the mean over the tokens, and the last real token (in a
# causal model the only one that has seen the whole text). The last token won by 5-11 points on
# single words (the tuning set) and lost by 20-24 on cut man-page lines (held out): docs/text.md.
# A third: the mean of blocks 0-2 appended to the final norm's (features.concat, the text probe
# recipe's default), above the plain mean on both sets.
READOUTS = (("", ()), ("_last", ("features.pool=last",)), ("_concat", ("features.concat=0,1,2",)))


@dataclass
class Plan:
    pretrain_steps: int = 600  # batch 64
    labels: tuple[int, ...] = (20, 100)  # labelled records per class
    finetune_steps: int = 150  # batch 32, one epoch of data.repeat passes over the subset
    corpus_train: int = 2000  # records per class (all of them pretrain)
    corpus_test: int = 500


PLANS = {"full": Plan(), "quick": Plan(20, (3,), 8, 24, 8)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unipred demo text", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run (about a minute)")
    p.add_argument("--out", default="runs/demo_text", help="folder for runs and the table")
    p.add_argument("--corpus", default="wordlang", choices=("wordlang", "manlang", "generated"),
                   help="the data set (generated: stand-in text, no package needed)")  # fmt: skip
    p.add_argument("--labels", default="", help="labelled records per class, e.g. '20,100'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: the idle cores)")
    return p


def _data(corpus: str, plan: Plan, out: Path) -> tuple[list[str], str]:
    """Data overrides for every stage and a line naming the data (a missing package falls
    back to the generated text, said so)."""
    from unipred.tasks.text import corpora

    if corpus != "generated":
        try:
            corpora.SETS[corpus](out / "data" / corpus, plan.corpus_train, plan.corpus_test)
            return [f"data.corpus={corpus}", f"data.cache_dir={out / 'data'}",
                    f"data.corpus_train={plan.corpus_train}",
                    f"data.corpus_test={plan.corpus_test}"], corpus  # fmt: skip
        except FileNotFoundError as e:
            print(f"[text demo] {e}; using generated stand-in text", flush=True)
    n = plan.corpus_train
    return ["data.corpus=''", "data.generated_classes=8", f"data.generated_per_class={n}",
            f"data.generated_val_per_class={plan.corpus_test}"], "generated stand-in"  # fmt: skip


def _fit(config: str, overrides: list[str]) -> dict[str, float]:
    from unipred.train.config import load_config
    from unipred.train.engine import fit

    cfg = load_config(CONFIGS / config, overrides)
    trainer = fit(cfg, show_recipe=config == "pretrain.yaml")
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}


def _baseline(common: list[str], k: int) -> dict[str, float]:
    """The data source's own baselines (char n-gram naive Bayes) on the same k labels/class."""
    from unipred.base.registry import TASKS
    from unipred.train.config import load_config

    cfg = load_config(CONFIGS / "probe.yaml", [*common, f"data.labels_per_class={k}"])
    task = TASKS.get(cfg.task)(cfg)
    tr, _ = task.feature_dataset("train")
    te, _ = task.feature_dataset("val")
    return task.source.baseline_scores([tr[i] for i in range(len(tr))],
                                       [te[i] for i in range(len(te))])  # fmt: skip


def _raw_input(common: list[str], k: int, out: Path) -> dict[str, float]:
    """k-NN and linear probe on the raw input (the tokenizer's one-hot bytes, flattened)."""
    from unipred.protocols.baselines import run_raw
    from unipred.protocols.settings import parse_eval_settings
    from unipred.train.config import load_config

    cfg = load_config(CONFIGS / "probe.yaml", [*common, f"data.labels_per_class={k}", "ckpt=random",
                      f"run_dir={out / f'frozen_input_{k}'}"])  # fmt: skip
    rows = run_raw(cfg, parse_eval_settings(["ema=false"]), log=lambda s: None)
    # the flattened bytes (the pooled raw row, "input", reads the mean of the one-hot bytes)
    return {f"{r['protocol']}_input": r["top1"] for r in rows if r["weights"] == "input_flat"}


def run_budget(out: Path, plan: Plan, common: list[str], k: int, n_classes: int, ckpt: Path,
               t0: float) -> dict:  # fmt: skip
    """Every row of one label budget: fine-tunes, frozen probes, n-gram baseline (fractions)."""
    from unipred.protocols import frozen_eval

    row: dict[str, float] = {}
    # one epoch of about finetune_steps batches of 32, whatever the budget
    repeat = max(1, round(plan.finetune_steps * 32 / (k * n_classes)))
    ft = [f"data.labels_per_class={k}", f"data.repeat={repeat}", "trainer.max_epochs=1"]
    for name, extra in (("ft_nepa", [f"model.init=pretrain:{ckpt}"]), ("ft_scratch", [])):
        m = _fit("finetune.yaml", [*common, *ft, *extra, f"run_dir={out / f'{name}_{k}'}"])
        row[name] = m["val/acc1"]
    for (name, src), (suffix, readout) in product((("nepa", str(ckpt)), ("random", "random")),
                                                  READOUTS):  # fmt: skip
        rows = frozen_eval(CONFIGS / "probe.yaml", [*common, f"data.labels_per_class={k}",
                           f"run_dir={out / f'frozen_{name}{suffix}_{k}'}"], src,
                           ("knn", "linear"), readout, log=lambda s: None)  # fmt: skip
        row.update({f"{r['protocol']}_{name}{suffix}": r["top1"] for r in rows})
    row.update(_raw_input(common, k, out))
    row.update(_baseline(common, k))
    print(f"[text demo] {k} labels/class: " + ", ".join(f"{n} {v:.3f}" for n, v in row.items())
          + f"  [{time.time() - t0:.0f}s]", flush=True)  # fmt: skip
    return row


ROWS = (("ft_nepa", "NEPA-pretrained, fine-tuned"), ("ft_scratch", "from scratch, fine-tuned"),
        ("linear_nepa", "NEPA frozen, linear probe"), ("linear_random", "random init frozen, linear probe"),
        ("knn_nepa", "NEPA frozen, kNN"), ("knn_random", "random init frozen, kNN"),
        ("linear_nepa_last", "NEPA frozen, linear probe, last token"),
        ("linear_random_last", "random init frozen, linear probe, last token"),
        ("knn_nepa_last", "NEPA frozen, kNN, last token"),
        ("knn_random_last", "random init frozen, kNN, last token"),
        ("linear_nepa_concat", "NEPA frozen, linear probe, 4 blocks concatenated"),
        ("linear_random_concat", "random init frozen, linear probe, 4 blocks concatenated"),
        ("knn_nepa_concat", "NEPA frozen, kNN, 4 blocks concatenated"),
        ("knn_random_concat", "random init frozen, kNN, 4 blocks concatenated"),
        ("linear_input", "raw input (one-hot bytes), linear probe"),
        ("knn_input", "raw input (one-hot bytes), kNN"),
        ("char_ngram_nb", "character 1-3-gram naive Bayes"))  # fmt: skip


def results_table(rows: dict[int, dict], data: str, n_classes: int, n_test: int,
                  seconds: float, plan: Plan) -> str:  # fmt: skip
    """Markdown: a row per system, a column per label budget (test top-1)."""
    ks = sorted(rows)
    lines = ["| model | " + " | ".join(f"{k} labels / class" for k in ks) + " |",
             "|---|" + "---:|" * len(ks)]  # fmt: skip
    for key, label in ROWS:
        cells = [f"{100 * rows[k][key]:.1f} %" if key in rows[k] else "-" for k in ks]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append(
        f"\nTest top-1 on {n_test:,} held-out records ({data}, {n_classes} classes). "
        f"Pretraining {plan.pretrain_steps} steps x 64 records; fine-tuning about "
        f"{plan.finetune_steps} steps x 32. Total "
        f"{seconds / 60:.1f} min on {os.cpu_count()} CPUs."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; prints the table and writes OUT/results.md and results.json."""
    args = _parser().parse_args(argv)
    plan = PLANS["quick" if args.quick else "full"]
    if args.labels:
        plan = Plan(**{**asdict(plan), "labels": tuple(int(v) for v in args.labels.split(","))})
    warnings.filterwarnings("ignore", message=".*LeafSpec")
    out, t0 = Path(args.out), time.time()
    threads = set_threads(args.threads)
    common, data = _data(args.corpus, plan, out)
    common += [f"seed={args.seed}", "trainer.progress_bar=false"]
    from unipred.base.registry import TASKS
    from unipred.train.config import load_config

    cfg = load_config(CONFIGS / "probe.yaml", common)
    task = TASKS.get(cfg.task)(cfg)
    n_classes, n_test = task.num_classes(), len(task.feature_dataset("val")[0])
    print(f"[text demo] data: {data} ({n_classes} classes); plan: {plan}; {threads}", flush=True)
    _fit("pretrain.yaml", [*common, f"trainer.max_steps={plan.pretrain_steps}",
                           f"run_dir={out / 'pretrain'}"])  # fmt: skip
    ckpt = out / "pretrain" / "checkpoints" / "last.ckpt"
    print(f"[text demo] pretrained -> {ckpt}  [{time.time() - t0:.0f}s]", flush=True)
    rows = {k: run_budget(out, plan, common, k, n_classes, ckpt, t0) for k in plan.labels}
    seconds = time.time() - t0
    table = results_table(rows, data, n_classes, n_test, seconds, plan)
    print(table, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table + "\n")
    from unipred.protocols.report import percent_tree

    info = {"accuracy_pct": percent_tree({str(k): v for k, v in rows.items()}),
            "units": {"accuracy_pct": "percent (top-1)"}, "plan": asdict(plan),
            "data": data, "seconds": seconds, "threads": str(threads)}  # fmt: skip
    (out / "results.json").write_text(json.dumps(info, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
