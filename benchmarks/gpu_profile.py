"""Where the time of a NEPA ViT-B/14 pretraining step goes on a GPU, and what bounds it.

    python -P benchmarks/gpu_profile.py                    # all sections, ViT-B/14 224 px, batch 256
    python -P benchmarks/gpu_profile.py --dry-run          # tiny sizes on CPU: proves the script runs

Sections (one JSON line each; ``--only`` picks some):
  gemm      the block matrix products of one step (forward and both backward GEMMs of qkv, proj,
            fc1, fc2 in every block), timed alone in bf16: the step time if everything else were free
  sdpa      causal attention forward + backward at the step's shape, for each SDPA backend
  profile   torch.profiler over compiled steps: GPU time per kernel category (GEMM, attention,
            fused element-wise, optimizer, copies), the top kernels, and how busy the GPU is
  step      whole compiled steps (fwd + bwd + clip + fused AdamW) for each ``--variants`` entry,
            each in a fresh subprocess: base | cudnn (cuDNN attention first) | cudagraphs
            (torch.compile mode reduce-overhead) | maxtune (mode max-autotune-no-cudagraphs);
            the default ``auto`` runs base plus whichever the sdpa/profile sections say could pay
MFU = analytic FLOPs (benchmarks/train_step.py: 138.97 GFLOP per 224 px image) x images/s / 989 TFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step as ts  # noqa: E402  (benchmarks/ is not a package)

PEAK = 989e12


def _emit(rec: dict) -> dict:
    print(json.dumps(rec), flush=True)
    out = os.environ.get("OUT")
    if out:
        with open(Path(out) / "gpu_profile.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
    return rec


def _setup(a):
    import torch

    ts.bootstrap_unipred()
    from unipred.nn.model import model_config

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    name, res, batch = ("nepa_debug", 32, 8) if a.dry_run else (a.model, a.res, a.batch)
    return torch, dev, model_config(name), name, res, batch


def _time(fn, torch, dev, reps: int) -> float:
    """Median seconds of fn() over reps calls (after one warm-up call)."""
    fn()
    ts_ = []
    for _ in range(reps):
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if dev == "cuda":
            torch.cuda.synchronize()
        ts_.append(time.perf_counter() - t0)
    return sorted(ts_)[len(ts_) // 2]


def sec_gemm(a) -> dict:
    torch, dev, mcfg, name, res, batch = _setup(a)
    pc = mcfg.predictor
    T = (res // mcfg.tokenizer_args["patch_size"]) ** 2 + 1
    M, D, H = batch * T, pc.dim, pc.mlp_hidden
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    shapes = {"qkv": (D, 3 * D), "proj": (D, D), "fc1": (D, H), "fc2": (H, D)}
    rec, total, flops = {"section": "gemm", "model": name, "batch": batch, "M": M}, 0.0, 0.0
    for key, (k, n) in shapes.items():
        x = torch.randn(M, k, device=dev, dtype=dt)
        w = torch.randn(n, k, device=dev, dtype=dt)
        gy = torch.randn(M, n, device=dev, dtype=dt)
        fwd = _time(lambda x=x, w=w: x @ w.t(), torch, dev, a.reps)
        dx = _time(lambda gy=gy, w=w: gy @ w, torch, dev, a.reps)
        dw = _time(lambda gy=gy, x=x: gy.t() @ x, torch, dev, a.reps)
        f = 3 * 2 * M * k * n
        rec[key] = {
            "ms": round((fwd + dx + dw) * 1e3, 3),
            "tflops": round(f / (fwd + dx + dw) / 1e12, 1),
        }
        total += fwd + dx + dw
        flops += f
    rec["step_gemm_ms"] = round(total * pc.depth * 1e3, 2)
    rec["gemm_tflops"] = round(flops / total / 1e12, 1)
    per_img = ts.flops_per_sample(mcfg, res)
    rec["mfu_if_only_gemms"] = round(per_img * batch / (total * pc.depth) / PEAK, 3)
    return _emit(rec)


def sec_sdpa(a) -> dict:
    torch, dev, mcfg, name, res, batch = _setup(a)
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    pc = mcfg.predictor
    T = (res // mcfg.tokenizer_args["patch_size"]) ** 2 + 1
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    q, k, v = (torch.randn(batch, pc.heads, T, pc.head_dim, device=dev, dtype=dt,
                           requires_grad=True) for _ in range(3))  # fmt: skip
    g = torch.randn_like(q)
    rec = {"section": "sdpa", "shape": [batch, pc.heads, T, pc.head_dim]}
    for b in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH"):

        def run(b=b):
            with sdpa_kernel(getattr(SDPBackend, b)):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            out.backward(g)

        try:
            t = _time(run, torch, dev, a.reps)
            rec[b.lower()] = {
                "ms_fwd_bwd": round(t * 1e3, 3),
                "ms_per_step": round(t * pc.depth * 1e3, 2),
            }
        except Exception as e:  # a backend that cannot serve this shape/device says why
            rec[b.lower()] = f"unavailable: {str(e).splitlines()[0][:120]}"
    return _emit(rec)


def _category(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ("flash", "fmha", "attention", "cudnn")):
        return "attention"
    if any(
        s in n for s in ("gemm", "xmma", "cutlass", "nvjet", "sm90", "sm80", "splitk", "matmul")
    ):
        return "gemm"
    if "adam" in n or "multi_tensor" in n:
        return "optimizer"
    if "triton" in n:
        return "triton_fused"
    if "memcpy" in n or "memset" in n or "copy" in n:
        return "copy"
    if "conv" in n or "wgrad" in n or "dgrad" in n:
        return "conv"
    return "other"


def _compiled_step(a, torch, dev, name, res, batch, mode=None, backend_first=None):
    """(step function, model) for fwd + bwd + clip + fused AdamW under bf16 autocast."""
    from unipred.nn.model import NEPA

    torch.manual_seed(0)
    model = NEPA.from_name(name).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)
    run = torch.compile(model, mode=mode) if not a.no_compile else model
    x = torch.randn(batch, 3, res, res, device=dev)

    def step():
        ctx = _backend_ctx(backend_first)
        with ctx, torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda" or a.dry_run):
            loss = run(x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, model


def _backend_ctx(first):
    import contextlib

    if first is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
             SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]  # fmt: skip
    return sdpa_kernel(order, set_priority=True)


def sec_profile(a) -> dict:
    torch, dev, mcfg, name, res, batch = _setup(a)
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    step, _ = _compiled_step(a, torch, dev, name, res, batch)
    for _ in range(a.warmup):
        step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    n = 3
    if dev == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(n):
            step()
        if dev == "cuda":
            torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / n
    cats, top = {}, []
    for ev in prof.key_averages():
        t = (ev.self_device_time_total if dev == "cuda" else ev.self_cpu_time_total) / 1e3 / n
        # kernels only: a CPU op (aten::mm) also reports its kernels' device time, and
        # inductor's launch records share their kernel's name, so both would count twice
        if dev == "cuda" and (ev.device_type != DeviceType.CUDA or ev.self_device_time_total <= 0):
            continue
        c = _category(ev.key)
        cats[c] = cats.get(c, 0.0) + t
        top.append((t, ev.key[:110], ev.count // n))
    top.sort(reverse=True)
    busy = sum(cats.values())
    rec = {"section": "profile", "model": name, "batch": batch, "wall_ms_per_step": round(wall * 1e3, 2),
           "kernel_ms_per_step": round(busy, 2), "gpu_busy": round(busy / (wall * 1e3), 3),
           "ms_by_category": {k: round(v, 2) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
           "top_kernels": [[round(t, 3), k, c] for t, k, c in top[: a.top]]}  # fmt: skip
    return _emit(rec)


def _auto_variants(results: dict) -> list[str]:
    """base, plus the variants the earlier sections say could pay: cuDNN attention when it beat
    flash by > 10 % in ``sdpa``, CUDA graphs when the profiled GPU was idle > 10 % of a step."""
    out = ["base"]
    sd = results.get("sdpa", {})
    fl, cu = sd.get("flash_attention"), sd.get("cudnn_attention")
    if isinstance(fl, dict) and isinstance(cu, dict) and cu["ms_fwd_bwd"] < 0.9 * fl["ms_fwd_bwd"]:
        out.append("cudnn")
    if results.get("profile", {}).get("gpu_busy", 1.0) < 0.9:
        out.append("cudagraphs")
    return out


def sec_step(a, results=None) -> list:
    """Each variant in its own subprocess (fresh compile caches, fresh memory high-water mark)."""
    out = []
    variants = _auto_variants(results or {}) if a.variants == ["auto"] else a.variants
    _emit({"section": "step", "variants": variants})
    for v in variants:
        cmd = [sys.executable, "-P", __file__, "--variant-run", v] + _passthrough(a)
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.variant_timeout)
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
            if line:
                print(line[-1], flush=True)  # the child already appended it to $OUT
                out.append(json.loads(line[-1]))
            else:
                out.append(_emit({"section": "step", "variant": v, "error": p.stderr[-800:]}))
        except subprocess.TimeoutExpired:
            out.append(_emit({"section": "step", "variant": v, "error": "timeout"}))
    return out


def _passthrough(a) -> list[str]:
    args = ["--model", a.model, "--res", str(a.res), "--batch", str(a.batch),
            "--steps", str(a.steps), "--warmup", str(a.warmup)]  # fmt: skip
    return args + (["--dry-run"] if a.dry_run else []) + (["--no-compile"] if a.no_compile else [])


def variant_run(a) -> dict:
    torch, dev, mcfg, name, res, batch = _setup(a)
    mode = {"cudagraphs": "reduce-overhead", "maxtune": "max-autotune-no-cudagraphs"}.get(
        a.variant_run
    )
    first = "cudnn" if a.variant_run == "cudnn" else None
    t0 = time.perf_counter()
    step, _ = _compiled_step(a, torch, dev, name, res, batch, mode=mode, backend_first=first)
    for _ in range(a.warmup):
        step()
    warm_s = time.perf_counter() - t0
    s = _time(step, torch, dev, a.steps)
    per_img = ts.flops_per_sample(mcfg, res)
    rec = {"section": "step", "variant": a.variant_run, "model": name, "batch": batch,
           "step_s": round(s, 4), "images_per_s": round(batch / s, 1),
           "mfu": round(per_img * batch / s / PEAK, 4) if dev == "cuda" else None,
           "warmup_incl_compile_s": round(warm_s, 1),
           "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev == "cuda" else None,
           "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu"}  # fmt: skip
    return _emit(rec)


SECTIONS = {"gemm": sec_gemm, "sdpa": sec_sdpa, "profile": sec_profile, "step": sec_step}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="nepa_vit_b14")
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--only", nargs="*", default=list(SECTIONS), choices=list(SECTIONS))
    p.add_argument(
        "--variants",
        nargs="*",
        default=["auto"],
        help="auto | any of base cudnn cudagraphs maxtune",
    )
    p.add_argument("--variant-timeout", type=float, default=240)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="nepa_debug, 32 px, batch 8, CPU ok")
    p.add_argument("--variant-run", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.variant_run:
        variant_run(a)
        return 0
    results = {}
    for s in a.only:
        t0 = time.perf_counter()
        try:
            results[s] = SECTIONS[s](a, results) if s == "step" else SECTIONS[s](a)
        except Exception as e:  # one failing section must not hide the others
            _emit({"section": s, "error": f"{type(e).__name__}: {e}"[:600]})
        print(f"# {s}: {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
