"""The image demo's pretraining through the engine, before and after issue #27's CPU changes,
alternating in one process (one torch thread).

    .venv/bin/python -P benchmarks/demo_engine_ab.py --steps 150 --rounds 2

"old" restores the previous paths in-process (SDPA's math kernel for CPU bf16 attention,
per-sample seeding of the Fashion-MNIST reads); "new" is the default. Each run is an ordinary
``fit`` of configs/demo/fmnist_pretrain.yaml for ``--steps`` steps (seed 0, Fashion-MNIST from
``--data``, generated stand-in images when it is missing). Prints one line per run: process CPU
seconds of the whole fit (setup included), wall seconds, the median logged step time, and the
1-minute load average; then the JSON of all runs. CPU time is the figure that survives a
shared machine; the order alternates per round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--out", default="/tmp/demo_engine_ab")
    a = ap.parse_args()

    from unipred.tasks.image.demo_plots import read_metrics
    from unipred.tasks.image.fashion_mnist import ArrayImages
    from unipred.tasks.image.fmnist_data import has_fashion_mnist

    import unipred.nn.predictor as predictor
    from unipred.base.threads import set_threads
    from unipred.train.config import load_config, packaged_configs
    from unipred.train.engine import fit

    print(set_threads(1), flush=True)
    root = a.data if has_fashion_mnist(a.data) else ""
    res: dict[str, list[dict]] = {"old": [], "new": []}
    for r in range(a.rounds):
        for mode in ("old", "new") if r % 2 == 0 else ("new", "old"):
            predictor.CPU_ATTENTION = "math" if mode == "old" else "explicit"
            ArrayImages.per_sample_random = mode == "old"
            run = f"{a.out}/{mode}_{r}"
            cfg = load_config(packaged_configs() / "demo/fmnist_pretrain.yaml",
                              [f"run_dir={run}", f"trainer.max_steps={a.steps}",
                               f"data.root={root}" if root else "data.root=''",
                               "trainer.progress_bar=false", "seed=0"])  # fmt: skip
            c0, w0 = time.process_time(), time.time()
            fit(cfg, show_recipe=False)
            cpu, wall = time.process_time() - c0, time.time() - w0
            steps = [m["perf/step_s"] for m in read_metrics(run) if "perf/step_s" in m]
            rec = {"cpu_s": round(cpu, 1), "wall_s": round(wall, 1),
                   "median_step_s": round(statistics.median(steps[1:] or steps or [0.0]), 4),
                   "load": round(os.getloadavg()[0], 1)}  # fmt: skip
            res[mode].append(rec)
            print(mode, rec, flush=True)
    predictor.CPU_ATTENTION, ArrayImages.per_sample_random = "explicit", False
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
