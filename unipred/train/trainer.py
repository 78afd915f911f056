"""Trainer assembly for the engine: strategy (DDP/FSDP), loggers, callbacks, checkpoints.

``TrainerConfig`` is the ``trainer:`` section of a run config and ``BatchPlan`` the batch
recipe computed from it once per run. ``build_trainer(trainer, ema, out, lit)`` turns the
``trainer``/``ema`` sections into a Lightning Trainer for a ``LitTask`` (engine.py). Gradient clipping is done by the LitTask
itself (see ``LitTask.configure_gradient_clipping``), so no clip value is passed here.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightning as L

from unipred.base.warn import warn
from unipred.train.callbacks import EMA, EMAConfig


@dataclass
class TrainerConfig:
    """Hardware, precision, length and logging. The batch is the *global* batch."""

    global_batch: int = 256
    per_device_batch: int | None = None  # None = global_batch / (devices * nodes), no accumulation
    accelerator: str = "auto"  # auto | cpu | gpu
    devices: int = 1  # per node; -1 = all visible GPUs
    num_nodes: int = 1
    # auto | ddp | fsdp (FSDP1, full checkpoints, GPUs) | fsdp2 (torch fully_shard, sharded
    # checkpoints resharded on load to any world size, GPUs or CPU/gloo: unipred/train/sharded.py)
    strategy: str = "auto"
    find_unused_parameters: bool = False  # DDP: only for models with parameters a step skips
    precision: str = "32-true"  # 32-true | bf16-mixed | 16-mixed
    # auto: on a CPU without fast bfloat16 kernels (oneDNN has none: x86 without AVX-512, e.g.
    # an AVX2-only EPYC, where a bf16 matmul measured 25x slower than fp32) a bf16 precision
    # runs as 32-true, one line says so (unipred/train/machine.py) | keep: bf16 as written
    cpu_bf16: str = "auto"
    max_epochs: int = 1
    max_steps: int = -1  # optimizer steps; when set, max_epochs is ignored; -1 = max_epochs
    limit_train_batches: float | None = None  # fraction (<=1.0) or number of batches (>1)
    limit_val_batches: float | None = None
    val_every_n_epochs: int = 1
    val_check_interval: float | None = None
    # auto: bf16 CPU runs of models >= 512 wide compile each predictor block (measured faster,
    # cached between runs; unipred/train/compiling.py), elsewhere eager | true (whole model)
    # | false | blocks
    compile: str = "auto"
    activation_checkpointing: bool = False
    channels_last: bool = False
    ckpt_every_n_steps: int = 1000  # plus last.ckpt; 0 = only last.ckpt at epoch ends
    keep_ckpts: int = 2  # step checkpoints kept (newest), besides last.ckpt and best
    log_every_n_steps: int = 10
    collapse_every_n_steps: int = 100  # collapse monitor period (pretraining); 0 = off
    stop_on_collapse: bool = False  # end the run (naming the step) when the monitor fires
    loggers: list[str] = field(default_factory=lambda: ["csv", "tensorboard"])  # + "wandb"
    wandb_project: str = "unipred"
    progress_bar: bool = True
    deterministic: bool = False
    fast_dev_run: int = 0  # run N train/val batches only, no checkpoints or logs
    drop_last: bool = True
    # CPU runs: torch threads. 0 = the cores idle when the run starts (a busy machine gets
    # fewer threads; why: unipred/base/threads.py); -1 = torch's default
    threads: int = 0
    # with threads=0 on one CPU process: re-check the cores other jobs leave free every this
    # many seconds and raise/lower the threads (unipred/train/retune.py); 0 = never
    threads_check_s: float = 30.0


@dataclass(frozen=True)
class BatchPlan:
    """The batch recipe, computed once per run (``BatchPlan.of``) and handed to the loader, the
    optimizer, the Lightning trainer and the recipe record."""

    global_batch: int
    world_size: int
    per_device_batch: int
    accumulate_grad_batches: int
    lr: float  # optim.lr, else optim.blr * global_batch / 256
    head_lr: float | None

    @classmethod
    def of(cls, t: TrainerConfig, o) -> BatchPlan:
        """Global batch -> per-device batch and gradient accumulation; lr by the linear rule
        (``o`` is the OptimConfig). RecipeError when the devices cannot realise the batch."""
        devices = t.devices
        if devices < 1:  # -1 = every visible GPU, as Lightning reads it
            import torch

            devices = max(1, torch.cuda.device_count())
        world = devices * t.num_nodes
        per_dev = t.per_device_batch or t.global_batch // world
        if per_dev < 1 or t.global_batch % (per_dev * world):
            from unipred.train.config import RecipeError

            raise RecipeError(
                f"trainer.global_batch={t.global_batch} is not a multiple of per_device_batch "
                f"({per_dev}) x devices ({devices}) x num_nodes ({t.num_nodes}); change "
                f"trainer.per_device_batch or the device count"
            )
        lr = o.lr if o.lr is not None else o.blr * t.global_batch / 256
        return cls(t.global_batch, world, per_dev, t.global_batch // (per_dev * world), lr,
                   o.head_lr)  # fmt: skip

    def __getitem__(self, key: str):  # plan["lr"], as the recipe record reads it
        return getattr(self, key)

    def as_dict(self) -> dict:
        return asdict(self)


def batch_plan(cfg) -> BatchPlan:
    """The batch plan of a run config (its ``trainer`` and ``optim`` sections)."""
    return BatchPlan.of(cfg.trainer, cfg.optim)


def _strategy(t: TrainerConfig, world_size: int = 1):
    if t.strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(
            gradient_as_bucket_view=True, find_unused_parameters=t.find_unused_parameters
        )
    if t.strategy == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        from unipred.nn.predictor import Block

        return FSDPStrategy(
            auto_wrap_policy={Block},
            state_dict_type="full",
            activation_checkpointing_policy={Block} if t.activation_checkpointing else None,
        )
    if t.strategy == "fsdp2":
        from unipred.train.sharded import ShardedStrategy

        return ShardedStrategy(world_size)
    return t.strategy


def _loggers(t: TrainerConfig, out: Path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    loggers = []
    for name in t.loggers:
        if name == "csv":
            loggers.append(CSVLogger(out, name="logs"))
        elif name == "tensorboard":
            try:
                loggers.append(TensorBoardLogger(out, name="tb"))
            except ModuleNotFoundError:
                warn("tensorboard is not installed; logging to CSV only")
        elif name == "wandb":
            if importlib.util.find_spec("wandb") is None:
                raise ValueError(
                    "trainer.loggers names 'wandb' but wandb is not installed (pip install wandb)"
                )
            from lightning.pytorch.loggers import WandbLogger

            loggers.append(WandbLogger(project=t.wandb_project, save_dir=str(out)))
        else:
            raise ValueError(
                f"trainer.loggers: unknown logger {name!r}; use csv, tensorboard, wandb"
            )
    return loggers or False


def build_trainer(t: TrainerConfig, ema: EMAConfig, out: Path, lit, callbacks=()) -> L.Trainer:
    """A Lightning Trainer realising ``t`` (and the EMA of ``ema``) for ``lit``, with its batch
    plan ``lit.plan``; checkpoints and logs go under ``out``."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from unipred.base.quiet import PlainProgress, quiet_third_party, use_tqdm
    from unipred.train.callbacks import CollapseMonitor, NonFiniteLossStop, Throughput
    from unipred.train.checkpoint import AtomicCheckpointIO, PeriodicCheckpoint, Preemption

    quiet_third_party()
    plan, out = lit.plan, Path(out)
    from unipred.data.accounting import lightning_callback as bad_sample_logger

    # bad samples skipped/converted by any reader: logged (summed over workers and ranks)
    # and written to RUN_DIR/data_report.json every epoch
    report = None if t.fast_dev_run else out / "data_report.json"  # counts + names per epoch
    cbs = [NonFiniteLossStop(t.log_every_n_steps), Throughput(plan.global_batch),
           bad_sample_logger(report=report), *callbacks]  # fmt: skip
    ema_ok = ema.enabled and t.strategy != "fsdp"
    val_ema = False  # whether validation reports the EMA's weights (val_ema/), to monitor
    if ema.enabled and not ema_ok:
        warn("EMA is not supported with trainer.strategy=fsdp; ema disabled (fsdp2 keeps it)")
    if ema_ok and t.strategy == "fsdp2":
        from unipred.train.sharded_ema import ShardedEMA

        cbs.append(ShardedEMA.from_config(ema))
        val_ema = True  # validated by swapping its slices in (unipred.train.sharded_ema)
    elif ema_ok:
        cbs.append(EMA.from_config(ema))
        val_ema = True
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
        cbs += _best_checkpoint(lit, val_ema and ema.monitor_ema, out)
    tqdm = t.progress_bar and use_tqdm()  # a file or a pipe gets plain lines, no escape codes
    if tqdm:
        from unipred.train.callbacks import progress_bar

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
        strategy=_strategy(t, plan.world_size),
        precision=t.precision,
        max_epochs=-1 if t.max_steps > 0 else t.max_epochs,  # max_steps, when set, rules
        max_steps=t.max_steps,
        accumulate_grad_batches=plan.accumulate_grad_batches,
        check_val_every_n_epoch=t.val_every_n_epochs,
        log_every_n_steps=t.log_every_n_steps,
        callbacks=cbs,
        logger=False if t.fast_dev_run else _loggers(t, out),
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


def _best_checkpoint(lit, monitor_ema: bool, out: Path) -> list:
    monitor = lit.task.monitor
    if not monitor or lit.dataset("val") is None:
        return []
    from lightning.pytorch.callbacks import ModelCheckpoint

    if monitor_ema:
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
