"""Training-step throughput and peak memory of a NEPA size: ours, and the official release.

One step = forward (pretraining loss) + backward (+ an AdamW step with ``--optimizer``).
Each configuration runs in a fresh subprocess by default, so the CPU peak memory is the
honest high-water mark of that process (``ru_maxrss``); on CUDA it is
``torch.cuda.max_memory_allocated``. Examples (see benchmarks/README.md)::

  .venv/bin/python benchmarks/train_step.py --model nepa_vit_b14 --batch 32 --precision fp32 bf16
  .venv/bin/python benchmarks/train_step.py --impl ours official --official /tmp/nepa_official \\
      --official-python /tmp/offvenv/bin/python --precision fp32 bf16 --repeats 3
  python benchmarks/train_step.py --device cuda --batch 256 --precision bf16 --compile --optimizer

Model FLOPs per sample, forward + backward (stated so MFU can be checked by hand), with T
tokens (cls + N patches), L blocks, width D, P_mm the parameters of the block matrix products
(qkv, proj, fc1, fc2) and P_patch those of the patch embedding:
    6 * P_mm * T  +  6 * P_patch * N  +  12 * L * T^2 * D
The last term is QK^T and AV (2 * 2*T^2*D forward, x3 with backward), counted in full even
though causal kernels skip half of it (the usual MFU convention). ViT-B/14 at 224 px: 138.97
GFLOP per image. MFU = FLOPs/sample * samples/s / peak (H100/H200 dense bf16: 989 TFLOP/s).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# dense peak TFLOP/s without sparsity, by (substring of the device name, precision)
PEAK_TFLOPS = {("H100", "bf16"): 989.0, ("H200", "bf16"): 989.0, ("A100", "bf16"): 312.0,
               ("H100", "fp32"): 67.0, ("H200", "fp32"): 67.0, ("A100", "fp32"): 19.5}  # fmt: skip


@dataclass
class BenchConfig:
    model: str = "nepa_vit_b14"
    batch: int = 32
    res: int = 224
    device: str = "cpu"
    precision: str = "fp32"  # fp32 | bf16 (autocast; weights stay fp32)
    compile: bool = False
    impl: str = "ours"  # ours | official
    steps: int = 3
    warmup: int = 1
    threads: int = 0  # 0 = torch default
    optimizer: bool = False  # include a fused AdamW step
    grad_ckpt: bool = False
    official: str = ""  # path of a checkout of github SihanXU/nepa
    overrides: dict = field(default_factory=dict)  # model overrides, e.g. {"depth": 2}


def bootstrap_unipred() -> None:
    """Make ``unipred`` importable from this checkout even when it is not pip-installed.

    ``unipred.tokenizers`` lives in the top-level ``tokenizers/`` folder (pyproject maps it),
    so a bare PYTHONPATH is not enough. Task plugins may need packages a bare GPU box lacks
    (lightning, ...); the benchmark only needs the image tokenizer and the model sizes.
    """
    try:
        import unipred.tokenizers.image  # noqa: F401

        return
    except ImportError:
        pass
    import importlib.util
    import types

    # appended, not prepended: the repo's tokenizers/ must not shadow Hugging Face's
    sys.path.append(str(REPO))
    import unipred

    for sub in ("tokenizers", "tasks"):
        name, folder = f"unipred.{sub}", REPO / sub
        mod = types.ModuleType(name)
        mod.__path__ = [str(folder)] if folder.is_dir() else []
        sys.modules[name] = mod
        setattr(unipred, sub, mod)
    importlib.import_module("unipred.tokenizers.image")
    import unipred.base.registry as registry

    registry._loaded = True  # skip the task plugins; register only what we imported
    importlib.import_module("unipred.nn.model")


def flops_per_sample(model_cfg, res: int) -> float:
    """Analytic forward+backward FLOPs of one image (formula in the module docstring)."""
    pc = model_cfg.predictor
    patch = model_cfg.tokenizer_args.get("patch_size", 14)
    chans = model_cfg.tokenizer_args.get("in_chans", 3)
    n = (res // patch) ** 2
    t = n + 1
    hidden = pc.mlp_hidden
    fc1 = 2 * hidden if pc.mlp in ("swiglu", "geglu") else hidden
    p_mm = pc.depth * (3 * pc.dim * pc.dim + pc.dim * pc.dim + pc.dim * fc1 + hidden * pc.dim)
    p_patch = chans * patch * patch * pc.dim
    return 6 * p_mm * t + 6 * p_patch * n + 12 * pc.depth * t * t * pc.dim


def _official_config(model_cfg, res: int):
    """The official ViTNepaConfig equivalent to one of our pretraining sizes."""
    from models.vit_nepa.configuration_vit_nepa import ViTNepaConfig

    pc = model_cfg.predictor
    gated = pc.mlp in ("swiglu", "geglu")
    if pc.mlp not in ("gelu", "swiglu"):
        raise ValueError(f"the official code has no {pc.mlp!r} MLP")
    return ViTNepaConfig(
        hidden_size=pc.dim, num_hidden_layers=pc.depth, num_attention_heads=pc.heads,
        intermediate_size=pc.mlp_hidden, hidden_act="silu" if gated else "gelu",
        use_gated_mlp=gated, qkv_bias=pc.qkv_bias, qk_norm=pc.qk_norm,
        qk_norm_affine=pc.qk_norm_affine, qk_norm_bias=False, layerscale_value=pc.layerscale,
        drop_path_prob=pc.drop_path, layer_norm_eps=pc.norm_eps, is_causal=pc.causal,
        rope_theta=pc.rope_theta, pos_embed_shift=pc.rope_shift, pos_embed_jitter=pc.rope_jitter,
        pos_embed_rescale=pc.rope_rescale, image_size=res,
        patch_size=model_cfg.tokenizer_args.get("patch_size", 14),
        num_channels=model_cfg.tokenizer_args.get("in_chans", 3),
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip


def build(cfg: BenchConfig):
    """(model, loss_fn(x) -> scalar, model_config) for ``cfg.impl``."""
    bootstrap_unipred()
    from unipred.nn.model import NEPA, model_config

    mcfg = model_config(cfg.model, **cfg.overrides)
    if cfg.impl == "ours":
        model = NEPA(mcfg)
        model.predictor.grad_checkpointing = cfg.grad_ckpt
        return model, lambda m, x: m(x).loss, mcfg
    if cfg.impl != "official":
        raise ValueError(f"--impl must be ours or official, got {cfg.impl!r}")
    if not (Path(cfg.official) / "models" / "vit_nepa").is_dir():
        raise ValueError(f"--official {cfg.official!r} is not a checkout of SihanXU/nepa")
    sys.path.insert(0, str(Path(cfg.official).resolve()))
    from models.vit_nepa.modeling_vit_nepa import ViTNepaForPreTraining

    model = ViTNepaForPreTraining(_official_config(mcfg, cfg.res))
    if cfg.grad_ckpt:
        model.gradient_checkpointing_enable()
    return model, lambda m, x: m(pixel_values=x).loss, mcfg


class _LivePeak:
    """Peak bytes that malloc holds for live objects (glibc mallinfo2: in-use heap + mmapped),
    sampled after every aten op (backward included). Unlike RSS it ignores freed memory
    that glibc keeps (fragmentation), so it compares two implementations' tensors fairly."""

    def __init__(self):
        import ctypes

        from torch.utils._python_dispatch import TorchDispatchMode

        names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"

        class Info(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in names.split()]

        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = Info
        tracker = self
        self.peak = 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                m = libc.mallinfo2()
                tracker.peak = max(tracker.peak, m.uordblks + m.hblkhd)
                return out

        self.mode = Mode()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(cfg: BenchConfig) -> dict:
    """Run warmup + timed steps of one configuration in this process; return the figures."""
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev = torch.device(cfg.device)
    cuda = dev.type == "cuda"
    torch.manual_seed(0)
    model, loss_fn, mcfg = build(cfg)
    model.to(dev).train()
    run = torch.compile(model) if cfg.compile else model
    chans = mcfg.tokenizer_args.get("in_chans", 3)
    x = torch.randn(cfg.batch, chans, cfg.res, cfg.res, device=dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True) if cfg.optimizer else None
    amp = cfg.precision == "bf16"
    if cfg.precision not in ("fp32", "bf16"):
        raise ValueError(f"--precision must be fp32 or bf16, got {cfg.precision!r}")

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(run, x)
        loss.backward()
        if opt is not None:
            opt.step()
        model.zero_grad(set_to_none=True)
        return loss

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else _rss_bytes()
    times, cpu, loss = [], [], None
    # live-tensor peak, CPU eager only, during the (untimed) first warmup step
    live = _LivePeak() if not (cuda or cfg.compile or cfg.warmup < 1) else None
    for i in range(cfg.warmup + cfg.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        if i == 0 and live is not None:
            with live.mode:
                loss = step()
        else:
            loss = step()
        if cuda:
            torch.cuda.synchronize()
        if i >= cfg.warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)  # all threads; less hit by other tenants
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    out = _figures(cfg, mcfg, times, cpu, peak, base, float(loss), torch)
    out["live_peak_gib"] = live.peak / 2**30 if live is not None else None
    return out


