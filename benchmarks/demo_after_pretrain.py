"""The image demo's stages after pretraining, as ``unipred demo image`` runs them
(``run_groups``: fine-tunes, frozen protocols, raw input), on an existing pretraining
checkpoint: per-stage wall and CPU seconds, the accuracies and the frozen table.

    mkdir -p OUT/pretrain/checkpoints && cp RUN/pretrain/checkpoints/last.ckpt OUT/pretrain/checkpoints/
    .venv/bin/python -P benchmarks/demo_after_pretrain.py OUT on 2     # 2 processes x 1 thread
    .venv/bin/python -P benchmarks/demo_after_pretrain.py OUT off 2    # one after the other, 2 threads

Arguments: the output folder (holding pretrain/checkpoints/last.ckpt), ``--parallel``
(on / off / auto) and ``--threads``. Writes OUT/after_pretrain.json. The full plan, seed 0,
Debian's Fashion-MNIST. Lets the stages be timed without the 4,000 pretraining steps.
"""

from __future__ import annotations

import json
import os
import sys
import time
from argparse import Namespace
from pathlib import Path


def main() -> int:
    from unipred.tasks.image.demo import Demo, Plan, _quiet, cpu_total, data_root, run_groups

    from unipred.base.threads import set_threads
    from unipred.protocols import comparison_markdown

    out, parallel, threads = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    _quiet()
    print(set_threads(threads), flush=True)
    t0, load0 = time.time(), os.getloadavg()[0]
    demo = Demo(out, Plan(), data_root(""), 0)
    ckpt = out / "pretrain" / "checkpoints" / "last.ckpt"
    groups = [[("finetune", "finetune_nepa", ckpt), ("frozen", "frozen_nepa", ckpt)],
              [("finetune", "finetune_scratch", None), ("frozen", "frozen_random", "random"),
               ("raw", "frozen_raw", None)]]  # fmt: skip
    res = run_groups(demo, groups, Namespace(threads=threads, parallel=parallel))
    raw = res["frozen_raw"]
    frozen = {"NEPA": res["frozen_nepa"], "random init": res["frozen_random"],
              "raw input": [r for r in raw if r["weights"] == "input"],
              "raw input, flattened": [r for r in raw if r["weights"] == "input_flat"]}  # fmt: skip
    print(f"fine-tune: NEPA {100 * res['finetune_nepa']:.1f} %, "
          f"scratch {100 * res['finetune_scratch']:.1f} %")  # fmt: skip
    print(comparison_markdown(frozen))
    info = {"layout": demo.layout, "wall_s": time.time() - t0, "cpu_total_s": cpu_total(),
            "seconds": demo.times, "cpu_seconds": demo.cpu,
            "load_average": [load0, os.getloadavg()[0]],
            "finetune": {k: res[k] for k in ("finetune_nepa", "finetune_scratch")},
            "frozen": {k: [{f: r[f] for f in ("protocol", "top1", "seconds")} for r in v]
                       for k, v in frozen.items()}}  # fmt: skip
    print(json.dumps(info, indent=1, default=str))
    (out / "after_pretrain.json").write_text(json.dumps(info, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":  # the stage processes (spawn) import this file: keep the guard
    sys.exit(main())
