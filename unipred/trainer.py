"""Trainer assembly for the engine: strategy (DDP/FSDP), loggers, callbacks, checkpoints.

``build_trainer(cfg, lit)`` turns the ``trainer``/``ema`` sections of a RunConfig into a
Lightning Trainer for a ``LitTask`` (engine.py). Gradient clipping is done by the LitTask
itself (see ``LitTask.configure_gradient_clipping``), so no clip value is passed here.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import lightning as L

from unipred.callbacks import EMA


def _strategy(cfg):
    t = cfg.trainer
    if t.strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(
            gradient_as_bucket_view=True, find_unused_parameters=t.find_unused_parameters
        )
    if t.strategy == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        from unipred.predictor import Block

        return FSDPStrategy(
            auto_wrap_policy={Block},
            state_dict_type="full",
            activation_checkpointing_policy={Block} if t.activation_checkpointing else None,
        )
    return t.strategy


def _loggers(cfg, out: Path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    loggers = []
    for name in cfg.trainer.loggers:
        if name == "csv":
            loggers.append(CSVLogger(out, name="logs"))
        elif name == "tensorboard":
            try:
                loggers.append(TensorBoardLogger(out, name="tb"))
            except ModuleNotFoundError:
                warnings.warn("tensorboard is not installed; logging to CSV only", stacklevel=2)
        elif name == "wandb":
            if importlib.util.find_spec("wandb") is None:
                raise ValueError(
                    "trainer.loggers names 'wandb' but wandb is not installed (pip install wandb)"
                )
            from lightning.pytorch.loggers import WandbLogger

            loggers.append(WandbLogger(project=cfg.trainer.wandb_project, save_dir=str(out)))
        else:
            raise ValueError(
                f"trainer.loggers: unknown logger {name!r}; use csv, tensorboard, wandb"
            )
    return loggers or False


def build_trainer(cfg, lit, callbacks=()) -> L.Trainer:
    """A Lightning Trainer realising the recipe of ``cfg`` for ``lit``."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from unipred.callbacks import CollapseMonitor, NonFiniteLossStop, Throughput
    from unipred.checkpoint import AtomicCheckpointIO, PeriodicCheckpoint, Preemption
    from unipred.quiet import PlainProgress, quiet_third_party, use_tqdm

    quiet_third_party()
    t, plan, out = cfg.trainer, lit.plan, Path(cfg.run_dir)
    from unipred.data.accounting import lightning_callback as bad_sample_logger

    # bad samples skipped/converted by any reader: logged (summed over workers and ranks)
    # and written to RUN_DIR/data_report.json every epoch
    report = None if t.fast_dev_run else out / "data_report.json"  # counts + names per epoch
    cbs = [NonFiniteLossStop(t.log_every_n_steps), Throughput(plan["global_batch"]),
           bad_sample_logger(report=report), *callbacks]  # fmt: skip
    ema_ok = cfg.ema.enabled and t.strategy != "fsdp"
    if cfg.ema.enabled and not ema_ok:
        warnings.warn(
            "EMA is not supported with FSDP (sharded weights); ema disabled", stacklevel=2
        )
    if ema_ok:
        cbs.append(EMA(cfg.ema.decay, cfg.ema.every_n_steps))
    if t.collapse_every_n_steps > 0 and hasattr(lit.task, "want_stats"):
        dim = getattr(getattr(lit.model, "cfg", None), "predictor", None)
        cbs.append(
            CollapseMonitor(
                t.collapse_every_n_steps, getattr(dim, "dim", 1), stop=t.stop_on_collapse
            )
        )
    if not t.fast_dev_run:
        cbs.append(PeriodicCheckpoint(out / "checkpoints", t.ckpt_every_n_steps, t.keep_ckpts))
        cbs.append(Preemption(out / "checkpoints"))  # SIGTERM / SIGUSR1: last.ckpt, stop
        cbs += _best_checkpoint(cfg, lit, ema_ok, out)
    tqdm = t.progress_bar and use_tqdm()  # a file or a pipe gets plain lines, no escape codes
    if tqdm:
        from unipred.callbacks import progress_bar

        cbs.append(progress_bar(max(1, min(t.log_every_n_steps, 20))))
    elif t.progress_bar:
        cbs.append(PlainProgress(max(t.log_every_n_steps, 1)))
    kw = {}
    for name in ("limit_train_batches", "limit_val_batches", "val_check_interval"):
        v = getattr(t, name)
        if v is not None:
            kw[name] = int(v) if v > 1 else v
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=_strategy(cfg),
        precision=t.precision,
        max_epochs=-1 if t.max_steps > 0 else t.max_epochs,  # max_steps, when set, rules
        max_steps=t.max_steps,
        accumulate_grad_batches=plan["accumulate_grad_batches"],
        check_val_every_n_epoch=t.val_every_n_epochs,
        log_every_n_steps=t.log_every_n_steps,
        callbacks=cbs,
        logger=False if t.fast_dev_run else _loggers(cfg, out),
        # our checkpoints are PeriodicCheckpoint's (and the best-model ModelCheckpoint's);
        # without one of its own Lightning would add a second, full-size copy of each
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in cbs),
        enable_progress_bar=tqdm,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        deterministic=t.deterministic,
        fast_dev_run=t.fast_dev_run or False,
        default_root_dir=str(out),
        plugins=[AtomicCheckpointIO()],
        enable_model_summary=False,
        **kw,
    )


def _best_checkpoint(cfg, lit, ema_ok: bool, out: Path) -> list:
    monitor = lit.task.monitor
    if not monitor or lit.task.build_dataset("val") is None:
        return []
    from lightning.pytorch.callbacks import ModelCheckpoint

    if ema_ok and cfg.ema.monitor_ema:
        monitor = monitor.replace("val/", "val_ema/", 1)
    return [
        ModelCheckpoint(
            dirpath=out / "best",
            filename="best",
            monitor=monitor,
            mode=lit.task.monitor_mode,
            save_top_k=1,
            save_last=False,
            auto_insert_metric_name=False,
        )
    ]