def _figures(cfg, mcfg, times, cpu, peak, base, loss, torch) -> dict:
    step_s = statistics.median(times)
    fl = flops_per_sample(mcfg, cfg.res)
    out = dataclasses.asdict(cfg) | {
        "step_times_s": [round(t, 4) for t in times],
        "step_s": step_s,
        "cpu_s": statistics.median(cpu),
        "samples_per_s": cfg.batch / step_s,
        "peak_mem_gib": peak / 2**30,
        "base_mem_gib": base / 2**30,
        "gflop_per_sample": fl / 1e9,
        "tflops": fl * cfg.batch / step_s / 1e12,
        "loss": loss,
        "threads": torch.get_num_threads(),
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_", "default"),
        "torch": torch.__version__,
    }
    if cfg.device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        peak_t = next((v for (k, p), v in PEAK_TFLOPS.items()
                       if k in name and p == cfg.precision), None)  # fmt: skip
        out |= {"gpu": name, "peak_tflops": peak_t}
        out["mfu"] = out["tflops"] / peak_t if peak_t else None
    return out


def run_isolated(
    cfg: BenchConfig, python: str, timeout: float | None = None, mmap_threshold: int = 0
) -> dict:
    """Measure one configuration in a fresh interpreter (honest peak RSS, no shared caches).

    ``mmap_threshold`` > 0 fixes glibc's M_MMAP_THRESHOLD for the run: large blocks then go
    straight back to the OS when freed, so RSS follows the live tensors instead of what the
    default (self-raising) threshold leaves stranded in the heap.
    """
    env = dict(os.environ)
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    if cfg.threads:  # fix the OpenMP pool before torch starts, the same for both impls
        env["OMP_NUM_THREADS"] = str(cfg.threads)
    cmd = [python, str(Path(__file__).resolve()), "--worker", json.dumps(dataclasses.asdict(cfg))]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stderr or proc.stdout)[-2000:]
    raise RuntimeError(f"{cfg.impl}/{cfg.precision} failed (exit {proc.returncode}):\n{tail}")


