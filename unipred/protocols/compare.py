"""``unipred compare``: a pretrained backbone against its baselines, per label budget and seed.

    unipred compare [key=value ...] [--pretrain-config small/pretrain]
                    [--finetune-config small/finetune] [--probe-config small/probe]
                    [--ckpt CKPT] [--labels 10,20] [--seeds 0,1,2] [--out runs/compare]
                    [--jobs 1] [--frozen-only] [--set-pretrain K=V] [--set-finetune K=V]
                    [--set-probe K=V]

For any registered data source (the configs name it; ``key=value`` overrides such as
``data.root=DIR/train data.val_root=DIR/val`` go to every run):

1. one NEPA pretraining with ``--pretrain-config`` (skipped with ``--ckpt``);
2. for every label budget K (``data.labels_per_class``) and seed S (the fine-tune's run seed,
   the probe's ``seed`` and ``data.subset_seed``: each seed draws its own labelled subset, so
   the spread includes which samples carry labels; the random-init backbone is the config's
   seed, one network for every S): a fine-tune from the checkpoint and one from scratch
   (``--finetune-config``), and ``unipred evaluate-suite --probe-config protocols=knn,linear``,
   which gives the frozen k-NN and linear probe of the checkpoint, of the random-init backbone
   of the same config and of the raw input, plus the data source's own baselines
   (``DataSource.baseline_scores``);
3. one table, a row per budget, a column per system, mean over the seeds with min-max:
   ``OUT/results.md`` and ``OUT/results.json`` (percentages in both).

Every run is a ``unipred`` subprocess with its log beside its folder; a finished run is reused
(delete its folder to rerun), so an interrupted comparison continues where it stopped.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from unipred.protocols.report import read_results

# (column key, heading): fine-tunes first, then the frozen protocols of each weight set
FINETUNE = (("ft_nepa", "NEPA fine-tune"), ("ft_scratch", "scratch fine-tune"))
# raw input: the patches through the backbone's read-out ("input"), and flattened ("input_flat")
FROZEN = (
    ("knn_raw", "NEPA k-NN"), ("knn_random", "random-init k-NN"), ("knn_input", "raw-input k-NN"),
    ("knn_input_flat", "raw-input k-NN, flattened"),
    ("linear_raw", "NEPA linear"), ("linear_random", "random-init linear"),
    ("linear_input", "raw-input linear"), ("linear_input_flat", "raw-input linear, flattened"),
)  # fmt: skip


class CompareError(ValueError):
    """A run of the comparison failed or left no result; the message names its log."""


def last_val_acc(run: Path) -> float | None:
    """``val/acc1`` of the last validation in RUN/logs/version_0/metrics.csv (None if absent)."""
    path = run / "logs" / "version_0" / "metrics.csv"
    if not path.is_file():
        return None
    with open(path) as f:
        vals = [r["val/acc1"] for r in csv.DictReader(f) if r.get("val/acc1")]
    return float(vals[-1]) if vals else None


def frozen_scores(folder: Path) -> dict[str, float]:
    """{column key: top-1 fraction} from an evaluate-suite ``results.json``: ``knn_raw``,
    ``linear_random``, ``linear_input``, ... and the source's baselines by their names."""
    rows = read_results(folder / "results.json")["rows"]  # percent or (older) fractions
    out = {}
    for r in rows:
        key = r["protocol"] if r["weights"] == "data" else f"{r['protocol']}_{r['weights']}"
        out[key] = float(r["top1"])
    return out


def _unipred(*args: str) -> list[str]:
    return [sys.executable, "-m", "unipred.cli", *args]


def _run(cmd: list[str], folder: Path) -> float:
    """Run ``cmd`` (output to FOLDER.log) unless FOLDER.done exists; seconds taken."""
    done = folder.with_name(folder.name + ".done")
    if done.exists():
        return 0.0
    folder.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    log = folder.with_name(folder.name + ".log")
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        tail = log.read_text().strip().splitlines()[-1:]
        raise CompareError(f"{folder.name}: exit {rc}: {tail[0] if tail else ''} (see {log})")
    done.touch()
    return time.time() - t0


def _cell(values: list[float]) -> dict:
    pct = [round(100 * v, 2) for v in values]
    return {"mean": round(sum(pct) / len(pct), 2), "min": min(pct), "max": max(pct), "seeds": pct}


