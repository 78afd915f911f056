"""The image demo's attentive probe on a pretraining checkpoint, the previous pool (every token
projected to a key and a value, then SDPA: ``AttentiveProbe.pool_reference``) against the
current one (projections moved past the softmax), alternating, seeds 0 and 1, one thread:
top-1 and the seconds of the probe, and the stage's CPU and wall seconds (feature pass
included). Usage: python -P benchmarks/attentive_ab.py CKPT  (Fashion-MNIST installed)."""

import sys
import time

import torch
from unipred.tasks.image.demo import CONFIGS, data_root

from unipred.protocols import frozen_eval
from unipred.protocols.attentive import AttentiveProbe


def main(ckpt: str) -> None:
    torch.set_num_threads(1)
    new_pool = AttentiveProbe.pool
    for seed in (0, 1):
        for name, pool in (("old", AttentiveProbe.pool_reference), ("new", new_pool)):
            AttentiveProbe.pool = pool
            c0, t0 = time.process_time(), time.time()
            rows = frozen_eval(
                CONFIGS / "fmnist_probe.yaml",
                [f"data.root={data_root('')}", f"seed={seed}", "trainer.progress_bar=false",
                 "run_dir=runs/attentive_ab"],
                ckpt, ("attentive",), ["attentive.epochs=10", f"seed={seed}"],
                log=lambda line: print(" ", line, flush=True), recipe_defaults=True,
            )  # fmt: skip
            r = rows[0]
            print(f"seed {seed} {name}: top1 {100 * r['top1']:.2f} % probe {r['seconds']:.1f} s "
                  f"wall; stage CPU {time.process_time() - c0:.1f} s wall "
                  f"{time.time() - t0:.1f} s", flush=True)  # fmt: skip
    AttentiveProbe.pool = new_pool


if __name__ == "__main__":
    main(sys.argv[1])
