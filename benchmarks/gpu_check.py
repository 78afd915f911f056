"""One-call GPU check of unipred: versions, flash SDPA, bf16 numerics, ViT-B/L step speed, loader
against the ViT-B step, DDP.

Run from the repo root on a lent GPU (``bash benchmarks/gpu_check.sh``); ``--dry-run`` runs
every section at tiny sizes on whatever device there is (CPU here) to prove the script works.
Each section runs in its own subprocess with its own time limit, inside one overall budget,
so a failure, hang or out-of-memory in one never stops the rest. Results also go to
``$OUT/gpu_check.json`` (or /tmp) for the record.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step as ts  # noqa: E402  (benchmarks/ is not a package)


def _dev() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def sec_env(a) -> dict:
    """Versions and devices."""
    import torch

    out = {"python": sys.version.split()[0], "torch": torch.__version__,
           "cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
           "devices": torch.cuda.device_count()}  # fmt: skip
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out |= {"gpu": p.name, "capability": f"{p.major}.{p.minor}",
                "gpu_mem_gib": round(p.total_memory / 2**30, 1),
                "cudnn": torch.backends.cudnn.version(), "bf16": torch.cuda.is_bf16_supported()}  # fmt: skip
    ts.bootstrap_unipred()
    import unipred

    out["unipred"] = unipred.__file__
    return out


def sec_flash(a) -> dict:
    """Flash-only SDPA must accept bf16, and our whole model under bf16 autocast."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    ts.bootstrap_unipred()
    from unipred.nn.model import NEPA

    dev = _dev()
    q = torch.randn(2, 12, 257, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
    name, res = ("nepa_debug", 32) if a.dry_run else ("nepa_vit_b14", 224)
    model = NEPA.from_name(name).to(dev).train()
    x = torch.randn(2, 3, res, res, device=dev)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if any SDPA call cannot use flash
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss = model(x).loss
        loss.backward()
    return {"flash_bf16_sdpa": "ok", "model_under_flash_only": name, "loss": float(loss)}


def _outputs(model, x, amp: bool):
    import torch

    dev = x.device.type
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=amp):
        out = model(x)
    out.loss.backward()
    g = model.tokenizer.proj.weight.grad.detach().clone()
    model.zero_grad(set_to_none=True)
    return out.predictions.detach().float(), out.loss.detach().float(), g


def sec_numerics(a) -> dict:
    """bf16 autocast vs fp32 (same device), and device fp32 vs CPU fp32, on the debug model."""
    import torch

    ts.bootstrap_unipred()
    from unipred.nn.model import NEPA

    dev = _dev()
    torch.manual_seed(0)
    model = NEPA.from_name("nepa_debug").eval()  # eval: no random RoPE augmentation
    x = torch.randn(8, 3, 32, 32)
    p_cpu, l_cpu, _ = _outputs(model, x, False)
    model.to(dev)
    x = x.to(dev)
    p32, l32, g32 = _outputs(model, x, False)
    p16, l16, g16 = _outputs(model, x, True)
    cos = torch.nn.functional.cosine_similarity(p16.flatten(1), p32.flatten(1)).min()
    gcos = torch.nn.functional.cosine_similarity(g16.flatten(), g32.flatten(), dim=0)
    out = {"fp32_dev_vs_cpu_max_abs": (p32.cpu() - p_cpu).abs().max().item(),
           "bf16_vs_fp32_max_abs": (p16 - p32).abs().max().item(),
           "bf16_vs_fp32_min_cosine": cos.item(), "loss_fp32": l32.item(), "loss_bf16": l16.item(),
           "patch_grad_cosine_bf16_vs_fp32": gcos.item()}  # fmt: skip
    # tolerances: bf16 has 8 bits of mantissa; TF32 convs on GPU give ~1e-3
    out["ok"] = bool(cos > 0.99 and gcos > 0.95 and out["fp32_dev_vs_cpu_max_abs"] < 5e-3)
    return out


def _bench(a, model: str, batch: int, mode: str, impl: str = "ours") -> dict:
    dev = _dev()
    small = a.dry_run
    cfg = ts.BenchConfig(
        model="nepa_debug" if small else model, batch=4 if small else batch,
        res=32 if small else 224, device=dev, precision="bf16" if dev == "cuda" or small
        else "fp32", compile=mode == "compile", impl=impl, steps=2 if small else a.steps,
        warmup=1 if small else 3, optimizer=True, official=a.official,
    )  # fmt: skip
    r = ts.measure(cfg)
    keep = (
        "model",
        "batch",
        "res",
        "precision",
        "compile",
        "impl",
        "samples_per_s",
        "step_s",
        "tflops",
        "mfu",
        "peak_mem_gib",
        "gflop_per_sample",
        "gpu",
        "step_times_s",
    )
    return {k: r.get(k) for k in keep}


