"""AdamW / LARS parameter groups, layer-wise lr decay (LLRD), freezing and lr schedules.

Follows the official NEPA release (SihanXU/nepa: run_nepa.py and its fine-tuning script):

* no weight decay for biases, every norm (incl. QK-norm, fc_norm) and LayerScale, i.e. every
  parameter with ndim <= 1 or owned by a norm layer; the 3-D ``cls_token`` is decayed;
* LLRD factor ``llrd ** s`` with s = L-1-i for predictor block i, s = L for the embeddings
  (``cls_token``, ``tokenizer.*``), s = 0 elsewhere; the final ``predictor.norm`` and the head
  (except ``head.fc_norm``) train at ``head_lr`` when it is set (the release: 1e-3, unscaled);
* ``llrd_cosine_warmup``: each group has its own warmup w = max(1, W - round(W * min(f, 1))),
  a linear ramp 0 -> f over w steps, then f * (1 + cos(pi (t - w) / (T - w))) / 2;
* ``cosine``: one warmup of W steps for all groups, then a half cosine to 0 (times f).
"""

from __future__ import annotations

import fnmatch
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class OptimConfig:
    """Optimizer + schedule. lr = blr * global_batch / 256 unless ``lr`` is given."""

    name: str = "adamw"  # adamw | lars (MAE's linear-probe optimizer: SGD momentum + trust ratio)
    momentum: float = 0.9  # lars only
    blr: float = 1.5e-4  # base lr per 256 samples
    lr: float | None = None  # absolute lr; overrides the batch-size rule when set
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.05
    grad_clip: float = 1.0  # 0 disables clipping
    schedule: str = "cosine"  # cosine | llrd_cosine_warmup | poly | constant
    warmup_ratio: float = 0.0  # fraction of all optimizer steps (the release's warmup_ratio)
    warmup_steps: int | None = None  # absolute; overrides warmup_ratio when set
    llrd: float = 1.0  # layer-wise lr decay; 1.0 = off
    # block i gets llrd^(L-1-i+offset), the embeddings llrd^(L+offset): 0 = the NEPA release,
    # 1 = BEiT/MAE/mmseg's numbering (the top block already decayed once)
    llrd_depth_offset: int = 0
    head_lr: float | None = None  # lr of classifier + final norm (the release: 1e-3, unscaled)
    freeze: list[str] = field(default_factory=list)  # fnmatch patterns of parameter names
    fused: bool = True  # fused AdamW kernels (falls back with a warning where unsupported)

    def check(self) -> None:
        """Options with a fixed set of values: ValueError naming the key and the choices."""
        for key, value, allowed in (("optim.name", self.name, OPTIMIZERS),
                                    ("optim.schedule", self.schedule, tuple(SCHEDULES))):  # fmt: skip
            if value not in allowed:
                raise ValueError(f"{key}: {value!r} is not one of {', '.join(allowed)}")


_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._BatchNorm)
_NO_DECAY_NAME = re.compile(r"(bias|norm|layer_scale|\.ls\d\.gamma|gamma)$|_norm\.|norm\.")
_BLOCK = re.compile(r"^predictor\.blocks\.(\d+)\.")


def freeze(model: nn.Module, patterns: list[str]) -> list[str]:
    """Set requires_grad=False on parameters whose name matches an fnmatch pattern."""
    frozen = []
    for name, p in model.named_parameters():
        if any(fnmatch.fnmatchcase(name, pat) for pat in patterns):
            p.requires_grad_(False)
            frozen.append(name)
    bad = [pat for pat in patterns if not any(fnmatch.fnmatchcase(n, pat) for n in frozen)]
    if bad:
        raise ValueError(f"optim.freeze: pattern(s) {bad} match no parameter name")
    return frozen


def _norm_param_names(model: nn.Module) -> set[str]:
    names = set()
    for mname, m in model.named_modules():
        if isinstance(m, _NORMS):
            names.update(
                f"{mname}.{p}" if mname else p for p, _ in m.named_parameters(recurse=False)
            )
    return names


def layer_exponent(name: str, depth: int) -> int:
    """LLRD exponent s of a parameter (its lr factor is llrd ** s)."""
    m = _BLOCK.match(name)
    if m:
        return depth - 1 - int(m.group(1))
    if name == "cls_token" or name.startswith("tokenizer."):
        return depth
    return 0


def uses_head_lr(name: str) -> bool:
    """The release trains the classifier and the backbone's final norm at ``head_lr``."""
    return name.startswith("predictor.norm.") or (
        name.startswith("head.") and not name.startswith("head.fc_norm.")
    )


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    llrd: float = 1.0,
    head_lr: float | None = None,
    depth: int | None = None,
) -> list[dict]:
    """AdamW groups keyed by (base lr, LLRD exponent, decay). Each group carries ``lr`` (its
    base lr), ``lr_scale`` (llrd ** s), ``exponent`` s and ``names`` (for tests and logs)."""
    if depth is None:
        depth = len(getattr(getattr(model, "predictor", None), "blocks", []))
    norm_names = _norm_param_names(model)
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name in norm_names or bool(_NO_DECAY_NAME.search(name))
        wd = 0.0 if no_decay else weight_decay
        base = head_lr if (head_lr is not None and uses_head_lr(name)) else lr
        s = layer_exponent(name, depth) if llrd != 1.0 else 0
        key = (base, s, wd)
        if key not in groups:
            groups[key] = {
                "params": [],
                "names": [],
                "lr": base,
                "weight_decay": wd,
                "exponent": s,
                "lr_scale": llrd**s,
            }
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return list(groups.values())


