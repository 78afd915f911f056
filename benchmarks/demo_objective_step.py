"""The image demo's pretraining step in its shipped layout (2 DDP processes x 1 thread, gloo):
the objective ``model.objective.auto`` picks (shipped) against the release objective
(``model.objective.auto=false``), two alternating rounds of STEPS steps each on the demo's
data; the median ``perf/step_s`` of the logged steps after step 20 (issue #27).

    .venv/bin/python -P benchmarks/demo_objective_step.py 100
"""

from __future__ import annotations

import csv
import statistics
import sys
import tempfile
from pathlib import Path


def main(argv: list[str]) -> int:
    from unipred.tasks.image.demo import Demo, Plan, data_root

    steps = int(argv[0]) if argv else 100
    if steps < 40:  # steps are logged every 10; the median reads those after step 20
        sys.exit(f"STEPS={steps}: give at least 40")
    res: dict[str, list[float]] = {}
    order = [("auto", []), ("release", ["model.objective.auto=false"])]
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(2):
            for name, extra in order if rnd == 0 else order[::-1]:
                out = Path(tmp) / f"{name}{rnd}"
                d = Demo(out, Plan(pretrain_steps=steps), data_root(""), 0)
                d.common += extra
                d.pretrain(ranks=2)
                with open(next(out.rglob("metrics.csv"))) as f:
                    rows = [r for r in csv.DictReader(f)
                            if r.get("perf/step_s") and int(r["step"]) > 20]  # fmt: skip
                st = statistics.median(float(r["perf/step_s"]) for r in rows)
                res.setdefault(name, []).append(st)
                print(f"round {rnd} {name}: median step {st:.3f} s, stage wall "
                      f"{d.times['pretrain']:.0f} s", flush=True)  # fmt: skip
    ratios = [round(r / a, 3) for r, a in zip(res["release"], res["auto"])]
    print({k: [round(x, 3) for x in v] for k, v in res.items()}, "release/auto per step:", ratios)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