def sec_vitb_eager(a):
    """ViT-B/14 224 px batch 256, bf16 autocast, eager, fwd+bwd+fused AdamW."""
    return _bench(a, "nepa_vit_b14", 256, "eager")


def sec_vitb_compile(a):
    """Same as vitb_eager under torch.compile (first steps include compilation, not timed)."""
    return _bench(a, "nepa_vit_b14", 256, "compile")


def sec_loader(a, on_device: bool = False):
    """Does the shard loader (pretraining augmentation; the cores less two as workers) keep up
    with the compiled ViT-B/14 step at batch 256? (benchmarks/data_loader.py --train)"""
    import tempfile
    from types import SimpleNamespace

    ts.bootstrap_unipred()
    try:
        import webdataset  # noqa: F401
    except ImportError:
        return {"skipped": "webdataset is not installed here (the shard reader needs it)"}
    import data_loader as dl

    workers = 2 if a.dry_run else max(1, (os.cpu_count() or 2) - 2)
    args = SimpleNamespace(batch=8 if a.dry_run else 256, workers=workers, warmup=3,
                           batches=a.steps if a.dry_run else max(40, a.steps), dry_run=a.dry_run,
                           no_compile=False, decode_on_device=on_device,
                           model="nepa_debug" if a.dry_run else "nepa_vit_b14")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        return dl.train_against_loader(dl.make_shards(tmp, 64 if a.dry_run else 512), args)


def sec_loader_device(a):
    """The same with data.decode_on_device: JPEGs decoded, cropped and resized on the GPU."""
    return sec_loader(a, on_device=True)


def sec_vitl_eager(a):
    """ViT-L/14 224 px batch 128, bf16, eager."""
    return _bench(a, "nepa_vit_l14", 128, "eager")


def sec_vitl_compile(a):
    """ViT-L/14 224 px batch 128, bf16, torch.compile."""
    return _bench(a, "nepa_vit_l14", 128, "compile")


def sec_official_vitb(a):
    """The official implementation (needs --official and transformers 4.56.2), same step."""
    if not a.official:
        return {"skipped": "no --official checkout given"}
    return _bench(a, "nepa_vit_b14", 256, "eager", impl="official")


