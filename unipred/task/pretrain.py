"""``PretrainTask``: next-embedding pretraining on any data source, with the representation
collapse statistics it logs."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from unipred.task.base import Task


# ----------------------------------------------------------------------------------- bases
def collapse_stats(x: torch.Tensor, valid: torch.Tensor | None = None, max_rows: int = 4096):
    """Collapse indicators of embeddings x (..., D): per-dimension std (mean and min over
    dimensions), the effective rank exp(H(singular values / sum)) of the centred rows, and
    ``spread`` = sqrt(total variance / mean squared norm): the fraction of the rows' size that
    differs between rows, 1 for zero-mean rows, 0 when every row is the same vector. Unlike the
    std it does not depend on the scale, and unlike the effective rank it sees rows that
    shrink towards one vector (the residual differences can stay isotropic)."""
    x = x.detach().float().reshape(-1, x.shape[-1])
    if valid is not None:
        x = x[valid.reshape(-1).bool()]
    if x.shape[0] > max_rows:  # a fixed stride keeps it cheap and deterministic
        x = x[:: x.shape[0] // max_rows + 1]
    std = x.std(dim=0) if x.shape[0] > 1 else torch.zeros(x.shape[-1], device=x.device)
    s = torch.linalg.svdvals(x - x.mean(dim=0, keepdim=True))
    p = s / s.sum().clamp_min(1e-12)
    erank = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
    spread = (std.pow(2).sum() / x.pow(2).sum(-1).mean().clamp_min(1e-24)).sqrt()
    return {"std_mean": std.mean(), "std_min": std.min(), "erank": erank, "spread": spread}


class PretrainTask(Task):
    """Next-embedding pretraining: loss = model(x).loss, validation loss, collapse statistics.

    The engine sets ``self.want_stats = True`` on the steps where it wants collapse statistics.
    """

    objective: ClassVar[str] = "pretrain"
    summary: ClassVar[str] = "Next-embedding pretraining"
    want_stats: bool = False

    def build_model(self) -> nn.Module:
        from unipred.nn.model import NEPA

        mc = self.model_config(head="none")
        if mc.objective.auto and self.source is not None:
            mc = self._auto_objective(mc)
        return NEPA(mc)

    def _auto_objective(self, mc):
        """``model.objective.auto``: the objective chosen from the data (unipred.task.auto). The
        choice is written into the run config (auto off, keys set), so checkpoints, exports
        and resumed runs rebuild the same model without reading the data again."""
        from unipred.nn.model import build_tokenizer
        from unipred.task import auto

        section = self.cfg.model.objective
        explicit = {f.name for f in dataclasses.fields(section) if getattr(section, f.name)
                    is not None} - {"auto"}  # fmt: skip
        tok = build_tokenizer(mc.tokenizer, mc.predictor.dim, mc.tokenizer_args)
        t = self.cfg.trainer
        batch = int(t.per_device_batch or t.global_batch)  # an upper bound before the plan
        mc = auto.resolve(mc, self.source, tok, explicit, batch=batch)
        for key in auto.CHOSEN_KEYS:
            setattr(section, key, getattr(mc.objective, key))
        section.auto = False
        mc.objective = dataclasses.replace(mc.objective, auto=False)
        return mc

    def training_step(self, model, batch):
        out = model(self.inputs(batch))
        logs = {"loss": out.loss.detach()}
        if self.want_stats:
            stats = collapse_stats(out.predictions, out.valid)
            logs.update({f"collapse/{k}": v for k, v in stats.items()})
            # the targets: without stop-gradient these are what collapses first
            stats = collapse_stats(out.targets, out.valid)
            logs.update({f"collapse/target_{k}": v for k, v in stats.items()})
        if self.source is not None:
            logs.update(self.source.step_logs())
        return out.loss, logs

    def validation_step(self, model, batch, metrics):
        return {"loss": model(self.inputs(batch)).loss}
