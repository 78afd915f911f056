"""The InfoNCE losses' written-out forward / backward (``unipred.nn.loss._InfoNCE``) against the
same loss through plain autograd (logsumexp minus the diagonal over the masked logits: the code
before issue #27's rewrite), alternating in one process: the loss alone, and the whole training step of the small recipes
whose objective `model.objective.auto` gives batch negatives.

    .venv/bin/python -P benchmarks/infonce_step.py --rounds 5

Recipes timed (one thread, random inputs, eager fp32, forward + backward + AdamW; the
objective keys `auto` picks for them written out, since `auto` needs the data):

* ``video``: ``video/demo_pretrain``, 32 clips of 4 x 4 x 4 tubelets, horizon 8, MLP head,
  instance targets, ``infonce_batch`` (2,080 x 2,080 logits per horizon step);
* ``image``: ``small/pretrain`` at 20 px (25 patches), 128 images, horizon 10, the same keys;
* ``audio``: ``audio/digits_pretrain``, 64 clips of 1 s at 16 kHz, its own objective keys.

Each round times both sides in a rotating order; the ratio (plain / written out, > 1 = the
shipped loss is faster) is the median of the rounds' ratios. One JSON line per recipe.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

AUTO = ["model.objective.auto=false", "model.objective.head=mlp",
        "model.objective.target_norm=instance", "model.objective.loss=infonce_batch"]  # fmt: skip
RECIPES = {  # name -> (config, overrides, batch maker)
    "video": ("video/demo_pretrain", [*AUTO, "model.objective.horizon=8"],
              lambda: torch.randn(32, 3, 8, 32, 32)),
    "image": ("small/pretrain", [*AUTO, "model.objective.horizon=10", "data.aug.img_size=20",
                                  "model.tokenizer_args.in_chans=1", "model.num_classes=10"],
              lambda: torch.randn(128, 1, 20, 20)),
    "audio": ("audio/digits_pretrain", ["model.objective.auto=false"],
              lambda: torch.randn(64, 16000)),
}  # fmt: skip


def plain_pair_loss(pred, target, pair=None, kind="cosine", temperature=0.1):
    """The InfoNCE kinds as unipred computed them before issue #27's rewrite (logits / T, -inf
    on padded targets, logsumexp minus the diagonal, padded rows zeroed, all through autograd);
    any other kind: the shipped loss."""
    from unipred.nn import loss as shipped

    if kind not in ("infonce", "infonce_batch", "infonce_position"):
        return shipped.pair_loss(pred, target, pair, kind, temperature)
    p, t = F.normalize(pred.float(), dim=-1), F.normalize(target.float(), dim=-1)
    B, L, P = p.shape
    if kind == "infonce":
        logits = p @ t.transpose(1, 2) / temperature
        if pair is not None:
            logits = logits.masked_fill(~pair[:, None, :], float("-inf"))
        per = logits.logsumexp(dim=-1) - logits.diagonal(dim1=1, dim2=2)
    elif kind == "infonce_batch":
        logits = p.reshape(B * L, P) @ t.reshape(B * L, P).T / temperature
        if pair is not None:
            logits = logits.masked_fill(~pair.reshape(1, B * L), float("-inf"))
        per = (logits.logsumexp(dim=-1) - logits.diagonal()).reshape(B, L)
    else:
        logits = p.transpose(0, 1) @ t.transpose(0, 1).transpose(1, 2) / temperature
        if pair is not None:
            logits = logits.masked_fill(~pair.T[:, None, :], float("-inf"))
        per = (logits.logsumexp(dim=-1) - logits.diagonal(dim1=1, dim2=2)).T
    if pair is None:
        return per.mean()
    per = per.masked_fill(~pair, 0.0)
    return per.sum() / pair.float().sum().clamp_min(1.0)


def build(name: str):
    from unipred.base.registry import TASKS
    from unipred.nn.model import NEPA
    from unipred.train.config import load_config

    config, overrides, batch = RECIPES[name]
    cfg = load_config(config, overrides, check_paths=False)
    torch.manual_seed(0)
    return NEPA(TASKS.get(cfg.task)(cfg).model_config(head="none")), batch()


def timed(model, opt, x, steps: int) -> float:
    ts = []
    for _ in range(steps):
        t0 = time.perf_counter()
        model(x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(argv=None) -> int:
    import unipred.nn.objectives as objectives

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipes", nargs="*", default=list(RECIPES))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    shipped = objectives.pair_loss
    for name in a.recipes:
        model, x = build(name)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        sides = {"plain": plain_pair_loss, "shipped": shipped}
        with torch.no_grad():  # the same loss value both ways
            vals = {}
            for side, fn in sides.items():
                objectives.pair_loss = fn
                vals[side] = float(model(x).loss)
        times = {s: [] for s in sides}
        for r in range(a.rounds):
            for side in list(sides) if r % 2 == 0 else list(sides)[::-1]:
                objectives.pair_loss = sides[side]
                timed(model, opt, x, 1)  # warm-up
                times[side].append(timed(model, opt, x, a.steps))
        objectives.pair_loss = shipped
        ratios = [p / s for p, s in zip(times["plain"], times["shipped"])]
        print(json.dumps({
            "recipe": name, "loss": model.cfg.objective.loss,
            "horizon": model.cfg.objective.horizon,
            "step_s": {s: round(statistics.median(v), 4) for s, v in times.items()},
            "ratio_plain_over_shipped": round(statistics.median(ratios), 3),
            "rounds": [round(r, 3) for r in ratios], "loss_values": vals,
        }), flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
