"""Is bfloat16 fast on this CPU? What ``trainer.cpu_bf16=auto`` decides here, and the matmul
timings behind the decision.

    .venv/bin/python -P benchmarks/cpu_bf16.py [--threads 1] [--reps 10]

Prints one JSON line: whether oneDNN reports bf16 kernels (``unipred.train.machine.
cpu_bf16_is_slow``, the check the engine uses), torch's CPU capability, and the median
milliseconds of a (3200 x 192) @ (192 x 768) matmul — one MLP layer of the small recipe's
model over a batch of 128 x 25 tokens — in fp32, in bf16, and in fp32 under bf16 autocast
(what ``trainer.precision=bf16-mixed`` runs). Where bf16 is the slower one, bf16 recipes run
as 32-true unless ``trainer.cpu_bf16=keep``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def _ms(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return round(statistics.median(times), 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    import torch

    from unipred.train.machine import cpu_bf16_is_slow

    torch.set_num_threads(args.threads)
    a, w = torch.randn(3200, 192), torch.randn(192, 768)
    ab, wb = a.bfloat16(), w.bfloat16()

    def autocast():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return a @ w

    fp32 = _ms(lambda: a @ w, args.reps)
    bf16 = _ms(lambda: ab @ wb, args.reps)
    auto = _ms(autocast, args.reps)
    print(
        json.dumps(
            {
                "torch": torch.__version__,
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "threads": args.threads,
                "onednn_bf16": not cpu_bf16_is_slow(),
                "matmul_ms": {"fp32": fp32, "bf16": bf16, "bf16_autocast": auto},
                "bf16_over_fp32": round(auto / fp32, 2),
                "cpu_bf16_auto_runs": "32-true" if cpu_bf16_is_slow() else "bf16 as written",
            }
        )
    )


if __name__ == "__main__":
    main()
