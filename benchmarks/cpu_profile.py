"""Where a CPU training step's time goes, and what eager/compile, fp32/bf16, fused AdamW change.

    .venv/bin/python -P benchmarks/cpu_profile.py                      # the image demo's model
    .venv/bin/python -P benchmarks/cpu_profile.py --model vit_b14 --batch 8
    .venv/bin/python -P benchmarks/cpu_profile.py --quick              # < 1 min, smaller counts

One step = forward (the pretraining loss) + backward + AdamW on random images, as the engine
runs it (one thread unless ``--threads``). Three parts, one JSON line each (and ``--out``):

* ``split``: median milliseconds of forward / backward / optimizer (eager, fp32, foreach AdamW).
  The data pipeline is not in it: ``benchmarks/data_loader.py --train`` measures that share.
* ``ops``: the top ops by self CPU time from ``torch.profiler`` over a few steps (the table is
  also printed).
* ``ratios``: variants against the baseline (eager, fp32, foreach AdamW), each its own model
  copy with the same initial weights: ``bf16`` (autocast, AMX through oneDNN where the CPU has
  it), ``fused`` (``AdamW(fused=True)``), ``compile`` (``torch.compile``, inductor's CPU
  backend, of each predictor block as ``trainer.compile=auto`` does on CPU, or of the whole
  model with ``--compile-mode whole``; its first two steps, compilation included, are reported
  apart as ``compile_s``), ``bf16_compile`` (both), ``bf16_fused_compile`` (all three), ``bf16_math_attention`` (bf16 with the previous CPU attention, SDPA's math kernel,
  instead of ``unipred.nn.predictor._cpu_attention``). The variants are
  timed ALTERNATING, in a rotating order, ``--rounds`` times in this one process, and each
  ratio (baseline time / variant time, > 1 = faster) is the median over rounds of that
  round's ratio: on a shared machine the load drifts, but it drifts for both sides of a round.
* ``attention`` (``--attention``): CPU ms of one block's bf16 attention fwd + bwd, SDPA's
  math kernel against ``unipred.nn.predictor._cpu_attention``, at 17 to 257 tokens.
* ``data`` (demo model, or ``--data``): CPU ms per batch of the demo's training loader, with
  and without per-sample seeding (``data_part``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

MODELS = {  # name -> (how to build it, image side)
    "demo": ("configs/demo/fmnist_pretrain.yaml", 28),  # width 128, depth 6, 17 tokens
    "vit_b14": ("nepa_vit_b14", 224),
    "debug": ("nepa_debug", 16),  # the tests' tiny size
}


def build_model(name: str):
    """The model of ``MODELS[name]`` (pretraining layout, no head) and one input batch maker."""
    import torch

    from unipred.nn.model import NEPA

    source, side = MODELS[name]
    if source.endswith(".yaml"):
        from unipred.base.registry import TASKS
        from unipred.train.config import load_config, packaged_configs

        path = packaged_configs() / source.split("/", 1)[1]
        cfg = load_config(path, [], check_paths=False)
        model = NEPA(TASKS.get(cfg.task)(cfg).model_config(head="none"))
    else:
        model = NEPA.from_name(source)
    chans = model.cfg.tokenizer_args.get("in_chans", 3)
    return model, lambda batch: torch.randn(batch, chans, side, side)


class Variant:
    """One model copy + optimizer + step function of a configuration."""

    def __init__(self, base, name: str, bf16=False, fused=False, compile_backend="",
                 attention="explicit", compile_mode="blocks"):  # fmt: skip
        import torch

        from unipred.train import compiling

        self.name, self.bf16, self.attention = name, bf16, attention
        self.model = copy.deepcopy(base)
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=1e-4, fused=fused, foreach=not fused
        )
        self.run = self.model
        if compile_backend:  # blocks: as trainer.compile=auto on CPU; whole: the whole model
            compiling.apply(self.model, compile_mode, backend=compile_backend)

    def forward(self, x):
        import torch

        import unipred.nn.predictor as predictor

        predictor.CPU_ATTENTION = self.attention  # only read on CPU under bf16
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            return self.run(x).loss

    def step(self, x) -> None:
        self.forward(x).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def split(v: Variant, x, steps: int) -> dict:
    """Median ms of forward / backward / optimizer over ``steps`` steps (after one warm-up)."""
    v.step(x)
    parts = {"forward": [], "backward": [], "optimizer": []}
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = v.forward(x)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        v.opt.step()
        v.opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        for k, a, b in (("forward", t0, t1), ("backward", t1, t2), ("optimizer", t2, t3)):
            parts[k].append(1e3 * (b - a))
    med = {k: statistics.median(ms) for k, ms in parts.items()}
    total = sum(med.values())
    return {"ms": {k: round(m, 2) for k, m in med.items()},
            "share": {k: round(m / total, 3) for k, m in med.items()}}  # fmt: skip


def top_ops(v: Variant, x, steps: int, rows: int) -> list[dict]:
    """Top ``rows`` ops by self CPU time over ``steps`` profiled steps; prints the table."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            v.step(x)
    avg = prof.key_averages()
    print(avg.table(sort_by="self_cpu_time_total", row_limit=rows), flush=True)
    total = sum(e.self_cpu_time_total for e in avg) or 1.0
    top = sorted(avg, key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    return [{"op": e.key, "calls_per_step": e.count / steps,
             "self_ms_per_step": round(e.self_cpu_time_total / 1e3 / steps, 3),
             "share": round(e.self_cpu_time_total / total, 3)} for e in top]  # fmt: skip


def data_part(batch: int, rounds: int, steps: int) -> dict:
    """CPU ms per training batch of the Fashion-MNIST demo's loader (the engine's
    ``build_loader``: shuffled, seeded, shift + flip in the collate; generated stand-in images,
    the cost does not depend on their content), with the per-sample seeding of
    ``unipred.data.seeding.SeededDataset`` (the previous path) and without it (the default:
    its samples draw nothing random), alternating."""
    from unipred.tasks.image.fashion_mnist import ArrayImages

    from unipred.base.registry import TASKS
    from unipred.data.loader import build_loader
    from unipred.train.config import load_config, packaged_configs

    cfg = load_config(packaged_configs() / "demo" / "fmnist_pretrain.yaml",
                      ["data.root=''", f"data.generated_samples={batch * 8}"], check_paths=False)  # fmt: skip
    task = TASKS.get(cfg.task)(cfg)
    loader = build_loader(task.build_dataset("train"), batch, 1, 0, 1, 0, True, 0,
                          task.collate_fn("train"))  # fmt: skip
    per: dict[str, list[float]] = {"seeded_per_sample": [], "unseeded": []}
    for r in range(rounds):
        for name in sorted(per, reverse=bool(r % 2)):
            ArrayImages.per_sample_random = name == "seeded_per_sample"
            t, n = time.process_time(), 0
            while n < steps:
                for _ in loader:
                    n += 1
                    if n == steps:
                        break
            per[name].append(1e3 * (time.process_time() - t) / steps)
    ArrayImages.per_sample_random = False
    return {k: round(statistics.median(v), 2) for k, v in per.items()}


def attention_part(rounds: int) -> dict:
    """CPU ms (``time.process_time``) of one block's attention forward + backward in bf16:
    SDPA's math kernel (the previous path) against ``unipred.nn.predictor._cpu_attention``, at
    the demo's shape and longer ones up to ViT-B/14's 257 tokens; the median of ``rounds``."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from unipred.nn.predictor import _cpu_attention

    def math(q, k, v):
        with sdpa_kernel(SDPBackend.MATH):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    out = {}
    for B, H, T, d in ((128, 4, 17, 32), (32, 4, 65, 32), (16, 6, 129, 64), (8, 12, 257, 64)):
        qkvg = [torch.randn(B, H, T, d, dtype=torch.bfloat16) for _ in range(4)]
        per: dict[str, list[float]] = {"math": [], "unipred": []}
        for r in range(rounds):
            for name in sorted(per, reverse=bool(r % 2)):
                q, k, v = (t.clone().requires_grad_() for t in qkvg[:3])
                t0 = time.process_time()
                if name == "math":
                    math(q, k, v).backward(qkvg[3])
                else:
                    _cpu_attention(q, k, v, None, True).backward(qkvg[3])
                per[name].append(1e3 * (time.process_time() - t0))
        out[f"B{B} H{H} T{T} d{d}"] = {k: round(statistics.median(v), 2) for k, v in per.items()}
    return out


def ratios(variants: list[Variant], x, rounds: int, steps: int) -> dict:
    """Alternating, rotating-order timing; per-round ratios baseline / variant."""
    per_round: dict[str, list[float]] = {v.name: [] for v in variants}
    for r in range(rounds):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for v in order:
            t = time.perf_counter()
            for _ in range(steps):
                v.step(x)
            per_round[v.name].append(1e3 * (time.perf_counter() - t) / steps)
    base = per_round[variants[0].name]
    out = {}
    for v in variants:
        ms = per_round[v.name]
        rs = [b / m for b, m in zip(base, ms)]
        out[v.name] = {"ms_per_step_median": round(statistics.median(ms), 2),
                       "speedup_vs_base": round(statistics.median(rs), 3),
                       "speedup_per_round": [round(q, 3) for q in rs]}  # fmt: skip
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="demo")
    ap.add_argument("--batch", type=int, default=0, help="0: 128 (demo), 8 (vit_b14), 8 (debug)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=5, help="steps per timing (split, each round)")
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=15)
    ap.add_argument("--compile-backend", default="inductor", help="'' skips the compile variant")
    ap.add_argument("--compile-mode", choices=["blocks", "whole"], default="blocks",
                    help="blocks: each predictor block (trainer.compile=auto); whole: the model")  # fmt: skip
    ap.add_argument("--variants", nargs="*", default=None,
                    help="only these of bf16 bf16_math_attention fused compile bf16_compile "
                    "bf16_fused_compile (the baseline always runs)")  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="3 rounds x 2 steps, 1 profiled step")
    ap.add_argument("--data", action="store_true", help="also time the demo's loader "
                    "(always for --model demo)")  # fmt: skip
    ap.add_argument("--attention", action="store_true",
                    help="also time the CPU bf16 attention paths at 17-257 tokens")  # fmt: skip
    ap.add_argument("--out", default="", help="also append the JSON lines to this file")
    a = ap.parse_args()
    if a.quick:
        a.rounds, a.steps, a.profile_steps = 3, 2, 1
    import torch

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    batch = a.batch or {"demo": 128, "vit_b14": 8, "debug": 8}[a.model]
    base_model, make = build_model(a.model)
    x = make(batch)
    head = {"model": a.model, "batch": batch, "threads": a.threads, "torch": torch.__version__}
    records = []

    base = Variant(base_model, "base")
    records.append(
        {**head, "part": "split", "variant": "eager fp32 foreach", **split(base, x, a.steps)}
    )
    records.append({**head, "part": "ops", "ops": top_ops(base, x, a.profile_steps, a.rows)})

    variants = [
        base,
        Variant(base_model, "bf16", bf16=True),
        Variant(base_model, "bf16_math_attention", bf16=True, attention="math"),
        Variant(base_model, "fused", fused=True),
    ]
    compile_s = {}
    if a.compile_backend:
        cb, cm = a.compile_backend, a.compile_mode
        variants.append(Variant(base_model, "compile", compile_backend=cb, compile_mode=cm))
        variants.append(
            Variant(base_model, "bf16_compile", bf16=True, compile_backend=cb, compile_mode=cm)
        )
        variants.append(Variant(base_model, "bf16_fused_compile", bf16=True, fused=True,
                                compile_backend=cb, compile_mode=cm))  # fmt: skip
    if a.variants is not None:
        variants = [base] + [v for v in variants[1:] if v.name in a.variants]
    for v in variants[1:]:  # warm-up; the compiled ones compile here (cache hits are faster)
        t = time.perf_counter()
        v.step(x)
        v.step(x)
        if "compile" in v.name:
            compile_s[v.name] = round(time.perf_counter() - t, 1)
    res = ratios(variants, x, a.rounds, a.steps)
    records.append({**head, "part": "ratios", "rounds": a.rounds, "steps_per_round": a.steps,
                    "compile_backend": a.compile_backend, "compile_mode": a.compile_mode,
                    "compile_s": compile_s or None, "load_avg": os.getloadavg(),
                    **res})  # fmt: skip
    if a.attention:
        records.append({**head, "part": "attention", "unit": "CPU ms per block, fwd + bwd",
                        **attention_part(max(a.rounds, 5))})  # fmt: skip
    if a.model == "demo" or a.data:
        records.append({**head, "part": "data", "unit": "CPU ms per batch",
                        **data_part(batch, a.rounds, a.steps)})  # fmt: skip
    for rec in records:
        line = json.dumps(rec)
        print(line, flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