def _parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        out[key] = json.loads(val) if val[:1] in "-0123456789[{tn" else val
    return out


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="nepa_vit_b14", help="a size of NEPA.from_name")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    p.add_argument("--impl", nargs="+", default=["ours"], choices=["ours", "official"])
    p.add_argument("--mode", nargs="+", default=["eager"], choices=["eager", "compile"])
    p.add_argument("--steps", type=int, default=3, help="timed steps per run (median taken)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1, help="fresh runs per configuration")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--optimizer", action="store_true", help="add a fused AdamW step")
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing")
    p.add_argument("--official", default="", help="checkout of github SihanXU/nepa")
    p.add_argument("--official-python", default=sys.executable,
                   help="interpreter with transformers 4.56.2 for --impl official")  # fmt: skip
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="model overrides")
    p.add_argument("--mmap-threshold", type=int, default=0,
                   help="glibc MALLOC_MMAP_THRESHOLD_ (bytes) for every run, e.g. 4194304")  # fmt: skip
    p.add_argument("--in-process", action="store_true", help="no subprocess per run (CUDA)")
    p.add_argument("--json", default="", help="also write all results to this file")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _summary(results: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["impl"], r["precision"], r["compile"]), []).append(r)
    rows = []
    for (impl, prec, comp), rs in groups.items():

        def med(k, rs=rs):
            return statistics.median(r[k] for r in rs)

        mfu = [r["mfu"] for r in rs if r.get("mfu") is not None]
        rows.append({"impl": impl, "precision": prec, "mode": "compile" if comp else "eager",
                     "samples_per_s": med("samples_per_s"), "cpu_s": med("cpu_s"), "peak_mem_gib": med("peak_mem_gib"),
                     "base_mem_gib": med("base_mem_gib"),
                     "live_peak_gib": med("live_peak_gib") if rs[0].get("live_peak_gib") else None,
                     "tflops": med("tflops"),
                     "mfu": statistics.median(mfu) if mfu else None,
                     "runs": [round(r["samples_per_s"], 3) for r in rs]})  # fmt: skip
    return rows