def table(rows: dict, columns: list[tuple[str, str]]) -> str:
    """Markdown: a row per label budget, mean % (min-max over the seeds) per column."""
    lines = ["| labels per class | " + " | ".join(h for _, h in columns) + " |",
             "|---:|" + "---:|" * len(columns)]  # fmt: skip
    for k, row in rows.items():
        cells = []
        for key, _ in columns:
            c = row.get(key)
            if c is None:
                cells.append("-")
                continue
            spread = f" ({c['min']:.1f}-{c['max']:.1f})" if len(c["seeds"]) > 1 else ""
            cells.append(f"{c['mean']:.1f} %{spread}")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare(a: argparse.Namespace, log=print) -> dict:
    """Pretrain (unless ``a.ckpt``), then every (budget, seed); write OUT/results.{md,json}."""
    out = Path(a.out)
    timing: dict[str, float] = {}
    ckpt = a.ckpt
    if not ckpt:
        folder = out / "pretrain"
        cmd = _unipred("fit", a.pretrain_config, *a.overrides, *a.set_pretrain,
                       f"run_dir={folder}", "trainer.progress_bar=false")  # fmt: skip
        log(f"pretraining: {' '.join(cmd[3:])}", flush=True)
        timing["pretrain"] = _run(cmd, folder)
        ckpt = str(folder / "checkpoints" / "last.ckpt")
    jobs = []
    for seed in a.seeds:  # every budget of a seed first: a cut-short run has whole rows
        for k in a.labels:
            common = [*a.overrides, f"data.labels_per_class={k}", f"data.subset_seed={seed}",
                      f"seed={seed}"]  # fmt: skip
            tunes = (("ft_nepa", [f"model.init=pretrain:{ckpt}"]), ("ft_scratch", []))
            for name, extra in tunes if not a.frozen_only else ():
                folder = out / f"{name}_{k}_s{seed}"
                cmd = _unipred("fit", a.finetune_config, *common, *a.set_finetune, *extra,
                               f"run_dir={folder}", "trainer.progress_bar=false")  # fmt: skip
                jobs.append((cmd, folder))
            folder = out / f"frozen_{k}_s{seed}"
            cmd = _unipred("evaluate-suite", a.probe_config, *common, *a.set_probe,
                           f"ckpt={ckpt}", "protocols=knn,linear", "ema=false",
                           f"out={folder}", f"run_dir={folder}")  # fmt: skip
            jobs.append((cmd, folder))

    def one(job):
        cmd, folder = job
        return folder, _run(cmd, folder)

    with ThreadPoolExecutor(max(1, a.jobs)) as pool:
        for folder, sec in pool.map(one, jobs):
            timing[folder.name] = round(sec, 1)
            log(f"{folder.name}: done ({sec:.0f} s)", flush=True)
    rows: dict[int, dict] = {}
    extra_cols: list[str] = []
    for k in a.labels:
        per: dict[str, list[float]] = {}
        for seed in a.seeds:
            for name, _ in FINETUNE if not a.frozen_only else ():
                acc = last_val_acc(out / f"{name}_{k}_s{seed}")
                if acc is None:
                    raise CompareError(
                        f"{out / f'{name}_{k}_s{seed}'}: no val/acc1 logged: the fine-tuning "
                        "recipe must validate at its end (trainer.max_epochs, the csv logger)"
                    )
                per.setdefault(name, []).append(acc)
            for key, v in frozen_scores(out / f"frozen_{k}_s{seed}").items():
                per.setdefault(key, []).append(v)
                if key not in dict(FROZEN) and key not in extra_cols:
                    extra_cols.append(key)
        rows[k] = {key: _cell(v) for key, v in per.items()}
    columns = [*(FINETUNE if not a.frozen_only else ()), *FROZEN, *((c, c) for c in extra_cols)]
    md = table(rows, columns)
    result = {"ckpt": ckpt, "pretrain_config": a.pretrain_config, "finetune_config":
              a.finetune_config, "probe_config": a.probe_config, "overrides": a.overrides,
              "labels": a.labels, "seeds": a.seeds, "units": "percent top-1",
              "columns": dict(columns), "rows": rows, "seconds": timing}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    head = (f"Checkpoint `{ckpt}`; fine-tune `{a.finetune_config}`, frozen protocols on "
            f"`{a.probe_config}`; overrides `{' '.join(a.overrides)}`; seeds {a.seeds} "
            "(fine-tune run seed, probe seed and label subset); top-1, mean (min-max).\n\n")  # fmt: skip
    (out / "results.md").write_text(head + md)
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    log("\n" + md + f"\nwrote {out / 'results.md'} and {out / 'results.json'}")
    return result


def _ints(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give integers separated by commas") from None
    if not vals:
        raise argparse.ArgumentTypeError("give at least one value")
    return vals


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="unipred compare",
        description="NEPA fine-tune vs scratch and NEPA frozen (k-NN, linear) vs random init "
        "vs raw input, per label budget and seed (docs/evaluation.md).",
    )
    p.add_argument("overrides", nargs="*", help="key=value for every run (data.root=... etc.)")
    p.add_argument("--pretrain-config", default="small/pretrain")
    p.add_argument("--finetune-config", default="small/finetune")
    p.add_argument("--probe-config", default="small/probe",
                   help="classification config of the frozen protocols (the attention the "
                   "backbone was pretrained with)")  # fmt: skip
    p.add_argument("--ckpt", default="", help="a pretraining checkpoint: no pretraining run")
    p.add_argument("--labels", type=_ints, default=[10, 20], help="label budgets, e.g. 10,20")
    p.add_argument("--seeds", type=_ints, default=[0, 1, 2])
    p.add_argument("--out", default="runs/compare", help="run folders and the results")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--frozen-only", action="store_true", help="no fine-tuning runs")
    p.add_argument("--set-pretrain", action="append", default=[], metavar="K=V")
    p.add_argument("--set-finetune", action="append", default=[], metavar="K=V")
    p.add_argument("--set-probe", action="append", default=[], metavar="K=V")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_intermixed_args(argv)  # key=value after the options too
    bad = [o for o in a.overrides + a.set_pretrain + a.set_finetune + a.set_probe if "=" not in o]
    if bad:
        print(f"unipred compare: error: {bad[0]!r} is not key=value", file=sys.stderr)
        return 2
    if a.ckpt and not os.path.exists(a.ckpt):
        print(f"unipred compare: error: --ckpt {a.ckpt}: no such file", file=sys.stderr)
        return 2
    try:
        compare(a, log=print)
    except CompareError as e:
        print(f"unipred compare: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
