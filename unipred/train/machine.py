"""Fitting a recipe's device layout to the machine that runs it.

A recipe states the *global* batch (the paper's); ``trainer.devices`` and
``trainer.per_device_batch`` only say how one machine realises it. The ImageNet recipes are
written for 8 GPUs. Run as they are on a machine with fewer GPUs, Lightning refuses them; on a
machine without a GPU ``accelerator: auto`` would start 8 CPU processes, each building the
model, each slower than one process using every core. So before a run builds anything,
``fit_to_machine`` shrinks the layout to what is here and lets gradient accumulation keep the
global batch, the learning rate and the schedule unchanged:

* no GPU (``accelerator: auto``): one process. Its per-device batch is at most
  ``CPU_PER_DEVICE`` samples (a batch sized for an 80 GB GPU would need tens of GB of host
  memory for ViT-B activations) and the rest of the global batch is accumulated;
* fewer GPUs than ``trainer.devices``: every GPU there is, with the recipe's per-device batch.

``trainer.accelerator: cpu`` with ``devices > 1`` is a deliberate multi-process CPU run
(the DDP tests use it) and is left alone, as are multi-node layouts. What was chosen is one
line, printed when the run starts and shown by ``--print-config``.
"""

from __future__ import annotations

import dataclasses
import functools
import os

CPU_PER_DEVICE = 32  # most samples one CPU process takes per forward when the recipe is adapted


def _gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _largest_divisor(n: int, at_most: int) -> int:
    """The largest d <= at_most that divides n (1 at least)."""
    for d in range(max(1, min(at_most, n)), 0, -1):
        if n % d == 0:
            return d
    return 1


