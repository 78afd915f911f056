"""What keeping ranks in step costs (unipred.data.uneven): the one all-reduce of two integers
that every training batch of a stream on several ranks adds, beside a DDP training step of
nepa_debug (forward, backward with its gradient all-reduce, AdamW step) on the same ranks.
Two gloo ranks on this host (CPU), alternating the two measurements in each rank:

    PYTHONSAFEPATH=1 .venv/bin/python benchmarks/uneven_ranks.py [--batch 8] [--rounds 5]
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time


def rank_main(rank: int, world: int, port: str, batch: int, rounds: int) -> None:
    import torch
    import torch.distributed as dist

    from unipred.nn.model import NEPA

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(NEPA.from_name("nepa_debug"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = model.module.tokenizer.example_input(batch)
    counts = torch.tensor([batch, 0], dtype=torch.int64)

    def step():
        opt.zero_grad()
        model(x).loss.backward()
        opt.step()

    def join():
        c = counts.clone()
        dist.all_reduce(c)
        c.tolist()

    for _ in range(3):
        step()
    res = {"join_us": [], "step_ms": []}
    for _ in range(rounds):
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(200):
            join()
        res["join_us"].append((time.perf_counter() - t0) / 200 * 1e6)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(5):
            step()
        res["step_ms"].append((time.perf_counter() - t0) / 5 * 1e3)
    if rank == 0:
        print(json.dumps(res))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8, help="samples per rank and step")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rank", type=int, default=-1, help=argparse.SUPPRESS)
    ap.add_argument("--port", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.rank >= 0:
        rank_main(a.rank, 2, a.port, a.batch, a.rounds)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, __file__, "--batch", str(a.batch), "--rounds", str(a.rounds),
            "--port", port]  # fmt: skip
    procs = [subprocess.Popen([*args, "--rank", str(r)], env=env, stdout=subprocess.PIPE,
                              text=True) for r in range(2)]  # fmt: skip
    out = procs[0].communicate()[0]
    procs[1].wait()
    res = json.loads(out.strip().splitlines()[-1])
    join_us = sorted(res["join_us"])[len(res["join_us"]) // 2]
    step_ms = sorted(res["step_ms"])[len(res["step_ms"]) // 2]
    print(
        f"2 gloo ranks, nepa_debug, {a.batch} per rank: all-reduce of two integers "
        f"{join_us:.0f} us (median of {a.rounds} rounds of 200), DDP step {step_ms:.1f} ms "
        f"(median of {a.rounds} rounds of 5): {join_us / 1e3 / step_ms * 100:.2f} % of a step"
    )


if __name__ == "__main__":
    main()
