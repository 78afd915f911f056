"""The one training engine: a LightningModule around any Task, plus the Trainer assembly.

``fit(cfg)`` and ``evaluate(cfg)`` run any registered task from a RunConfig (config.py). The
task supplies model, data, loss and metrics; this file supplies the recipe (global batch ->
accumulation, lr scaling), optimizer and schedule (optim.py), EMA, precision, checkpoints and
resume (checkpoint.py), logging and distributed strategies.
"""

from __future__ import annotations

import random
from pathlib import Path

import lightning as L
import torch
from torch import nn

from unipred.base.registry import TASKS
from unipred.base.threads import threads_for_run, user_fixed_threads
from unipred.data.loader import build_loader
from unipred.train import optim
from unipred.train.callbacks import EMA
from unipred.train.config import RecipeError, recipe_changes, to_dict  # noqa: F401
from unipred.train.trainer import BatchPlan, batch_plan, build_trainer  # noqa: F401


class LitTask(L.LightningModule):
    """Runs a Task: its model, its training/validation step, the engine's optimizer."""

    def __init__(self, cfg, task=None, plan: BatchPlan | None = None):
        super().__init__()
        self.cfg = cfg
        _data_policy(cfg)
        self.task = task or TASKS.get(cfg.task)(cfg)
        # the batch recipe, computed once: the loader, the optimizer and the trainer read it
        self.plan = plan or BatchPlan.of(cfg.trainer, cfg.optim)
        self.model = self.task.build_model()
        if cfg.model.init:
            from unipred.train.checkpoint import apply_init

            apply_init(self.model, cfg.model.init)
        self.frozen = optim.freeze(self.model, list(cfg.optim.freeze))
        ckpt_blocks = cfg.trainer.activation_checkpointing and cfg.trainer.strategy != "fsdp"
        if ckpt_blocks and hasattr(self.model, "predictor"):  # FSDP wraps blocks itself
            self.model.predictor.grad_checkpointing = True
        if cfg.trainer.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.metrics = nn.ModuleDict(self.task.build_metrics())
        self.ema_metrics = nn.ModuleDict(self.task.build_metrics())
        self.recipe: dict = {}
        self._compiled = False
        # the current training batch pads for a rank out of samples / its loss weight
        self.padding, self.loss_weight = False, 1.0

    # -- hooks ----------------------------------------------------------------------------
    def configure_model(self):
        """``trainer.strategy=fsdp2``: shard the model over the ranks (unipred.train.sharded);
        the other strategies wrap the model themselves."""
        if self.cfg.trainer.strategy == "fsdp2":
            from unipred.train.sharded import shard_model

            shard_model(self.model, self.device_mesh["data_parallel"])

    def on_fit_start(self):
        if not self._compiled:  # in place: state-dict keys stay unchanged
            steps = getattr(self.trainer, "estimated_stepping_batches", None)
            steps = int(steps) if isinstance(steps, (int, float)) and steps < 2**62 else None
            t = self.cfg.trainer
            _compile(t.compile, self.model, self.device.type, steps, precision=t.precision)
            self._compiled = True

    def on_after_batch_transfer(self, batch, dataloader_idx):
        if self.cfg.trainer.channels_last:
            batch = _map_tensors(
                batch,
                lambda x: (
                    x.contiguous(memory_format=torch.channels_last)
                    if x.dim() == 4 and x.is_floating_point()
                    else x
                ),
            )
        return batch

    def on_train_epoch_start(self):
        ds = getattr(self.trainer.train_dataloader, "dataset", None)
        if isinstance(ds, torch.utils.data.IterableDataset) and hasattr(ds, "set_epoch"):
            ds.set_epoch(self.trainer.current_epoch)

    def on_train_batch_start(self, batch, batch_idx):
        loader = self.trainer.train_dataloader
        # a stream on several ranks: whether this batch only pads for a rank that has run
        # out of samples, and its loss weight (unipred.data.uneven)
        steps = getattr(loader, "steps", None)
        self.padding, self.loss_weight = steps.take() if steps is not None else (False, 1.0)
        if hasattr(loader, "mark_consumed") and not self.padding:
            loader.mark_consumed(self.trainer.current_epoch)

    def training_step(self, batch, batch_idx):
        loss, logs = self.task.training_step(self.model, batch)
        if self.loss_weight != 1.0:  # zero for a padding batch: its gradients are zeros
            loss = loss * self.loss_weight
        if self.padding:
            return {"loss": loss, "logs": {}}  # nothing of it is trained: nothing logged
        bs = self.task.batch_size(batch)
        for k, v in logs.items():
            if not k.startswith("collapse/"):  # CollapseMonitor logs those at its own period
                self.log(f"train/{k}", v, batch_size=bs)  # shown by callbacks.progress_bar
        self.log("lr", max(g["lr"] for g in self.trainer.optimizers[0].param_groups), batch_size=bs)
        return {"loss": loss, "logs": logs}

    def validation_step(self, batch, batch_idx):
        bs = self.task.batch_size(batch)
        logs = self.task.validation_step(self.model, batch, dict(self.metrics.items()))
        for k, v in logs.items():
            self.log(f"val/{k}", v, batch_size=bs, sync_dist=True)
        ema, sharded = self.ema_model(), self._sharded_ema()
        if ema is not None:
            logs = self.task.validation_step(ema, batch, dict(self.ema_metrics.items()))
        elif sharded is not None:  # fsdp2: the EMA slices stand in for the weights' slices
            with sharded.swapped(self.model) as swapped:
                logs = self.task.validation_step(swapped, batch, dict(self.ema_metrics.items()))
        if ema is not None or sharded is not None:
            for k, v in logs.items():
                self.log(f"val_ema/{k}", v, batch_size=bs, sync_dist=True)

    def on_validation_epoch_end(self):
        for prefix, metrics in (("val", self.metrics), ("val_ema", self.ema_metrics)):
            if prefix == "val_ema" and self.ema_model() is None and self._sharded_ema() is None:
                continue
            for name, m in metrics.items():
                self.log(f"{prefix}/{name}", m.compute(), prog_bar=(prefix == "val"))
                m.reset()

    def ema_model(self) -> nn.Module | None:
        """The EMA weights (in eval mode: no drop path, no RoPE augmentation, frozen BN
        statistics), or None before the first EMA update or without EMA."""
        if self._trainer is None:
            return None
        for cb in self.trainer.callbacks:
            if isinstance(cb, EMA) and cb.module is not None:
                return cb.module.eval()  # it is never trained; Lightning only sets our mode
        return None

    def _sharded_ema(self):
        """The sharded EMA of ``trainer.strategy=fsdp2`` once it holds an update, else None."""
        if self._trainer is None:
            return None
        for cb in self.trainer.callbacks:
            if getattr(cb, "ready", False) and hasattr(cb, "swapped"):
                return cb
        return None

    def configure_optimizers(self):
        opt, sched, recipe = optim.build(
            self.model, self.cfg.optim, self.plan.lr, self.total_steps(), self.cfg.trainer.precision
        )
        self.recipe = {
            **self.plan.as_dict(),
            **recipe,
            "precision": self.cfg.trainer.precision,
            "strategy": self.cfg.trainer.strategy,
            # parameter tensors that do not train (optim.freeze, a probe's backbone)
            "frozen": sum(1 for p in self.model.parameters() if not p.requires_grad),
            "ema_decay": self.cfg.ema.decay if self.cfg.ema.enabled else None,
        }
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ):
        """Clip the global grad norm at ``optim.grad_clip``. Done here because Lightning's AMP
        plugin refuses to clip for fused optimizers even under bf16, where nothing is scaled."""
        clip = self.cfg.optim.grad_clip
        if not clip:
            return
        if self.cfg.trainer.strategy == "fsdp":  # sharded grads: the FSDP wrapper knows the norm
            self.trainer.model.clip_grad_norm_(clip)
        else:  # grads are already all-reduced (DDP) and unscaled (bf16 has no scaler)
            torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.grad is not None], clip
            )

    def total_steps(self) -> int:
        if self.cfg.trainer.max_steps > 0:
            return self.cfg.trainer.max_steps
        return int(self.trainer.estimated_stepping_batches)

    # -- data -----------------------------------------------------------------------------
    def dataset(self, split: str):
        """The task's dataset of ``split`` (None when absent), built once per run: the loader,
        the best-checkpoint check and the data line (unipred.train.run_report) share it."""
        cache = self.__dict__.setdefault("_datasets", {})
        if split not in cache:
            cache[split] = self.task.build_dataset(split)
        return cache[split]

    def _loader(self, split: str):
        ds = self.dataset(split)
        if ds is None:
            return None
        plan = self.plan
        world = self.trainer.world_size if self._trainer else 1
        rank = self.trainer.global_rank if self._trainer else 0
        return build_loader(
            ds,
            plan.per_device_batch,
            world,
            rank,
            plan.accumulate_grad_batches,
            self.cfg.seed,
            split == "train",
            self.cfg.data.num_workers,
            self.task.collate_fn(split),
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self):
        loader = self._loader("train")
        if loader is None:
            raise ValueError(f"task {self.cfg.task!r} returned no training dataset: is data.root "
                             "set? (data.val_root is only validated on)")  # fmt: skip
        # Lightning builds the loader early (to count steps) and then skips its own restore of
        # the loader state, so the position saved in the checkpoint is applied here
        state = getattr(self, "_loader_state", None)
        if state and hasattr(loader, "load_state_dict"):
            loader.load_state_dict(state[0])
        return loader

    def val_dataloader(self):
        return self._loader("val") or []

    # -- checkpoints ----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint):
        checkpoint["unipred_config"] = to_dict(self.cfg)
        checkpoint["recipe"] = dict(self.recipe)
        checkpoint["rng"] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            checkpoint["rng"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint):
        fit_state = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
        self._loader_state = fit_state.get("combined_loader")
        rng = checkpoint.get("rng")
        if rng and self.trainer.world_size == 1:  # per-rank states are not stored
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])


