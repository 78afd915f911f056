"""Throughput and MFU of NEPA pretraining *through the engine* (Lightning, EMA, fused AdamW,
grad clipping, bf16-mixed, torch.compile), next to a bare PyTorch loop on the same card.

    python benchmarks/engine_step.py                       # ViT-B/14, 224 px, batch 256, GPU
    python benchmarks/engine_step.py --tiny                # nepa_debug on CPU (a dry run)

Data are random tensors held in memory (this measures the step, not the input pipeline).
FLOPs per image, forward + backward: 6 P_mm T + 6 P_patch N + 12 L T^2 D (see
benchmarks/train_step.py); ViT-B/14 at 224 px: 138.97 GFLOP. MFU = FLOPs * images/s / peak,
peak = 989 TFLOP/s (H100/H200 dense bf16). Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEAK = 989e12


def bootstrap() -> None:
    """Import unipred from the checkout without installing it; register only the image parts."""
    try:
        import unipred.tasks.image.debug  # noqa: F401

        return
    except ImportError:
        pass
    sys.path.append(str(REPO))
    import unipred

    for sub in ("tokenizers", "tasks"):
        mod = types.ModuleType(f"unipred.{sub}")
        mod.__path__ = [str(REPO / sub)]
        sys.modules[f"unipred.{sub}"] = mod
        setattr(unipred, sub, mod)
    import unipred.base.registry as registry

    registry._loaded = True  # other tasks may need packages this machine lacks
    for m in ("unipred.tokenizers.image", "unipred.tasks.image.debug", "unipred.nn.model"):
        importlib.import_module(m)


def flops_per_image(model, n_tokens: int) -> float:
    pc = model.cfg.predictor
    p_mm = sum(
        p.numel() for n, p in model.predictor.named_parameters() if p.ndim == 2 and "blocks" in n
    )
    p_patch = sum(p.numel() for p in model.tokenizer.parameters() if p.ndim > 1)
    T = n_tokens + 1
    return 6 * p_mm * T + 6 * p_patch * n_tokens + 12 * pc.depth * T * T * pc.dim


def bare_loop(args, torch, NEPA):
    """Model + fused AdamW + bf16 autocast + clip, no Lightning: the ceiling for the engine."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = NEPA.from_name(args.model).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)
    step_fn = model.compile() or model if args.compile else model
    x = torch.randn(args.batch, 3, args.size, args.size, device=dev)
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=args.bf16):
            loss = step_fn(x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    n_tok = (args.size // model.tokenizer.patch_size) ** 2
    return _report("bare_loop", args, sorted(times)[len(times) // 2], flops_per_image(model, n_tok))


def engine_run(args, torch, compile_: bool):
    import lightning as L

    from unipred.task import PretrainTask
    from unipred.train.config import load_config
    from unipred.train.engine import fit

    class Synthetic(PretrainTask):
        gpu_pool = None

        def build_dataset(self, split):
            if split != "train":
                return None
            n = args.batch * (args.warmup + args.steps)
            if args.gpu_data:  # the loader yields indices; images are gathered on the GPU
                return range(n)
            return _Pool(torch.randn(64, 3, args.size, args.size), n)

        def inputs(self, batch):
            if not args.gpu_data:
                return super().inputs(batch)
            if self.gpu_pool is None:
                self.gpu_pool = torch.randn(64, 3, args.size, args.size, device=batch.device)
            return self.gpu_pool[batch % 64]

        def batch_size(self, batch):
            return int(batch.shape[0])

    class Clock(L.Callback):
        def __init__(self):
            self.t = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t.append(time.perf_counter())

    over = [
        f"model.name={args.model}",
        f"data.image_size={args.size}",
        "data.num_workers=6",
        f"trainer.global_batch={args.batch}",
        f"trainer.compile={compile_}",
        f"trainer.precision={'bf16-mixed' if args.bf16 else '32-true'}",
        f"trainer.max_steps={args.warmup + args.steps}",
        "trainer.loggers=[]",
        "trainer.progress_bar=false",
        "trainer.ckpt_every_n_steps=0",
        "trainer.collapse_every_n_steps=0",
        f"run_dir={args.run_dir}",
        f"trainer.accelerator={'gpu' if torch.cuda.is_available() else 'cpu'}",
    ]
    cfg = load_config(REPO / "configs/debug/image_nepa_tiny.yaml", over + args.over)
    clock = Clock()
    fit(cfg, callbacks=[clock], task=Synthetic(cfg))
    dts = [b - a for a, b in zip(clock.t[args.warmup :], clock.t[args.warmup + 1 :])]
    model = NEPA_cls.from_name(args.model)
    n_tok = (args.size // model.tokenizer.patch_size) ** 2
    name = ("engine_compile" if compile_ else "engine_eager") + (
        "_gpudata" if args.gpu_data else ""
    )
    name += "".join(f" {o}" for o in args.over)
    return _report(name, args, sorted(dts)[len(dts) // 2], flops_per_image(model, n_tok))


def fsdp_tiny(args, torch):
    """The tiny debug config under FSDP on whatever devices exist (does it run at all?)."""
    from unipred.train.config import load_config
    from unipred.train.engine import fit

    n = max(1, torch.cuda.device_count())
    cfg = load_config(
        REPO / "configs/debug/image_nepa_tiny.yaml",
        [
            "trainer.strategy=fsdp",
            f"trainer.devices={n}",
            "trainer.max_steps=4",
            "trainer.accelerator=gpu",
            "trainer.precision=bf16-mixed",
            "trainer.loggers=[]",
            "trainer.progress_bar=false",
            f"run_dir={args.run_dir}_fsdp",
        ],
    )
    t0 = time.perf_counter()
    trainer = fit(cfg)
    rec = {
        "run": "fsdp_tiny",
        "ok": trainer.global_step == 4,
        "devices": n,
        "seconds": round(time.perf_counter() - t0, 1),
        "last_ckpt": (Path(args.run_dir + "_fsdp") / "checkpoints/last.ckpt").exists(),
    }
    print(json.dumps(rec), flush=True)
    return rec


class _Pool:
    def __init__(self, pool, n):
        self.pool, self.n = pool, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.pool[i % len(self.pool)]


def _report(name, args, step_s, flops):
    import torch

    ips = args.batch / step_s
    rec = {
        "run": name,
        "model": args.model,
        "batch": args.batch,
        "size": args.size,
        "bf16": args.bf16,
        "step_s": round(step_s, 4),
        "images_per_s": round(ips, 1),
        "gflop_per_image": round(flops / 1e9, 2),
        "mfu": round(flops * ips / PEAK, 4) if torch.cuda.is_available() else None,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    print(json.dumps(rec), flush=True)
    return rec


NEPA_cls = None


def main() -> None:
    global NEPA_cls
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="nepa_vit_b14")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=6)
    ap.add_argument("--runs", default="engine_compile,bare,fsdp_tiny,engine_eager")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--fp32", dest="bf16", action="store_false")
    ap.add_argument("--tiny", action="store_true", help="nepa_debug, 32 px, batch 8, 3 steps")
    ap.add_argument("--run-dir", default="/tmp/unipred_engine_bench")
    ap.add_argument("--out", default="")
    ap.add_argument("--gpu-data", action="store_true", help="index loader, images made on GPU")
    ap.add_argument("--over", nargs="*", default=[], help="extra config overrides (engine runs)")
    args = ap.parse_args()
    if args.tiny:
        args.model, args.size, args.batch, args.steps, args.warmup = "nepa_debug", 32, 8, 3, 1
    bootstrap()
    import torch

    from unipred.nn.model import NEPA

    NEPA_cls = NEPA
    torch.backends.cuda.matmul.allow_tf32 = True
    results = []
    for run in args.runs.split(","):
        if run == "bare":
            results.append(bare_loop(args, torch, NEPA))
        elif run == "fsdp_tiny":
            results.append(fsdp_tiny(args, torch))
        elif run in ("engine_compile", "engine_eager"):
            results.append(engine_run(args, torch, run == "engine_compile" and args.compile))
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
