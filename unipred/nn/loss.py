"""The next-embedding prediction loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def next_embedding_loss(
    pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Negative cosine between the output at t and the (detached) input token at t+1.

    pred:   (B, T, D) predictor outputs after the final norm.
    target: (B, T, D) raw input tokens (prefix + tokenizer output, before any norm).
    valid:  optional (B, T) bool; a pair counts only when both t and t+1 are real tokens.
    Returns a scalar in [-1, 1]; -1 is a perfect prediction. Computed in float32.
    """
    if pred.shape != target.shape or pred.dim() != 3:
        raise ValueError(
            f"pred and target must both be (B, T, D); got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    p = pred[:, :-1].float()
    t = target[:, 1:].detach().float()  # stop-gradient: the target side never learns from the loss
    cos = F.cosine_similarity(p, t, dim=-1)  # (B, T-1)
    if valid is None:
        return -cos.mean()
    if valid.shape != pred.shape[:2]:
        raise ValueError(
            f"valid must be (B, T) = {tuple(pred.shape[:2])}, got {tuple(valid.shape)}"
        )
    pair = (valid[:, :-1] & valid[:, 1:]).float()
    return -(cos * pair).sum() / pair.sum().clamp_min(1.0)


LOSSES = ("cosine", "mse", "smooth_l1", "infonce", "infonce_batch", "infonce_position")


class _InfoNCE(torch.autograd.Function):
    """Mean cross-entropy of picking row i's own target i among its group's targets.

    pf (G, N, P): predictions, unit vectors / temperature; tf (G, N, P): unit targets; keep
    (G, N) bool or None: a pair (row i and candidate i) is real. Padded candidates get no
    probability, padded rows no loss, and the mean runs over real rows; a group without a real
    pair adds nothing (no NaN). Written out because the (G, N, N) logits dominate a small
    model's step (issue #27): the forward keeps the row-wise exp in place of the logits (one
    buffer, three passes over it), the backward is two matrix products with per-row scales,
    against the ~8 passes and a second N x N buffer of log-softmax + NLL through autograd.
    float32 throughout (autocast off), once differentiable.
    """

    @staticmethod
    def forward(ctx, pf, tf, keep, extra=None, extra_keep=None):
        # extra (G, M, P), extra_keep (G, M) bool: more candidates that are no row's own target
        # (the other data-parallel ranks' targets, constants here), after the N of tf
        with torch.autocast(pf.device.type, enabled=False):
            pf, tf = pf.float(), tf.float()
            cand, ckeep = tf, keep
            if extra is not None:
                cand = torch.cat([tf, extra.float()], dim=1)
                own = keep if keep is not None else torch.ones(tf.shape[:2], dtype=torch.bool,
                                                               device=tf.device)  # fmt: skip
                ckeep = torch.cat([own, extra_keep], dim=1)
            e = pf @ cand.transpose(1, 2)  # (G, N, N [+ M]) logits
            if ckeep is not None:
                e.masked_fill_(~ckeep[:, None, :], torch.finfo(e.dtype).min)
            m = e.amax(dim=2, keepdim=True)
            e.sub_(m).exp_()
            s = e.sum(dim=2)  # (G, N)
            per = m.squeeze(2) + s.log() - (pf * tf).sum(-1)
            w = torch.ones_like(s) if keep is None else keep.to(s.dtype)
            count = w.sum().clamp_min(1.0)
            ctx.save_for_backward(pf, tf, cand, e, s, w, count)
            return (per * w).sum() / count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        pf, tf, cand, e, s, w, count = ctx.saved_tensors
        a = (grad / count) * w  # each row's weight in the mean
        gp = gt = None
        if ctx.needs_input_grad[0]:  # softmax(logits) @ candidates - tf_own, row-scaled
            gp = (a / s)[..., None] * (e @ cand) - a[..., None] * tf
        if ctx.needs_input_grad[1]:  # the own targets' columns only
            n = tf.shape[1]
            gt = e[:, :, :n].transpose(1, 2) @ ((a / s)[..., None] * pf) - a[..., None] * pf
        return gp, gt, None, None, None


def _other_ranks(tf: torch.Tensor, keep: torch.Tensor | None):
    """The other data-parallel ranks' targets as more negatives for ``infonce_batch``: ((1, M,
    P) targets, (1, M) keep) gathered from every rank but this one, or (None, None) when there
    is nothing to gather: one process, no gradient (evaluation, where ranks need not run in
    step), or targets that take a gradient (``stop_grad=false``: a gathered copy would carry
    none back, so each rank keeps its own batch's negatives). With the stop-gradient of the
    release the loss and its gradients are then those of one process holding the whole batch
    (equal row counts per rank). tf (N, P), keep (N,) bool or None."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None, None
    if not torch.is_grad_enabled() or tf.requires_grad:
        return None, None
    world, rank = dist.get_world_size(), dist.get_rank()
    n = tf.shape[0]
    sizes = [torch.zeros(1, dtype=torch.long, device=tf.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.long, device=tf.device))
    sizes = [int(x) for x in sizes]
    big = max(sizes)  # ranks may hold different token counts (a short last batch): pad
    mine = tf.new_zeros(big, tf.shape[1] + 1)  # the keep mask rides as a last column: 1 gather
    mine[:n, :-1] = tf
    mine[:n, -1] = 1.0 if keep is None else keep.to(tf.dtype)
    got = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(got, mine)
    x = torch.cat([got[r][: sizes[r]] for r in range(world) if r != rank])
    return x[None, :, :-1], x[None, :, -1] > 0.5


def pair_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    pair: torch.Tensor | None = None,
    kind: str = "cosine",
    temperature: float = 0.1,
) -> torch.Tensor:
    """Mean loss between aligned predictions and targets (B, L, P) over pairs (B, L) | None.

    cosine: negative cosine (the release; same operations as ``next_embedding_loss``);
    mse / smooth_l1: per-pair mean over the P values; infonce: cross-entropy of picking the
    pair's own target among all (valid) targets of the same sample, cosine / temperature;
    infonce_batch: the same among all (valid) targets of the whole batch, so the other samples'
    tokens are negatives too and different samples are pushed apart (a (B L)^2 matrix: sized
    for small models and batches, such as the audio recipe's 64 clips of 25 tokens); in a
    data-parallel run the other ranks' targets join as negatives (gathered, see
    ``_other_ranks``), so the global batch is the batch, as in one process;
    infonce_position: the same among the targets at the same position of every sample of the
    batch (L matrices of B x B: the negatives are what other samples hold where this one's
    target is, never other positions; grows with B^2 L, not (B L)^2).
    The caller aligns: pred[:, i] predicts target[:, i]. Computed in float32.
    """
    p, t = pred.float(), target.float()
    if kind == "cosine":
        per = -F.cosine_similarity(p, t, dim=-1)
    elif kind == "mse":
        per = (p - t).pow(2).mean(dim=-1)
    elif kind == "smooth_l1":
        per = F.smooth_l1_loss(p, t, reduction="none").mean(dim=-1)
    elif kind in ("infonce", "infonce_batch", "infonce_position"):
        B, L, P = p.shape
        pf, tf = F.normalize(p, dim=-1) / temperature, F.normalize(t, dim=-1)
        if kind == "infonce":  # a group per sample: its L targets
            return _InfoNCE.apply(pf, tf, pair)
        if kind == "infonce_batch":  # one group: every target of the batch (of every rank)
            keep = None if pair is None else pair.reshape(1, B * L)
            tf = tf.reshape(1, B * L, P)
            xt, xk = _other_ranks(tf[0], None if keep is None else keep[0])
            return _InfoNCE.apply(pf.reshape(1, B * L, P), tf, keep, xt, xk)
        keep = None if pair is None else pair.T  # a group per position: the B samples' targets
        return _InfoNCE.apply(pf.transpose(0, 1), tf.transpose(0, 1), keep)
    else:
        raise ValueError(f"unknown loss {kind!r}; use one of {', '.join(LOSSES)}")
    if pair is None:
        return per.mean()
    w = pair.float()
    return (per * w).sum() / w.sum().clamp_min(1.0)
