"""What the engine adds to the image demo's pretraining step: CPU ms per step of the demo's
pretraining through ``fit`` against a bare loop over the same model, data and optimiser,
alternating in one process at one torch thread.

    .venv/bin/python -P benchmarks/demo_overhead.py --steps 60 --rounds 3

"engine": ``fit`` of configs/demo/fmnist_pretrain.yaml (Lightning, bf16-mixed, fused AdamW,
clipping, the demo's logging and collapse monitor), per-step CPU time taken between
consecutive ``on_train_batch_end`` calls. "bare": ``task.build_model()`` and the task's own
training loader (shift + flip), ``torch.autocast`` bf16, fused AdamW with the same
hyper-parameters, ``clip_grad_norm_``; the same per-step CPU time, loader included. CPU
time (``time.process_time``) is what survives a shared machine; the first ``--warmup`` steps
of every run are dropped. Prints one line per run and the medians' ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def engine(cfg, steps: int, warmup: int) -> list[float]:
    import lightning as L

    from unipred.train.engine import fit

    class Clock(L.Callback):
        def __init__(self):
            self.t: list[float] = []

        def on_train_batch_end(self, *args):
            self.t.append(time.process_time())

    clock = Clock()
    fit(cfg, callbacks=[clock], show_recipe=False)
    t = clock.t[warmup:]
    return [1e3 * (b - a) for a, b in zip(t, t[1:])]


def bare(cfg, steps: int, warmup: int) -> list[float]:
    import torch

    from unipred.base.registry import TASKS
    from unipred.data.loader import build_loader

    task = TASKS.get(cfg.task)(cfg)
    torch.manual_seed(0)
    model = task.build_model()
    o = cfg.optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas),
                            weight_decay=o.weight_decay, fused=True)  # fmt: skip
    loader = build_loader(task.build_dataset("train"), cfg.trainer.global_batch, 1, 0, 1, 0,
                          True, 0, task.collate_fn("train"))  # fmt: skip
    t, n = [time.process_time()], 0
    model.train()
    while n < steps:
        for batch in loader:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss, _ = task.training_step(model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            t.append(time.process_time())
            n += 1
            if n == steps:
                break
    t = t[warmup + 1 :]
    return [1e3 * (b - a) for a, b in zip(t, t[1:])]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--out", default="/tmp/demo_overhead")
    a = ap.parse_args()

    from unipred.tasks.image.fmnist_data import has_fashion_mnist

    from unipred.base.threads import set_threads
    from unipred.train.config import load_config, packaged_configs

    print(set_threads(1), flush=True)
    root = a.data if has_fashion_mnist(a.data) else ""
    res: dict[str, list[float]] = {"engine": [], "bare": []}
    for r in range(a.rounds):
        for mode in ("engine", "bare") if r % 2 == 0 else ("bare", "engine"):
            cfg = load_config(packaged_configs() / "demo/fmnist_pretrain.yaml",
                              [f"run_dir={a.out}/{mode}_{r}", f"trainer.max_steps={a.steps}",
                               f"data.root={root}" if root else "data.root=''",
                               "trainer.progress_bar=false", "seed=0"])  # fmt: skip
            ms = (engine if mode == "engine" else bare)(cfg, a.steps, a.warmup)
            med = statistics.median(ms)
            res[mode].append(med)
            print(f"round {r} {mode}: median CPU ms/step {med:.1f} ({len(ms)} steps), "
                  f"{128e3 / med:.0f} images/s per thread, load {os.getloadavg()[0]:.1f}",
                  flush=True)  # fmt: skip
    ratio = [e / b for e, b in zip(res["engine"], res["bare"])]
    print(json.dumps({"cpu_ms_per_step": res, "engine_over_bare": [round(x, 3) for x in ratio],
                      "median_ratio": round(statistics.median(ratio), 3)}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