def _data_policy(cfg) -> None:
    """Folder scans follow symlinks out of the data folder only when the config asks."""
    from unipred.data.scan import set_follow_symlinks

    set_follow_symlinks(bool(getattr(cfg.data, "follow_symlinks", False)))


def _map_tensors(batch, fn):
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_map_tensors(b, fn) for b in batch)
    if isinstance(batch, dict):
        return {k: _map_tensors(v, fn) for k, v in batch.items()}
    return batch


def run_dir(cfg) -> Path:
    return Path(cfg.run_dir)


def _retunes_threads(t) -> bool:
    """Whether a run re-checks its CPU threads while training: automatic threads on one CPU
    process (CPU DDP ranks would read each other as other jobs, so they keep the start choice)."""
    on_cpu = t.accelerator == "cpu" or (t.accelerator == "auto" and not torch.cuda.is_available())
    return (
        on_cpu and t.threads == 0 and t.threads_check_s > 0 and t.devices <= 1 and t.num_nodes == 1
    )


def _compile(setting, model, device_type: str, steps, training=True, precision=None) -> None:
    """trainer.compile: decide (unipred.train.compiling), say it in one line, compile."""
    from unipred.train import compiling

    mode, why = compiling.choose(setting, device_type, model, steps, training, precision)
    print(f"[unipred] {compiling.describe(mode, why, model)}", flush=True)
    compiling.apply(model, mode)


