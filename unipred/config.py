"""Typed run configuration: dataclass schemas, YAML files and ``key=value`` overrides.

A run config is one ``RunConfig`` whose ``data`` section is the task's own ``data_config``
dataclass. ``load_config(path, overrides)`` reads the YAML (following ``_base_`` includes),
looks the task up in ``TASKS``, builds the typed schema for that task and merges everything
strictly with OmegaConf. Unknown keys and wrong types raise ``ConfigError`` naming the key and
the closest valid key; data paths that do not exist fail here, before any model is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from unipred.objectives import ObjectiveConfig
from unipred.predictor import PredictorConfig
from unipred.registry import TASKS


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


class RecipeError(ConfigError):
    """The batch / device combination does not realise the configured global batch."""


def _overrides_of(cls: type) -> type:
    """A dataclass with every field of ``cls`` made optional (None = keep the size's value)."""
    hints = typing.get_type_hints(cls)
    fields = [(f.name, hints[f.name] | None, field(default=None)) for f in dataclasses.fields(cls)]
    return dataclasses.make_dataclass(f"{cls.__name__}Overrides", fields)


PredictorOverrides = _overrides_of(PredictorConfig)
ObjectiveOverrides = _overrides_of(ObjectiveConfig)


@dataclass
class ModelSection:
    """Which model: a registered size plus typed overrides of its predictor and head."""

    name: str = "nepa_debug"  # a size registered in MODELS (unipred list)
    tokenizer: str | None = None  # None = the size's tokenizer
    tokenizer_args: dict[str, Any] = field(default_factory=dict)  # merged over the size's
    predictor: PredictorOverrides = field(default_factory=PredictorOverrides)
    head: str | None = None  # None = the task's/size's default; "none" forces no head
    num_classes: int | None = None
    init_std: float | None = None
    registers: int | None = None  # register tokens after cls (never targets, never pooled)
    # variants of the pretraining objective (docs/objectives.md); unset = the release's
    objective: ObjectiveOverrides = field(default_factory=ObjectiveOverrides)
    # "" | "official:PATH" (released NEPA weights) | "ckpt:PATH" (our checkpoint, weights only)
    # | "pretrain:PATH[:ema][@SOURCE]" (pretraining ckpt -> classifier: backbone copied, classifier
    # zeroed; @SOURCE picks a joint checkpoint's source, docs/joint.md)
    init: str = ""


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


@dataclass
class TrainerConfig:
    """Hardware, precision, length and logging. The batch is the *global* batch."""

    global_batch: int = 256
    per_device_batch: int | None = None  # None = global_batch / (devices * nodes), no accumulation
    accelerator: str = "auto"  # auto | cpu | gpu
    devices: int = 1  # per node; -1 = all visible GPUs
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | fsdp
    find_unused_parameters: bool = False  # DDP: only for models with parameters a step skips
    precision: str = "32-true"  # 32-true | bf16-mixed | 16-mixed
    max_epochs: int = 1
    max_steps: int = -1  # optimizer steps; when set, max_epochs is ignored; -1 = max_epochs
    limit_train_batches: float | None = None  # fraction (<=1.0) or number of batches (>1)
    limit_val_batches: float | None = None
    val_every_n_epochs: int = 1
    val_check_interval: float | None = None
    compile: bool = False  # torch.compile the model
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
    # fewer threads; why: unipred/threads.py); -1 = torch's default
    threads: int = 0


@dataclass
class EMAConfig:
    enabled: bool = True
    decay: float = 0.9999
    every_n_steps: int = 1
    monitor_ema: bool = True  # best checkpoint follows the EMA metric (the release does)


@dataclass
class RunConfig:
    task: str = "debug_image_pretrain"
    model: ModelSection = field(default_factory=ModelSection)
    data: Any = None  # replaced by the task's data_config in schema_for()
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    run_dir: str = ""  # "" = runs/<task>
    seed: int = 1337
    resume: str = ""  # "" | "auto" (newest valid ckpt in run_dir) | a checkpoint path
    # a resume that changes the recipe (length, batch, lr, schedule, model, ...) is refused
    # with the differences listed, unless this is true
    resume_allow_changes: bool = False
    ckpt: str = ""  # weights for `unipred eval`


def schema_for(task: str) -> type:
    """The RunConfig dataclass whose ``data`` field is the task's data config."""
    try:
        task_cls = TASKS.get(task)
    except KeyError as e:
        raise ConfigError(f"task: {e.args[0]}") from None
    data_cls = task_cls.data_config
    return dataclasses.make_dataclass(
        f"RunConfig[{task}]",
        [("data", data_cls, field(default_factory=data_cls))],
        bases=(RunConfig,),
    )


def read_yaml(path: str | os.PathLike) -> DictConfig:
    """Read a YAML file, merging ``_base_`` (a path or list of paths, relative to the file)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # YAML syntax, bad characters, undecodable bytes, duplicate keys
        raise ConfigError(f"{path}: not a valid YAML config ({_one_line(e)})") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: a config file must map keys to values, not a list")
    try:
        bases = cfg.pop("_base_", None)
    except Exception as e:
        raise ConfigError(f"{path}: _base_: {_one_line(e)}") from None
    if bases is None:
        return cfg
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, (list, ListConfig)) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: _base_ must be a path or a list of paths, got {bases!r}")
    merged = OmegaConf.create()
    for b in bases:
        merged = OmegaConf.merge(merged, read_yaml(path.parent / b))
    return OmegaConf.merge(merged, cfg)


def packaged_configs() -> Path:
    """The folder of recipes shipped inside the package (``configs/`` of a source checkout)."""
    from importlib.resources import files

    return Path(str(files("unipred.configs")))


def find_config(name: str | os.PathLike) -> Path:
    """A config path, or the name of a packaged recipe (``demo/fmnist_pretrain``, with or
    without ``.yaml``, or ``configs/demo/fmnist_pretrain.yaml`` from any folder)."""
    path = Path(name)
    if path.is_file():
        return path
    rel = Path(*path.parts[1:]) if path.parts and path.parts[0] == "configs" else path
    root = packaged_configs()
    for cand in (root / rel, root / rel.with_suffix(".yaml")):
        if cand.is_file():
            return cand
    known = sorted(str(p.relative_to(root).with_suffix("")) for p in root.glob("*/*.yaml"))
    close = difflib.get_close_matches(str(rel.with_suffix("")), known, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"config file not found: {name}{hint}; packaged recipes: `unipred list`")


def load_config(path: str | os.PathLike | None, overrides: list[str] = (), check_paths=True):
    """YAML + ``key=value`` overrides -> validated RunConfig (a dataclass instance).

    ``path`` is a file or the name of a packaged recipe (see :func:`find_config`)."""
    path = find_config(path) if path else None
    raw = read_yaml(path) if path else OmegaConf.create()
    for item in overrides:
        key, eq, value = str(item).partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"override {_short(item)}: expected key=value")
        try:
            cli = OmegaConf.from_dotlist([str(item)])
            raw = OmegaConf.merge(raw, cli)
        except Exception as e:  # OmegaConf or YAML errors: the value cannot be read or merged
            raise ConfigError(f"{key}: cannot use the override value {_short(value)} "
                              f"({_one_line(e)})") from None  # fmt: skip
    try:
        task = raw.get("task", RunConfig.task)
    except Exception as e:  # e.g. an interpolation that does not resolve
        raise ConfigError(f"task: {_one_line(e)}") from None
    if not isinstance(task, str) or not task:
        raise ConfigError(f"task: expected the name of a task, got {_short(task)}")
    schema = OmegaConf.structured(schema_for(task))
    try:
        merged = OmegaConf.merge(schema, raw)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(_explain(e, schema, path)) from None
    except (TypeError, ValueError) as e:  # a value OmegaConf accepted but a field refuses
        where = f" in {path}" if path else ""
        key = _culprit(schema, raw) or "?"
        raise ConfigError(f"invalid value for config key '{key}'{where}: {_one_line(e)}") from None
    if not cfg.run_dir:
        cfg.run_dir = str(Path("runs") / cfg.task)
    _check_choices(cfg)
    if check_paths:
        check_data_paths(cfg)
    check_task(cfg)
    return cfg


def _leaves(node, prefix=""):
    if isinstance(node, dict) and node:
        for k, v in node.items():
            yield from _leaves(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], node


def _culprit(schema, raw) -> str | None:
    """The first key of ``raw`` that the schema refuses on its own (for error messages)."""
    try:
        plain = OmegaConf.to_container(raw, resolve=False)
    except Exception:
        return None
    for key, value in _leaves(plain):
        one = OmegaConf.create()
        try:
            OmegaConf.update(one, key, value, force_add=True)
            OmegaConf.to_object(OmegaConf.merge(schema, one))
        except Exception:
            return key
    return None


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def _clip(path: str, limit: int = 300) -> str:
    """A path as written (repr only when it holds control characters), clipped when absurd."""
    text = repr(path) if any(ord(ch) < 32 for ch in path) else path
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _exists(p: str) -> bool:
    try:
        return Path(p).exists()
    except (OSError, ValueError):  # a name too long, a NUL byte: no such file either way
        return False


def check_task(cfg) -> None:
    """The task's own config checks (``Task.check_config``: patch vs input size, channels,
    tokenizer, classes vs the data), as one-line ``ConfigError``s before anything is built."""
    try:
        TASKS.get(cfg.task).check_config(cfg)
    except ConfigError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        msg = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
        raise ConfigError(msg.splitlines()[0] if msg else type(e).__name__) from None


def _check_choices(cfg) -> None:
    """String options with a fixed set of values fail at load time, naming key and choices."""
    from unipred import optim

    choices = {"optim.name": optim.OPTIMIZERS, "optim.schedule": tuple(optim.SCHEDULES)}
    for key, allowed in choices.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")
    try:
        ObjectiveConfig(**_set_fields(cfg.model.objective))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.model.registers is not None and cfg.model.registers < 0:
        raise ConfigError(f"model.registers must be >= 0, got {cfg.model.registers}")


def _set_fields(section) -> dict:
    """The fields of an overrides dataclass that a config sets (not None)."""
    out = {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}
    return {k: v for k, v in out.items() if v is not None}


def _explain(e: OmegaConfBaseException, schema: DictConfig, path) -> str:
    """Turn an OmegaConf error into one line naming the key and the closest valid key."""
    key = getattr(e, "full_key", None) or getattr(e, "key", None) or "?"
    where = f" in {path}" if path else ""
    parent = ".".join(str(key).split(".")[:-1])
    node = OmegaConf.select(schema, parent) if parent else schema
    valid = list(node.keys()) if isinstance(node, DictConfig) else []
    leaf = str(key).split(".")[-1]
    if valid and leaf not in valid:
        close = difflib.get_close_matches(leaf, valid, n=1, cutoff=0.5)
        hint = f"; did you mean '{parent + '.' if parent else ''}{close[0]}'?" if close else ""
        return f"unknown config key '{key}'{where}{hint} (valid: {', '.join(valid)})"
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return f"invalid value for config key '{key}'{where}: {_one_line(msg)}"


def _is_remote(p: str) -> bool:
    return p.startswith(("pipe:", "http://", "https://", "s3://", "gs://")) or "{" in p


# data fields whose names end like this are inputs that must exist; caches and outputs are
# named otherwise (e.g. ``cache_dir``, ``digits_dir``) and are not checked
INPUT_SUFFIXES = ("root", "path", "file", "manifest", "csv")


def check_data_paths(cfg) -> None:
    """Fail early, naming the key and path, when a local data path does not exist."""
    data = cfg.data
    for f in dataclasses.fields(data):
        v = getattr(data, f.name)
        if not isinstance(v, str) or not v or _is_remote(v):
            continue
        if f.name.endswith(INPUT_SUFFIXES) and not _exists(v):
            raise ConfigError(f"data.{f.name}: path does not exist: {_clip(v)}")
    for key, spec in (("model.init", cfg.model.init), ("ckpt", cfg.ckpt)):
        p = spec.split(":", 1)[1] if ":" in spec and key == "model.init" else spec
        if key == "model.init" and spec.startswith("pretrain:"):
            from unipred.checkpoint import split_source

            p = split_source(p)[0]
            p = p[: -len(":ema")] if p.endswith(":ema") else p
        if p and not _exists(p):
            raise ConfigError(f"{key}: path does not exist: {_clip(p)}")
    if cfg.resume not in ("", "auto") and not _exists(cfg.resume):
        raise ConfigError(f"resume: checkpoint does not exist: {_clip(cfg.resume)}")


_ZERO_MEANS_OFF = ("layerscale", "rope_shift", "rope_jitter", "rope_rescale")


def build_model_config(section: ModelSection, **defaults):
    """ModelSection (+ task defaults for fields the config leaves None) -> core ModelConfig."""
    from unipred.model import model_config

    over: dict[str, Any] = {k: v for k, v in defaults.items() if v is not None}
    for k in ("head", "num_classes", "init_std", "tokenizer", "registers"):
        v = getattr(section, k)
        if v is not None:
            over[k] = v
    if over.get("head") == "none":
        over["head"] = None
    mc = model_config(section.name, **over)
    if section.tokenizer_args:
        mc.tokenizer_args = {**mc.tokenizer_args, **section.tokenizer_args}
    pover = {
        f.name: getattr(section.predictor, f.name) for f in dataclasses.fields(section.predictor)
    }
    pover = {k: v for k, v in pover.items() if v is not None}
    for k in _ZERO_MEANS_OFF:  # the core's None (= off) is written 0 in a config
        if pover.get(k) == 0:
            pover[k] = None
    mc.predictor = dataclasses.replace(mc.predictor, **pover)
    mc.objective = dataclasses.replace(mc.objective, **_set_fields(section.objective))
    return mc


def batch_plan(cfg) -> dict:
    """Global batch -> per-device batch and gradient accumulation; lr by the linear rule."""
    t = cfg.trainer
    devices = t.devices
    if devices < 1:  # -1 = every visible GPU, as Lightning reads it
        import torch

        devices = max(1, torch.cuda.device_count())
    world = devices * t.num_nodes
    per_dev = t.per_device_batch or t.global_batch // world
    if per_dev < 1 or t.global_batch % (per_dev * world):
        raise RecipeError(
            f"trainer.global_batch={t.global_batch} is not a multiple of per_device_batch "
            f"({per_dev}) x devices ({devices}) x num_nodes ({t.num_nodes}); change "
            f"trainer.per_device_batch or the device count"
        )
    lr = cfg.optim.lr if cfg.optim.lr is not None else cfg.optim.blr * t.global_batch / 256
    return {
        "global_batch": t.global_batch,
        "world_size": world,
        "per_device_batch": per_dev,
        "accumulate_grad_batches": t.global_batch // (per_dev * world),
        "lr": lr,
        "head_lr": cfg.optim.head_lr,
    }


def explain(cfg) -> str:
    """YAML comments with what the config resolves to: the model and the batch recipe."""
    mc = build_model_config(cfg.model)
    lines = [f"resolved model ({cfg.model.name} + overrides; the task may add its head):"]
    lines += OmegaConf.to_yaml(OmegaConf.structured(mc)).splitlines()
    try:
        plan = batch_plan(cfg)
        lines += ["batch recipe:"] + [f"  {k}: {v}" for k, v in plan.items()]
    except RecipeError as e:
        lines += [f"batch recipe: ERROR {e}"]
    return "".join(f"# {line}\n" for line in lines)


def to_yaml(cfg) -> str:
    """The effective config as YAML (for --print-config and the run dir)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


# what a resumed run may not change silently: everything that defines the recipe. Hardware,
# data locations, workers, logging and checkpoint cadence may change between restarts.
RECIPE_KEYS = ("task", "seed", "model", "optim", "ema.enabled", "ema.decay", "trainer.global_batch",
               "trainer.max_steps", "trainer.max_epochs", "trainer.limit_train_batches",
               "trainer.precision")  # fmt: skip


def _flat(d, prefix=""):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _flat(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], d


def recipe_changes(saved: dict, cfg) -> list[str]:
    """``["trainer.max_steps: 1500 -> 1000", ...]``: the recipe keys where ``cfg`` differs
    from the config a checkpoint was saved with."""
    now = dict(_flat(to_dict(cfg)))
    before = dict(_flat(saved))
    out = []
    for key in sorted(set(now) | set(before)):
        if not any(key == r or key.startswith(r + ".") for r in RECIPE_KEYS):
            continue
        a, b = before.get(key, "<absent>"), now.get(key, "<absent>")
        if a != b:
            out.append(f"{key}: {_short(a)} -> {_short(b)}")
    return out