def sec_ddp(a):
    """DDP over min(2, #GPUs) processes (gloo on CPU in --dry-run): same grads as one process."""
    import socket

    import torch
    import torch.multiprocessing as mp

    world = 2 if a.dry_run else min(2, torch.cuda.device_count())
    if world < 2:
        return {"skipped": f"{torch.cuda.device_count()} GPU(s)"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    mp.start_processes(_ddp_worker, args=(world, a.dry_run, port, a.steps, q), nprocs=world,
                       start_method="spawn")  # fmt: skip
    return q.get()


def _ddp_worker(rank: int, world: int, dry: bool, port: int, steps: int, q) -> None:
    import copy

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    dev = torch.device("cpu") if dry else torch.device("cuda", rank)
    if not dry:
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    dist.init_process_group("gloo" if dry else "nccl", rank=rank, world_size=world)
    ts.bootstrap_unipred()
    from unipred.nn.model import NEPA

    torch.manual_seed(0)
    model = NEPA.from_name("nepa_debug").to(dev).eval()  # eval: no random RoPE draw
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(dev)
    ref = copy.deepcopy(model)
    ref(x).loss.backward()  # one process, whole batch
    ddp = DDP(model, device_ids=[rank] if not dry else None)
    ddp(x.chunk(world)[rank]).loss.backward()  # each rank its shard; DDP averages the grads
    err = max((p.grad - r.grad).abs().max().item()
              for p, r in zip(model.parameters(), ref.parameters()))  # fmt: skip
    out = {"world": world, "grad_max_abs_diff_vs_1proc": err, "ok": err < 1e-5}
    out |= _ddp_speed(rank, dev, dry, steps)
    if rank == 0:
        q.put(out)
    dist.destroy_process_group()


def _ddp_speed(rank, dev, dry, steps) -> dict:
    """ViT-B bf16 batch 256 per GPU under DDP (debug model in --dry-run)."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from unipred.nn.model import NEPA

    name, b, res = ("nepa_debug", 4, 32) if dry else ("nepa_vit_b14", 256, 224)
    model = NEPA.from_name(name).to(dev).train()
    ddp = DDP(model, device_ids=[rank] if not dry else None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randn(b, 3, res, res, device=dev)
    times = []
    for _ in range(3 + (2 if dry else steps)):
        dist.barrier()
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = ddp(x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    step = sorted(times[3:])[len(times[3:]) // 2]
    world = dist.get_world_size()
    return {"ddp_model": name, "ddp_batch_per_rank": b, "ddp_samples_per_s_total": b * world / step}


SECTIONS = {  # name -> (function, time limit in seconds); most important first
    "env": (sec_env, 60), "flash": (sec_flash, 90), "numerics": (sec_numerics, 90),
    "vitb_eager": (sec_vitb_eager, 120), "vitb_compile": (sec_vitb_compile, 240),
    "loader": (sec_loader, 180), "loader_device": (sec_loader_device, 150),
    "vitl_eager": (sec_vitl_eager, 120), "ddp": (sec_ddp, 150),
    "official_vitb": (sec_official_vitb, 120), "vitl_compile": (sec_vitl_compile, 240),
}  # fmt: skip


def _run_section(name: str, limit: float, argv: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--section", name, *argv]
    t0 = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")[-1500:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        return {"status": "TIMEOUT", "limit_s": round(limit), "stderr_tail": tail}
    res = {"status": "FAIL", "exit": p.returncode}
    for line in p.stdout.splitlines():
        if line.startswith("SECTION "):
            res = json.loads(line[8:])
    if res["status"] != "PASS":
        res["stderr_tail"] = p.stderr[-1500:]
    res["wall_s"] = round(time.time() - t0, 1)
    return res


def main(argv: list[str] | None = None) -> int:
    """Run the sections one by one in subprocesses, print each result and a summary."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny sizes, any device (CPU ok)")
    p.add_argument("--budget", type=float, default=450, help="overall seconds for all sections")
    p.add_argument("--only", nargs="*", default=[], choices=list(SECTIONS), help="run only these")
    p.add_argument("--limit-scale", type=float, default=0, help="x section limits (dry-run: 4)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per speed section")
    p.add_argument("--official", default="", help="checkout of SihanXU/nepa (optional)")
    p.add_argument("--section", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.section:  # child: run one section, report one line
        try:
            out = {"status": "PASS"} | SECTIONS[a.section][0](a)
            if out.get("ok") is False:
                out["status"] = "FAIL"
        except Exception as e:  # report, never crash the parent
            traceback.print_exc()
            out = {"status": "FAIL", "error": f"{type(e).__name__}: {str(e)[:500]}"}
        print("SECTION " + json.dumps(out), flush=True)
        return 0
    passthru = [f"--steps={a.steps}"] + (["--dry-run"] if a.dry_run else [])
    passthru += [f"--official={a.official}"] if a.official else []
    scale = a.limit_scale or (4.0 if a.dry_run else 1.0)  # a shared CPU is slow to import/compile
    t_end, results = time.time() + a.budget, {}
    for name, (_, limit) in SECTIONS.items():
        if a.only and name not in a.only:
            continue
        left = t_end - time.time()
        if left < 20:
            results[name] = {"status": "SKIP", "why": "overall budget spent"}
        else:
            results[name] = _run_section(name, min(limit * scale, left), passthru)
        print(f"=== {name}: {json.dumps(results[name])}", flush=True)
    _summary(results)
    dest = Path(os.environ.get("OUT") or "/tmp") / "gpu_check.json"
    dest.write_text(json.dumps(results, indent=1))
    print(f"results written to {dest}")
    return 0 if all(r["status"] in ("PASS", "SKIP") for r in results.values()) else 1


def _summary(results: dict) -> None:
    print("\nsection        status   samples/s      MFU   peak GiB")
    for name, r in results.items():
        sps, mfu, mem = r.get("samples_per_s"), r.get("mfu"), r.get("peak_mem_gib")
        print(f"{name:15}{r['status']:8}"
              f"{f'{sps:11.1f}' if sps else ' ' * 11}{f'{100 * mfu:8.1f}%' if mfu else ' ' * 9}"
              f"{f'{mem:11.2f}' if mem else ''}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