def _threads(cfg, training: bool = False) -> bool:
    """Apply the machine fit and the start thread choice, print it; True when a training run
    should also re-check the threads as it goes (``ThreadRetune``)."""
    from unipred.train.machine import apply_to_run

    apply_to_run(cfg)  # a recipe for 8 GPUs on this machine: before anything is built
    t = cfg.trainer
    retune = training and _retunes_threads(t) and not user_fixed_threads()
    line = threads_for_run(t.threads, t.accelerator, t.devices if t.devices > 0 else 1)
    if line is None and retune:  # chosen earlier in this process: still say what runs now
        line = f"{torch.get_num_threads()} torch thread(s)"
    if line:
        if retune:
            line += f"; re-checked every {t.threads_check_s:g} s of training"
        print(f"[unipred] {line}", flush=True)
    return retune


def _append_resume_record(out: Path, ckpt, changes: list[str], cfg) -> None:
    import json
    import time

    from unipred.train.config import to_yaml

    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "resumed_from": str(ckpt),
              "recipe_changes": changes, "config": to_yaml(cfg)}  # fmt: skip
    with open(out / "resumes.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def world_size_line(saved_recipe: dict, plan: BatchPlan) -> str:
    """One line when a run resumes on another number of devices with the same global batch:
    the recipe is a function of the global batch (lr, schedule, data order), so it stands."""
    before = saved_recipe.get("world_size")
    if before is None or before == plan.world_size:
        return ""
    return (f"resuming on {plan.world_size} devices (saved on {before}) with the same global "
            f"batch {plan.global_batch} ({plan.per_device_batch} per device x "
            f"{plan.accumulate_grad_batches} accumulation): the recipe is unchanged")  # fmt: skip


def fit(cfg, callbacks=(), task=None, show_recipe: bool = True) -> L.Trainer:
    """Train ``cfg`` (a validated RunConfig); resumes per ``cfg.resume``. ``task`` may be a
    ready Task instance (benchmarks, notebooks); by default ``cfg.task`` is built. The
    effective recipe is printed unless ``show_recipe`` is False (a demo's later stages) and
    always saved to ``run_dir/recipe.json``. The run folder is locked while the run trains
    (unipred.train.run_lock): a second process on it is refused."""
    from unipred.train.run_lock import RunLock

    if cfg.trainer.fast_dev_run:  # writes nothing into the run folder
        return _fit(cfg, callbacks, task, show_recipe)
    from unipred.train.rundir import check_run_dir

    check_run_dir(cfg.run_dir)  # a bad run_dir: one line now, not after the model
    with RunLock(cfg.run_dir):
        return _fit(cfg, callbacks, task, show_recipe)


def _fit(cfg, callbacks, task, show_recipe: bool) -> L.Trainer:
    from unipred.train.callbacks import format_recipe, save_recipe
    from unipred.train.checkpoint import find_resume_checkpoint, validate_resume
    from unipred.train.config import to_yaml
    from unipred.train.run_report import DataLine, RunSummary

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if _threads(cfg, training=True):
        from unipred.train.retune import ThreadRetune

        callbacks = [*callbacks, ThreadRetune(cfg.trainer.threads_check_s)]
    lit = LitTask(cfg, task)
    ckpt = None
    if cfg.resume == "auto":
        ckpt = find_resume_checkpoint(cfg.run_dir, lit.state_dict())  # loads and matches
    elif cfg.resume:
        ckpt = Path(cfg.resume)
    changes = []
    if ckpt is not None:
        saved_ckpt = validate_resume(ckpt, lit)
        saved = saved_ckpt.get("unipred_config")
        changes = recipe_changes(saved, cfg) if saved else []
        line = world_size_line(saved_ckpt.get("recipe") or {}, lit.plan)
        if line and not changes:
            print(f"[unipred] {line}", flush=True)
        if changes and not cfg.resume_allow_changes:
            raise RecipeError(
                f"resuming {ckpt} would change the recipe: {'; '.join(changes)} "
                "(set resume_allow_changes=true to accept, or use a new run_dir)"
            )
    out = run_dir(cfg)

    class _Recipe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            if trainer.is_global_zero:
                r = {**pl_module.recipe, "resumed_from": str(ckpt) if ckpt else None}
                if show_recipe:
                    print(format_recipe(r), flush=True)
                if not cfg.trainer.fast_dev_run and not (ckpt and (out / "recipe.json").exists()):
                    save_recipe(r, out / "recipe.json")  # the original is never overwritten

    summary = RunSummary(out, write=not cfg.trainer.fast_dev_run)
    trainer = build_trainer(
        cfg.trainer, cfg.ema, out, lit, [*callbacks, _Recipe(), DataLine(), summary]
    )
    # model init is identical on every rank; the training randomness differs per rank
    L.seed_everything(cfg.seed + trainer.global_rank, workers=True, verbose=False)
    if trainer.is_global_zero and not cfg.trainer.fast_dev_run:
        out.mkdir(parents=True, exist_ok=True)
        if ckpt is None:  # a fresh run must not mix its checkpoints with an earlier run's
            from unipred.base.warn import warn
            from unipred.train.rundir import set_aside_earlier_run

            earlier = set_aside_earlier_run(out)
            if earlier is not None:
                warn(f"{out} held an earlier run's checkpoints; this run starts afresh "
                     f"(resume=auto continues a run) and they are kept in {earlier}")  # fmt: skip
        if ckpt is None or not (out / "config.yaml").exists():
            (out / "config.yaml").write_text(to_yaml(cfg))
        if ckpt is not None:  # a resumed run appends a record; the original files stay
            _append_resume_record(out, ckpt, changes, cfg)
    trainer.fit(lit, ckpt_path=str(ckpt) if ckpt else None)
    summary.finish(trainer, lit)  # the closing line and results.json
    return trainer


def evaluate(cfg, units: dict | None = None) -> dict:
    """Validate the weights of ``cfg.ckpt`` (raw and, when stored, EMA) on the val split.

    The metrics come back as logged (accuracies and IoUs as fractions); a ``units`` dict is
    filled with ``"%"`` for those, so a caller can show them as the run's ``result:`` line does."""
    from unipred.base.quiet import percent_metrics
    from unipred.train.checkpoint import load_weights

    _threads(cfg)
    lit = LitTask(cfg)
    if units is not None:
        units.update(dict.fromkeys(percent_metrics(lit), "%"))
    ema_sd = load_weights(lit.model, cfg.ckpt) if cfg.ckpt else None
    trainer = build_trainer(cfg.trainer, cfg.ema, run_dir(cfg), lit)
    _compile(cfg.trainer.compile, lit.model, cfg.trainer.accelerator, None, training=False)
    results = trainer.validate(lit, verbose=False)[0]
    if ema_sd is not None:
        lit.model.load_state_dict(ema_sd)
        ema = trainer.validate(lit, verbose=False)[0]
        results.update({k.replace("val/", "val_ema/", 1): v for k, v in ema.items()})
    return {k: float(v) for k, v in results.items()}