def fit_to_machine(t, gpus: int | None = None):
    """``(trainer config fitted to this machine, one line saying what changed)``; the line is
    None and the config ``t`` itself when nothing needs to change. ``gpus`` overrides the count
    of visible GPUs (tests)."""
    if t.accelerator != "auto" or t.num_nodes != 1:
        return t, None
    gpus = _gpus() if gpus is None else gpus
    want = t.devices
    if gpus == 0:
        if want == 1:
            return t, None
        devices, where = 1, "no GPU here"
    else:
        if want == -1 or 1 <= want <= gpus:
            return t, None
        devices, where = gpus, f"{gpus} GPU{'s' if gpus > 1 else ''} here"
    per = t.per_device_batch or t.global_batch // max(want, 1)
    if gpus == 0:
        per = min(per, CPU_PER_DEVICE)
    per = _largest_divisor(t.global_batch // devices, per) if t.global_batch % devices == 0 else per
    new = dataclasses.replace(t, devices=devices, per_device_batch=per)
    accum = t.global_batch // (per * devices) if t.global_batch % (per * devices) == 0 else None
    procs = "one process" if devices == 1 else f"{devices} processes"
    keeps = (f"gradient accumulation {accum} keeps trainer.global_batch={t.global_batch}"
             if accum else f"trainer.global_batch={t.global_batch} does not divide")  # fmt: skip
    line = (
        f"{where}: trainer.devices {want} -> {devices} ({procs}), trainer.per_device_batch "
        f"{t.per_device_batch or 'auto'} -> {per}; {keeps}"
    )
    if gpus == 0:
        line += " (trainer.accelerator=cpu trainer.devices=N runs N CPU processes)"
    return new, line


def apply_to_run(cfg, announce: bool = True) -> str | None:
    """Fit ``cfg.trainer`` to this machine in place (``fit_to_machine``, the loader workers,
    ``cpu_precision``); print one line per change once (rank 0) and return them joined, or
    None when nothing changed."""
    import sys

    cfg.trainer, line = fit_to_machine(cfg.trainer)
    if line:
        from unipred.train.provenance import set_source

        for key in ("trainer.devices", "trainer.per_device_batch"):
            set_source(cfg, key, "this machine (see the line above)")
        # the recipe's loader workers were sized for its node (10 per GPU process): more
        # workers than cores per process only compete with the step for the same cores
        cores = max(1, usable_cpus() // max(1, cfg.trainer.devices))
        workers = getattr(cfg.data, "num_workers", 0)
        if workers > cores:
            cfg.data.num_workers = cores
            set_source(cfg, "data.num_workers", "this machine (see the line above)")
            line += f"; data.num_workers {workers} -> {cores} (CPU cores per process)"
    else:
        line = _default_workers(cfg) or line
    cfg.trainer, bf16 = cpu_precision(cfg.trainer)
    if bf16:
        from unipred.train.provenance import set_source

        set_source(cfg, "trainer.precision", "this machine (see the line above)")
    lines = [x for x in (line, bf16) if x]
    if announce and os.environ.get("LOCAL_RANK", "0") == "0":
        for x in lines:
            print(f"[unipred] {x}", file=sys.stderr, flush=True)
    return "; ".join(lines) or None


BF16_PRECISIONS = ("bf16-mixed", "bf16-true", "bf16")


@functools.lru_cache(maxsize=1)
def cpu_bf16_is_slow() -> bool:
    """True on a CPU without native bfloat16 arithmetic: x86 without AVX-512 (e.g. an AVX2-only
    AMD EPYC), where oneDNN has no bf16 kernels and torch runs bf16 matmuls through a generic
    loop (25x slower than fp32, benchmarks/README.md, "bfloat16 on an AVX2-only CPU"), and x86
    with AVX-512 but neither AVX512-BF16 nor AMX (below). There bf16 autocast makes a CPU run
    slower instead of faster. False when torch cannot say."""
    import torch

    check = getattr(getattr(torch.ops, "mkldnn", None), "_is_mkldnn_bf16_supported", None)
    try:
        if check is not None and not bool(check()):
            return True
    except Exception:  # an op this torch build lacks: keep what the recipe says
        return False
    # x86 with AVX-512 but neither AVX512-BF16 nor AMX: oneDNN "supports" bf16 by converting
    # to fp32 around each product, measured 3.6x slower than fp32 per matmul and 2.0x slower per
    # demo step on such a Xeon (benchmarks/README.md, "bfloat16 on an AVX-512 CPU without
    # AVX512-BF16"). Native bf16 is AVX512-BF16 or AMX.
    cpu = getattr(torch, "cpu", None)
    native = [
        getattr(cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    ]
    avx512 = getattr(cpu, "_is_avx512_supported", None)
    if avx512 is None or any(f is None for f in native):
        return False  # this torch cannot say: keep what the recipe says
    try:
        return bool(avx512()) and not any(bool(f()) for f in native)
    except Exception:
        return False


def runs_on_cpu(t, gpus: int | None = None) -> bool:
    """Whether a run of trainer config ``t`` computes on the CPU here."""
    if t.accelerator == "cpu":
        return True
    if t.accelerator != "auto" or (_gpus() if gpus is None else gpus) > 0:
        return False
    if gpus is None:  # Lightning's auto takes Apple's GPU where there is one
        import torch

        mps = getattr(torch.backends, "mps", None)
        return not (mps is not None and mps.is_available())
    return True


def cpu_precision(t, gpus: int | None = None, slow: bool | None = None):
    """``(t, None)``, or ``(t with precision 32-true, one line)`` when ``t`` asks for a bf16
    precision, runs on the CPU, the CPU has no fast bfloat16 (``cpu_bf16_is_slow``; ``slow``
    overrides it in tests) and ``trainer.cpu_bf16`` is ``auto``."""
    if str(t.precision) not in BF16_PRECISIONS or t.cpu_bf16 != "auto":
        return t, None
    if not runs_on_cpu(t, gpus) or not (cpu_bf16_is_slow() if slow is None else slow):
        return t, None
    line = (
        f"trainer.precision {t.precision} -> 32-true: this CPU has no native bfloat16 "
        "arithmetic (neither AVX512-BF16 nor AMX; bf16 products measured 3.6-25x slower than "
        "fp32 on such CPUs); trainer.cpu_bf16=keep keeps bf16"
    )
    return dataclasses.replace(t, precision="32-true"), line


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: a cluster job's share, not the
    node's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def _default_workers(cfg) -> str | None:
    """A data section's *default* loader worker count (4 for most sources), lowered to the
    CPUs each process may use: more workers than cores only take turns with the step (torch
    warns about it). A value the user or a recipe wrote is kept as written."""
    from unipred.train.provenance import set_source, source_of

    workers = getattr(getattr(cfg, "data", None), "num_workers", 0)
    if not isinstance(workers, int) or source_of(cfg, "data.num_workers") != "default":
        return None
    devices = getattr(cfg.trainer, "devices", 1)
    cores = max(1, usable_cpus() // (devices if isinstance(devices, int) and devices > 0 else 1))
    if workers <= cores:
        return None
    cfg.data.num_workers = cores
    set_source(cfg, "data.num_workers", "this machine (see the line above)")
    return (f"data.num_workers {workers} (the data section's default) -> {cores}: "
            f"{cores} CPU core{'s' if cores > 1 else ''} per process here")  # fmt: skip