def _print_table(rows: list[dict], first: dict) -> None:
    print(f"\n{first['model']}  batch {first['batch']}  {first['res']} px  device {first['device']}"
          f"  threads {first['threads']}  torch {first['torch']}  "
          f"{first['gflop_per_sample']:.2f} GFLOP/sample (fwd+bwd)"
          + ("  +AdamW" if first["optimizer"] else "")
          + f"  glibc mmap threshold {first.get('malloc_mmap_threshold')}")  # fmt: skip
    print(
        f"{'impl':9}{'prec':6}{'mode':9}{'samples/s':>11}{'TFLOP/s':>9}{'MFU':>7}"
        f"{'cpu s/step':>11}{'peak GiB':>10}{'live GiB':>10}{'base GiB':>10}  runs (samples/s)"
    )
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        lp = f"{r['live_peak_gib']:10.2f}" if r["live_peak_gib"] else f"{'-':>10}"
        print(
            f"{r['impl']:9}{r['precision']:6}{r['mode']:9}{r['samples_per_s']:11.3f}"
            f"{r['tflops']:9.3f}{mfu:>7}{r['cpu_s']:11.2f}{r['peak_mem_gib']:10.2f}{lp}{r['base_mem_gib']:10.2f}  "
            f"{r['runs']}"
        )
    by = {(r["impl"], r["precision"], r["mode"]): r for r in rows}
    for (impl, prec, mode), r in by.items():
        off = by.get(("official", prec, mode))
        if impl == "ours" and off:
            print(
                f"ours/official {prec} {mode}: speed x{r['samples_per_s'] / off['samples_per_s']:.3f}"
                f", peak memory x{r['peak_mem_gib'] / off['peak_mem_gib']:.3f}"
            )
        fp32 = by.get((impl, "fp32", mode))
        if prec == "bf16" and fp32:
            print(
                f"{impl} bf16/fp32 {mode}: speed x{r['samples_per_s'] / fp32['samples_per_s']:.3f}"
            )


def main(argv: list[str] | None = None) -> int:
    """Run every (repeat, precision, mode, impl) configuration, interleaved; print medians."""
    a = _args(argv)
    if a.worker:
        cfg = BenchConfig(**json.loads(a.worker))
        print("RESULT " + json.dumps(measure(cfg)), flush=True)
        return 0
    base = BenchConfig(a.model, a.batch, a.res, a.device, steps=a.steps, warmup=a.warmup,
                       threads=a.threads, optimizer=a.optimizer, grad_ckpt=a.grad_ckpt,
                       official=a.official, overrides=_parse_overrides(a.set))  # fmt: skip
    results = []
    for rep in range(a.repeats):  # interleaved so slow phases of a shared machine hit all alike
        for prec in a.precision:
            for mode in a.mode:
                for impl in a.impl:
                    cfg = dataclasses.replace(base, precision=prec, impl=impl,
                                              compile=mode == "compile")  # fmt: skip
                    py = a.official_python if impl == "official" else sys.executable
                    r = (
                        measure(cfg)
                        if a.in_process
                        else run_isolated(cfg, py, None, a.mmap_threshold)
                    )
                    results.append(r)
                    if a.json:  # after every run, so a cut-off session keeps what it measured
                        Path(a.json).write_text(json.dumps(results, indent=1))
                    print(f"[{rep + 1}/{a.repeats}] {impl} {prec} {mode}: "
                          f"{r['samples_per_s']:.3f} samples/s, steps {r['step_times_s']} s, "
                          f"peak {r['peak_mem_gib']:.2f} GiB", flush=True)  # fmt: skip
    _print_table(_summary(results), results[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
