"""Objective switches of the text recipe, one pretraining each: collapse monitor and frozen probes.

    python benchmarks/text_switches.py NAME [key=value ...] [--corpus wordlang]
        [--labels 20,100] [--steps 600] [--out runs/text_switches] [--ckpt CKPT]
        [--probe KEY=V ...]

(the overrides may also follow the options)

Pretrains ``configs/text/pretrain.yaml`` with the given overrides (``model.*`` overrides also
go to the probes, so a tokenizer change is the same model there), records the collapse
monitor's warnings after the warm-up, then runs the frozen k-NN and linear probe
(``unipred.protocols.frozen_eval`` on ``configs/text/probe.yaml``) at each label budget on the
checkpoint and on the random-init network of the same config, and the character n-gram naive
Bayes on the same labelled words. ``--ckpt`` skips the pretraining (a probe read-out switch
on a checkpoint already made); ``--probe`` passes evaluation settings to the frozen protocols
(``features.pool=last``, ``features.block=-2``). One JSON line per run is appended to
OUT/results.jsonl.
docs/text.md lists what was measured with it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import warnings
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("name")
    p.add_argument("--corpus", default="wordlang")
    p.add_argument("--labels", default="20,100")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--out", default="runs/text_switches")
    p.add_argument("--cache", default="")
    p.add_argument("--ckpt", default="", help="probe this checkpoint: no pretraining")
    p.add_argument("--probe", action="append", default=[], help="an eval setting, KEY=V")
    p.add_argument("overrides", nargs="*")
    a = p.parse_intermixed_args(argv)  # overrides before or after the options

    from unipred.base.registry import TASKS
    from unipred.base.threads import set_threads
    from unipred.protocols import frozen_eval
    from unipred.train.config import load_config, packaged_configs

    set_threads(1)
    warnings.filterwarnings("ignore", message=".*LeafSpec")
    conf = packaged_configs() / "text"
    run = Path(a.out) / a.name
    if run.exists() and not a.ckpt.startswith(str(run)):
        shutil.rmtree(run)
    data = [f"data.corpus={a.corpus}"] + ([f"data.cache_dir={a.cache}"] if a.cache else [])
    model = [o for o in a.overrides if o.startswith("model.") and ".objective." not in o]
    res = {"name": a.name, "corpus": a.corpus, "overrides": a.overrides, "probe": a.probe}
    ckpt = a.ckpt or pretrain(a, conf, run, data, res)
    for k in [int(v) for v in a.labels.split(",")]:
        ov = [*data, *model, f"data.labels_per_class={k}", f"run_dir={run / f'probe{k}'}"]
        for which, src in (("nepa", ckpt), ("random", "random")):
            rows = frozen_eval(
                conf / "probe.yaml", ov, src, ("knn", "linear"), a.probe, log=lambda s: 0
            )
            for r in rows:
                res[f"{r['protocol']}_{which}_{k}"] = round(100 * r["top1"], 1)
        pcfg = load_config(conf / "probe.yaml", ov)
        task = TASKS.get(pcfg.task)(pcfg)
        tr, _ = task.feature_dataset("train")
        te, _ = task.feature_dataset("val")
        scores = task.source.baseline_scores([tr[i] for i in range(len(tr))],
                                             [te[i] for i in range(len(te))])  # fmt: skip
        res.update({f"{n}_{k}": round(100 * v, 1) for n, v in scores.items()})
    Path(a.out).mkdir(parents=True, exist_ok=True)
    with open(Path(a.out) / "results.jsonl", "a") as f:
        f.write(json.dumps(res) + "\n")
    print(json.dumps(res))
    return 0


def pretrain(a, conf: Path, run: Path, data: list[str], res: dict) -> str:
    """Pretrain with the overrides; the collapse monitor's record into ``res``; the ckpt path."""
    from unipred.train.config import load_config
    from unipred.train.engine import fit

    cfg = load_config(conf / "pretrain.yaml", [*data, *a.overrides, f"run_dir={run / 'pt'}",
                      f"trainer.max_steps={a.steps}", "trainer.progress_bar=false"])  # fmt: skip
    t0 = time.time()
    trainer = fit(cfg)
    pt_seconds = time.time() - t0
    mon = next(c for c in trainer.callbacks if type(c).__name__ == "CollapseMonitor")
    warm = int(cfg.optim.warmup_ratio * a.steps)
    late = [h for h in mon.history if h["step"] > warm]
    spreads = [min(v for k, v in h.items() if k.endswith("spread")) for h in late]
    res.update({"steps": a.steps, "pretrain_seconds": round(pt_seconds),
                **json.loads((run / "pt" / "results.json").read_text())["metrics"],
                "collapse_checks_after_warmup": len(late),
                "collapse_warnings_after_warmup": sum(1 for s in spreads if s < 0.1),
                "min_spread_after_warmup": round(min(spreads, default=float("nan")), 3)})  # fmt: skip
    return str(run / "pt" / "checkpoints" / "last.ckpt")


if __name__ == "__main__":
    raise SystemExit(main())
