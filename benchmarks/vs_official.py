"""ViT-B/14 CPU training step, ours vs the official NEPA code, alternating in one process.

Both models are built in this interpreter (so it needs the official code's transformers
4.56.2 beside torch; benchmarks/README.md says how) and fed the same batch. Each round times
one step of each, in alternating order, so a slow phase of a shared machine hits both alike;
the figure that matters is the median of the per-round ratios official / ours (> 1: ours is
faster). A step is forward + loss + backward, plus the optimizer step with ``--optimizer``
(torch AdamW: ``fused`` / ``foreach`` for both, or ``own``: each code's own choice, unipred's
fused kernel and the release's ``--optim adamw_torch``, torch's default kernel). ``--apart`` adds a third contender: ours with
``unipred.nn.predictor.FUSED_QK = False`` (q and k normed and rotated apart, LayerScale and
residual as two ops: the path before issue #27's fusion), so the gain of that fusion is
measured in the same rounds. ``--compile`` sets how ours runs, as ``trainer.compile`` does in the
engine (default ``auto``: what a CPU training run of the shipped recipe gets; for ViT-B/14 each
predictor block compiled by inductor, unipred/train/compiling.py); ``--eager`` adds ours
uncompiled as a further contender. The first (warm-up) step of each contender is timed apart:
it holds the compilation (from inductor's caches when an earlier run filled them), and the
printed break-even is how many steps ours needs to win that time back from the official code.

    /tmp/offvenv/bin/python benchmarks/vs_official.py --official /tmp/nepa_official \\
        --batch 8 --precision fp32 bf16 --rounds 6 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import BenchConfig, build  # noqa: E402  (benchmarks/ is not a package)


def _stepper(impl: str, args, precision: str):
    """A closure running one training step of ``impl`` at ``precision``; and its model."""
    import torch

    import unipred.nn.predictor as P

    fused = impl != "ours_apart"
    compile_setting = "false" if impl in ("ours_apart", "ours_eager") else args.compile
    impl = "ours" if impl.startswith("ours") else impl
    cfg = BenchConfig(model=args.model, batch=args.batch, res=args.res, impl=impl,
                      official=args.official, precision=precision)  # fmt: skip
    torch.manual_seed(0)
    model, loss_fn, mcfg = build(cfg)
    model.train()
    if impl == "ours":
        from unipred.train import compiling

        # the run's precision as the engine passes it: `auto` compiles bf16 runs only
        run_precision = "bf16-mixed" if precision == "bf16" else "32-true"
        mode, why = compiling.choose(compile_setting, "cpu", model, None, precision=run_precision)
        print(f"ours ({precision}): {compiling.describe(mode, why, model)}", flush=True)
        compiling.apply(model, mode)
    opt = None
    if args.optimizer == "own":  # as each code trains: unipred's fused AdamW (optim.fused
        # default), the release's `--optim adamw_torch` (HF: torch AdamW, default kernel)
        kind = {"fused": True} if impl == "ours" else {}
    elif args.optimizer:
        kind = {"fused": {"fused": True}, "foreach": {"foreach": True}}[args.optimizer]
    if args.optimizer:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **kind)
    amp = precision == "bf16"

    def step(x):
        P.FUSED_QK = fused
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(model, x)
        loss.backward()
        P.FUSED_QK = True
        if opt is not None:
            opt.step()
        model.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step, mcfg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--official", required=True, help="checkout of github SihanXU/nepa")
    p.add_argument("--model", default="nepa_vit_b14")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--optimizer", choices=["fused", "foreach", "own"], default=None,
                   help="add an AdamW step; own: each code's (ours fused, official default)")  # fmt: skip
    p.add_argument("--apart", action="store_true", help="also time ours with FUSED_QK off")
    p.add_argument("--compile", default="auto", help="ours as trainer.compile=VALUE (engine)")
    p.add_argument("--eager", action="store_true", help="also time ours uncompiled")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "args": vars(args)}
    for prec in args.precision:
        impls = ("ours", "official") + (("ours_apart",) if args.apart else ())
        impls += ("ours_eager",) if args.eager else ()
        steps = {impl: _stepper(impl, args, prec)[0] for impl in impls}
        torch.manual_seed(1)
        x = torch.randn(args.batch, 3, args.res, args.res)
        first = {impl: 0.0 for impl in impls}  # warm-up wall s: compilation lands here
        for _ in range(args.warmup):
            for impl in steps:
                t0 = time.perf_counter()
                steps[impl](x)
                first[impl] += time.perf_counter() - t0
        times = {impl: [] for impl in impls}
        ratios = {impl: [] for impl in impls if impl != "ours"}
        for r in range(args.rounds):
            k = r % len(impls)  # rotate the order: each contender goes first as often
            for impl in impls[k:] + impls[:k]:
                t0 = time.perf_counter()
                steps[impl](x)
                times[impl].append(time.perf_counter() - t0)
            for impl in ratios:
                ratios[impl].append(times[impl][-1] / times["ours"][-1])
        row = {f"{impl}_s": statistics.median(times[impl]) for impl in impls}
        row.update({f"{impl}_warmup_s": round(first[impl], 2) for impl in impls})
        gain = row["official_s"] - row["ours_s"]
        extra = first["ours"] - first["official"]  # what compiling cost ours over official
        row["break_even_steps"] = max(0.0, extra / gain) if gain > 0 else None
        for impl, rs in ratios.items():
            row[f"{impl}/ours"] = [round(v, 3) for v in rs]
            row[f"{impl}/ours_median"] = statistics.median(rs)
        if "ours_eager" in times:  # the official code against ours uncompiled, round by round
            rs = [o / e for o, e in zip(times["official"], times["ours_eager"], strict=True)]
            row["official/ours_eager"] = [round(v, 3) for v in rs]
            row["official/ours_eager_median"] = statistics.median(rs)
        row["rounds_s"] = {impl: [round(v, 3) for v in ts] for impl, ts in times.items()}
        out[prec] = row
        per = ", ".join(f"{impl} {row[f'{impl}_s']:.3f} s" for impl in impls)
        rat = "; ".join(
            f"{impl}/ours per round {row[f'{impl}/ours']} -> median {row[f'{impl}/ours_median']:.3f}x"
            for impl in ratios
        )
        if "official/ours_eager" in row:
            rat += (f"; official/ours_eager per round {row['official/ours_eager']} -> median "
                    f"{row['official/ours_eager_median']:.3f}x")  # fmt: skip
        print(f"{prec}: {per} per step; {rat}", flush=True)
        warm = ", ".join(f"{impl} {first[impl]:.1f} s" for impl in impls)
        even = row["break_even_steps"]
        even = "never" if even is None else f"{even:.1f} steps"
        print(f"{prec}: warm-up ({args.warmup} step(s), compilation included) {warm}; "
              f"ours wins its warm-up back after {even}", flush=True)  # fmt: skip
        del steps
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