def build_adamw(groups: list[dict], betas, eps: float, fused: bool = True):
    """torch AdamW, fused where the build supports it (falls back with a warning)."""
    kw = dict(betas=tuple(betas), eps=eps)
    if fused:
        try:
            return torch.optim.AdamW(groups, fused=True, **kw)
        except (RuntimeError, TypeError) as e:
            warnings.warn(f"fused AdamW unavailable ({e}); using the default kernel", stacklevel=2)
    return torch.optim.AdamW(groups, **kw)


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling, as MAE trains its linear probes.

    For every parameter with more than one dimension the update ``g + wd * p`` is rescaled by
    ``trust * ||p|| / ||g + wd * p||`` (left as is when either norm is 0); 1-D parameters
    (biases, norms) get neither weight decay nor rescaling. Then heavy-ball momentum:
    ``buf = momentum * buf + update``, ``p -= lr * buf``.
    """

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):  # fmt: skip
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"LARS needs lr, momentum, weight_decay >= 0; got {lr}, {momentum}, "
                             f"{weight_decay}")  # fmt: skip
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                        trust_coefficient=trust_coefficient)  # fmt: skip
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=g["weight_decay"])
                    pn, dn = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    ok = (pn > 0) & (dn > 0)
                    q = torch.where(ok, g["trust_coefficient"] * pn / dn.clamp_min(1e-30), 1.0)
                    d = d.mul(q)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(g["momentum"]).add_(d)
                p.add_(buf, alpha=-g["lr"])
        return loss


def build_optimizer(name: str, groups: list[dict], betas, eps: float, fused: bool = True,
                    momentum: float = 0.9):  # fmt: skip
    """``adamw`` (torch, fused where possible) or ``lars`` (MAE's linear-probe optimizer)."""
    if name == "adamw":
        return build_adamw(groups, betas, eps, fused)
    if name == "lars":
        return LARS(groups, momentum=momentum)
    raise ValueError(f"optim.name must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def warmup_steps(total: int, ratio: float, steps: int | None = None) -> int:
    """W as the HF trainer computes it: ceil(ratio * total), unless given in steps."""
    return int(steps) if steps is not None else int(math.ceil(ratio * total))


def cosine_multiplier(t: int, warmup: int, total: int, scale: float = 1.0) -> float:
    """HF ``get_cosine_schedule_with_warmup`` times ``scale``: t/W, then half cosine to 0."""
    if t < warmup:
        return scale * t / max(1, warmup)
    progress = (t - warmup) / max(1, total - warmup)
    return scale * max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def llrd_warmup_multiplier(t: int, warmup: int, total: int, factor: float) -> float:
    """The release's ``llrd_cosine_warmup`` for a group with LLRD factor f."""
    w = max(1, warmup - round(warmup * min(factor, 1.0)))
    if t < w:
        return factor * t / w
    progress = (t - w) / max(1, total - w)
    return factor * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def constant_multiplier(t: int, warmup: int, total: int, scale: float = 1.0) -> float:
    return scale * min(1.0, t / warmup) if warmup > 0 else scale


def poly_multiplier(
    t: int,
    warmup: int,
    total: int,
    scale: float = 1.0,
    power: float = 1.0,
    warmup_ratio: float = 1e-6,
) -> float:
    """mmcv's poly schedule with linear warmup, as the BEiT/MAE ADE20K runs used it:
    (1 - t/T)^power, times 1 - (1 - warmup_ratio)(1 - t/W) during the first W steps."""
    f = max(0.0, 1.0 - min(t, total) / max(1, total)) ** power
    if t < warmup:
        f *= 1.0 - (1.0 - warmup_ratio) * (1.0 - t / warmup)
    return scale * f


SCHEDULES = {
    "cosine": cosine_multiplier,
    "constant": constant_multiplier,
    "llrd_cosine_warmup": llrd_warmup_multiplier,
    "poly": poly_multiplier,
}
OPTIMIZERS = ("adamw", "lars")


def schedule_fns(groups: list[dict], kind: str, warmup: int, total: int) -> list[Callable]:
    """One multiplier function of the step per group (for torch's LambdaLR)."""
    if kind not in SCHEDULES:
        raise ValueError(
            f"optim.schedule: unknown schedule {kind!r}; use one of {sorted(SCHEDULES)}"
        )
    fn = SCHEDULES[kind]
    return [(lambda t, f=g["lr_scale"]: fn(t, warmup, total, f)) for g in groups]


def build(model: nn.Module, o: OptimConfig, lr: float, total: int, precision: str = "32-true"):
    """The optimizer and its per-step LambdaLR for ``model`` under ``o`` at base ``lr``
    (the batch plan's) over ``total`` optimizer steps -> (optimizer, scheduler, recipe entries)."""
    depth = len(getattr(getattr(model, "predictor", None), "blocks", [])) + o.llrd_depth_offset
    groups = param_groups(model, lr, o.weight_decay, o.llrd, o.head_lr, depth=depth)
    # fp16 loss scaling needs unscaled grads before clipping, which fused AdamW defers
    fused = o.fused and precision not in ("16-mixed", "16")
    opt = build_optimizer(o.name, groups, o.betas, o.eps, fused, o.momentum)
    warm = warmup_steps(total, o.warmup_ratio, o.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, schedule_fns(opt.param_groups, o.schedule, warm, total)
    )
    recipe = {"total_steps": total, "warmup_steps": warm, "schedule": o.schedule, "llrd": o.llrd,
              "weight_decay": o.weight_decay, "betas": list(o.betas), "grad_clip": o.grad_clip,
              "param_groups": len(groups)}  # fmt: skip
    return opt, sched, recipe
