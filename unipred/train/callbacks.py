"""Lightning callbacks of the engine: EMA, throughput, collapse monitor, non-finite loss stop.

``EMA`` builds on Lightning's own ``EMAWeightAveraging`` (torch ``AveragedModel`` with the foreach EMA
average function): the first update after the first optimizer step copies the weights, every
later optimizer step averages them, exactly as the release's trainer does. Unlike the stock
callback it averages only the task model, keeps the *raw* weights in the module (validation
runs on both; see engine.py), and stores the EMA weights under ``ema_state_dict``.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.callbacks.weight_averaging import EMAWeightAveraging
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class NonFiniteLossError(RuntimeError):
    """Training stopped on a NaN/inf loss; the message names the step."""


@dataclass
class EMAConfig:
    enabled: bool = True
    decay: float = 0.9999
    every_n_steps: int = 1
    monitor_ema: bool = True  # best checkpoint follows the EMA metric (the release does)


class EMA(EMAWeightAveraging):
    """EMA of ``pl_module.model`` (decay 0.9999 in both NEPA recipes), fp32, same device."""

    def __init__(self, decay: float = 0.9999, every_n_steps: int = 1):
        super().__init__(decay=decay, update_every_n_steps=every_n_steps)
        self.decay = decay
        self._n: int | None = None  # updates held by the average, mirrored on the host

    @classmethod
    def from_config(cls, c: EMAConfig) -> EMA:
        return cls(c.decay, c.every_n_steps)

    def setup(self, trainer, pl_module, stage):
        if stage == "fit" and self._average_model is None:
            self._average_model = AveragedModel(
                pl_module.model, use_buffers=True, multi_avg_fn=get_ema_multi_avg_fn(self.decay)
            )

    def on_fit_start(self, trainer, pl_module):
        # setup() runs before Lightning moves the model to its device; an EMA left on the CPU
        # made every step copy all weights to the host (measured: +80 ms/step, ViT-B on H100)
        if self._average_model is not None:
            self._average_model.to(pl_module.device)

    @property
    def module(self):
        """The EMA copy of the task model, or None before the first update."""
        m = self._average_model
        return m.module if m is not None and self._count() > 0 else None

    def _count(self) -> int:
        # how many updates the average holds, kept on the host: AveragedModel's own update
        # reads its device counter (two host syncs per optimizer step on a GPU)
        if self._n is None:
            self._n = int(self._average_model.n_averaged)
        return self._n

    @torch.no_grad()
    def _update(self, model) -> None:
        """``AveragedModel.update_parameters`` (use_buffers=True) without reading the device:
        the first update copies, later ones apply the same EMA function per device and dtype."""
        avg = self._average_model
        ema = [*avg.module.parameters(), *avg.module.buffers()]
        cur = [t.detach() for t in (*model.parameters(), *model.buffers())]
        if len(ema) != len(cur):
            raise RuntimeError(f"EMA holds {len(ema)} tensors, the model {len(cur)}")
        if self._count() == 0:
            for e, c in zip(ema, cur):
                e.detach().copy_(c.to(e.device))
        else:
            groups: dict = {}
            for e, c in zip(ema, cur):
                g = groups.setdefault((e.device, e.dtype), ([], []))
                g[0].append(e.detach())
                g[1].append(c.to(e.device))
            for (device, _), (es, cs) in groups.items():
                avg.multi_avg_fn(es, cs, avg.n_averaged.to(device))
        avg.n_averaged += 1
        self._n += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step_idx = trainer.global_step - 1
        if trainer.global_step > self._latest_update_step and self.should_update(step_idx=step_idx):
            self._update(pl_module.model)
            self._latest_update_step = trainer.global_step

    def on_train_epoch_end(self, trainer, pl_module):
        pass  # updates are per optimizer step only

    def on_train_end(self, trainer, pl_module):
        pass  # keep the raw weights in the module; the EMA weights live in the checkpoint

    def on_validation_epoch_start(self, trainer, pl_module):
        pass  # no swapping: the engine validates raw and EMA weights side by side

    def on_validation_epoch_end(self, trainer, pl_module):
        pass

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if self._average_model is not None:
            checkpoint["ema_state_dict"] = self._average_model.module.state_dict()
            checkpoint["ema_n_averaged"] = self._average_model.n_averaged.clone()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        if self._average_model is None or "ema_state_dict" not in checkpoint:
            return
        self._average_model.module.load_state_dict(checkpoint["ema_state_dict"])
        self._average_model.n_averaged.copy_(checkpoint["ema_n_averaged"])
        self._n = int(checkpoint["ema_n_averaged"])


class NonFiniteLossStop(Callback):
    """No update computed from a NaN/inf loss is ever applied; the run stops with a message
    naming the first such optimizer step, and the last checkpoint stays the last good one.

    With fused AdamW (the engine's default) this costs no host sync per step: the check stays
    on the device and reaches the optimizer as ``found_inf`` (the mechanism of torch's
    GradScaler), so the fused kernel skips the whole update (weights, moments, step count).
    The host reads the flag every ``check_every`` steps, before writing any checkpoint and
    at the end of training, and stops the run then. Other optimizers (LARS, unfused AdamW)
    are checked on the host before every backward pass, as reading the loss requires.
    """

    def __init__(self, check_every: int = 20):
        self.check_every = max(1, int(check_every))
        self._bad = None  # device: 1.0 if a loss of this optimizer step was not finite
        self._first = None  # device int64: the first bad optimizer step, -1 while none
        self._checked = -1  # the optimizer step of the last periodic check

    @staticmethod
    def _deferred(trainer) -> bool:
        opts = trainer.optimizers
        return len(opts) == 1 and bool(opts[0].defaults.get("fused"))

    def on_before_backward(self, trainer, pl_module, loss):
        if self._deferred(trainer):
            bad = (~torch.isfinite(loss.detach()).all()).float()
            if trainer.world_size > 1 and torch.distributed.is_initialized():
                torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
            self._bad = bad if self._bad is None else torch.maximum(self._bad, bad)
            return
        bad = not bool(torch.isfinite(loss.detach()).all())
        if trainer.world_size > 1:  # every rank must stop together
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            self._stop(trainer.global_step, trainer, loss.detach().float().item())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self._bad is None:
            return
        optimizer.found_inf = self._bad  # read by the fused kernel: 1.0 skips this update
        if self._first is None:
            self._first = torch.full((), -1, dtype=torch.long, device=self._bad.device)
        first_bad = (self._bad > 0) & (self._first < 0)
        self._first = torch.where(first_bad, trainer.global_step, self._first)

    def on_before_zero_grad(self, trainer, pl_module, optimizer):
        # a new accumulation window starts: forget the last step's flag
        if getattr(optimizer, "found_inf", None) is not None:
            optimizer.found_inf = None
        self._bad = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # once per optimizer step (with accumulation this hook runs for every micro-batch)
        if trainer.global_step % self.check_every == 0 and trainer.global_step != self._checked:
            self._checked = trainer.global_step
            self.check(trainer)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.check(trainer)  # raising here leaves the previous checkpoint file in place

    def on_train_end(self, trainer, pl_module):
        self.check(trainer)

    def check(self, trainer) -> None:
        """Raise NonFiniteLossError if any optimizer step so far had a non-finite loss."""
        if self._first is not None and (step := int(self._first)) >= 0:
            self._stop(step, trainer)

    @staticmethod
    def _stop(step: int, trainer, value=None):
        what = f"non-finite loss ({value})" if value is not None else "non-finite loss"
        raise NonFiniteLossError(
            f"{what} at optimizer step {step} (epoch {trainer.current_epoch}); no update from "
            f"it was applied; training stopped, the last checkpoint in the run dir is the "
            f"last good one"
        )


class Throughput(Callback):
    """samples/s (global, over all ranks), the time per optimizer step and
    ``perf/data_wait``: the fraction of the training time this rank spent waiting for its
    next batch (from the end of one batch to the start of the next), so a slow data store
    shows up beside the speed. The fraction covers the last ``window`` batches."""

    def __init__(self, samples_per_step: int, window: int = 50):
        self.samples_per_step, self.window = samples_per_step, window
        self._t, self._step = None, None
        self._end, self._start, self._times = None, None, []

    def on_train_epoch_start(self, trainer, pl_module):
        self._end = time.perf_counter()  # the first batch's wait includes starting the loader

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now, step = time.perf_counter(), trainer.global_step
        if self._end is not None and self._start is not None:
            self._times = [
                *self._times[-self.window + 1 :],
                (self._start - self._end, now - self._end),
            ]
            wait = sum(w for w, _ in self._times) / max(sum(t for _, t in self._times), 1e-9)
            pl_module.log("perf/data_wait", wait, rank_zero_only=True)
        self._end = now
        if self._t is not None and step > self._step:
            dt = (now - self._t) / (step - self._step)
            pl_module.log("perf/samples_per_s", self.samples_per_step / dt, rank_zero_only=True)
            pl_module.log("perf/step_s", dt, rank_zero_only=True)
        if self._step is None or step > self._step:
            self._t, self._step = now, step


class CollapseMonitor(Callback):
    """Every N optimizer steps, ask the task for collapse statistics (per-dimension std,
    effective rank) of its predictions and of its targets, log them, and warn when either
    collapses; with ``stop`` (``trainer.stop_on_collapse``) the run ends there, the message
    naming the step (``stopped_step``), after writing its last checkpoint as usual.

    Thresholds: effective rank below ``max(1.5, min_erank_frac * dim)``, mean per-dimension
    std below ``min_std``, or spread (the scale-free fraction of the rows' size that differs
    between rows; see ``unipred.task.collapse_stats``) below ``min_spread``. Measured on the
    Fashion-MNIST demo (docs/objectives.md): without stop-gradient the spread of the
    predictions falls from ~0.9 towards 0 within the first few hundred steps while their
    effective rank *rises* (the residual differences are isotropic noise), so the rank alone
    misses it; the release's objective stays near 0.85.

    Statistics may come per group (``collapse/NAME/erank``, ...: joint pretraining logs one
    group per source, on that source's batches); each group is checked and named on its own.
    """

    CHECKS = (("predictions", ""), ("targets", "target_"))

    def __init__(
        self,
        every_n_steps: int,
        dim: int,
        min_erank_frac: float = 0.01,
        min_std: float = 1e-3,
        min_spread: float = 0.1,
        stop: bool = False,
    ):
        self.every, self.dim = every_n_steps, dim
        self.min_erank = max(1.5, min_erank_frac * dim)
        self.min_std, self.min_spread = min_std, min_spread
        self.stop = stop
        self.warned = 0
        self.first_step: int | None = None  # optimizer step of the first warning
        self.stopped_step: int | None = None
        self.history: list[dict] = []  # every check: step and the statistics seen
        self._step, self._logged = 0, None

    def _log(self, trainer, logs: dict) -> None:
        """Straight to the loggers, once per checked step: Lightning's own ``log`` would keep
        them only on steps that fall on ``trainer.log_every_n_steps`` (none at all when an
        epoch is shorter than that interval)."""
        metrics = {f"train/{k}": float(v) for k, v in logs.items() if k.startswith("collapse/")}
        key = (self._step, tuple(sorted(metrics)))  # a joint run's sources log at other batches
        if not trainer.is_global_zero or self._logged == key:
            return
        self._logged = key
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=self._step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if hasattr(pl_module.task, "want_stats"):
            pl_module.task.want_stats = trainer.global_step % self.every == 0
            self._step = trainer.global_step  # the optimizer step this batch belongs to

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        logs = (outputs or {}).get("logs", {}) if isinstance(outputs, dict) else {}
        bad, seen = [], {"step": self._step}
        # "collapse/erank", or per group (joint pretraining: per source) "collapse/NAME/erank"
        groups = sorted({k[len("collapse/") : -len("erank")] for k in logs
                         if k.startswith("collapse/") and k.endswith("/erank")})  # fmt: skip
        for group in [""] + [g for g in groups if g]:
            for what, pre in self.CHECKS:
                key = f"collapse/{group}{pre}"
                if f"{key}erank" not in logs:
                    continue
                erank = float(logs[f"{key}erank"])
                std = float(logs[f"{key}std_mean"])
                spread = float(logs.get(f"{key}spread", 1.0))
                seen.update({f"{group}{pre}erank": erank, f"{group}{pre}std_mean": std,
                             f"{group}{pre}spread": spread})  # fmt: skip
                if erank < self.min_erank or std < self.min_std or spread < self.min_spread:
                    bad.append(
                        f"{group.replace('/', ' ')}{what}: effective rank {erank:.2f}, mean "
                        f"per-dim std {std:.2e}, spread {spread:.3f}"
                    )
        if len(seen) > 1:
            self.history.append(seen)
            self._log(trainer, logs)
        if not bad:
            return
        step = self._step
        self.warned += 1
        if self.first_step is None:
            self.first_step = step
        msg = f"step {step}: embeddings may be collapsing ({'; '.join(bad)}; {self.dim} dims)"
        if self.stop:
            self.stopped_step = step
            trainer.should_stop = True
            msg += "; trainer.stop_on_collapse: training stopped at this step"
        warnings.warn(msg, stacklevel=2)


def progress_bar(refresh_rate: int, keys=("train/loss", "lr", "perf/samples_per_s")):
    """Lightning's TQDM bar showing ``keys`` from the trainer's metrics, read only when the bar
    refreshes. (Metrics logged with ``prog_bar=True`` are copied to the host after *every*
    batch, which on a GPU waits for all queued work each step.)"""
    from lightning.pytorch.callbacks import TQDMProgressBar

    class ProgressBar(TQDMProgressBar):
        def get_metrics(self, trainer, pl_module):
            out = super().get_metrics(trainer, pl_module)
            for k in keys:
                v = trainer.callback_metrics.get(k)
                if v is not None:
                    out[k.split("/")[-1]] = f"{float(v):.4g}"
            return out

    return ProgressBar(refresh_rate=refresh_rate)


def format_recipe(recipe: dict) -> str:
    """The effective recipe as aligned lines (printed at start, saved as recipe.json)."""
    width = max(len(k) for k in recipe)
    return "effective recipe:\n" + "\n".join(f"  {k:<{width}} {v}" for k, v in recipe.items())


def save_recipe(recipe: dict, path) -> None:
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(recipe, indent=2) + "\n")
