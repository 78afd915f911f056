"""Typed run configuration: loading YAML files and ``key=value`` overrides, merging and
validating them.

A run config is one ``RunConfig`` made of the sections' dataclasses, each living next to the
code that takes it: ``ModelSection`` (unipred/nn/model.py), ``OptimConfig`` (unipred/train/optim.py),
``TrainerConfig`` and the batch plan (unipred/train/trainer.py), ``EMAConfig`` (unipred/train/callbacks.py)
and the task's own ``data_config`` (its data source, unipred/task/). ``load_config(path, overrides)`` reads the YAML (following ``_base_`` includes),
looks the task up in ``TASKS``, builds the typed schema for that task and merges everything
strictly with OmegaConf. Unknown keys and wrong types raise ``ConfigError`` naming the key and
the closest valid key; data paths that do not exist fail here, before any model is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from unipred.base.registry import TASKS
from unipred.nn.model import ModelSection, _set_fields, build_model_config  # noqa: F401
from unipred.nn.objectives import ObjectiveConfig
from unipred.train.callbacks import EMAConfig
from unipred.train.choices import choice_problem, device_problem, registered_problem
from unipred.train.optim import OptimConfig
from unipred.train.trainer import BatchPlan, TrainerConfig, batch_plan  # noqa: F401


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


class RecipeError(ConfigError):
    """The batch / device combination does not realise the configured global batch."""


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
    ckpt: str = ""  # weights for `unipred eval` ("random": the config's model at its init)
    # defaults of `unipred eval` / `evaluate-suite` settings for this recipe (e.g. the frozen
    # protocols' read-out, {features: {pool: grid, grid: 3}}); the command line overrides them
    eval_defaults: dict = field(default_factory=dict)


def schema_for(task: str) -> type:
    """The RunConfig dataclass whose ``data`` field is the task's data config."""
    problem = registered_problem("task", task, TASKS)
    if problem:
        raise ConfigError(problem)
    task_cls = TASKS.get(task)
    data_cls = task_cls.data_config
    return dataclasses.make_dataclass(
        f"RunConfig[{task}]",
        [("data", data_cls, field(default_factory=data_cls))],
        bases=(RunConfig,),
    )


def read_yaml(path: str | os.PathLike) -> DictConfig:
    """Read a YAML file, merging ``_base_`` (a path or list of paths, relative to the file, or
    the name of a packaged recipe: ``_base_: small/pretrain``)."""
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
        base = path.parent / b
        if not base.is_file():  # not a file beside this one: a packaged recipe's name?
            base = _packaged_recipe(b)
            if base is None:
                raise ConfigError(
                    f"{path}: _base_: {b}: no file {path.parent / b} and no packaged recipe "
                    f"of that name (`unipred list` names them)"
                )
        merged = OmegaConf.merge(merged, read_yaml(base))
    return OmegaConf.merge(merged, cfg)


def _packaged_recipe(name: str | os.PathLike) -> Path | None:
    """The packaged recipe ``name`` names (``small/pretrain``, with or without ``.yaml``, or
    ``configs/small/pretrain.yaml``), or None."""
    path = Path(name)
    rel = Path(*path.parts[1:]) if path.parts and path.parts[0] == "configs" else path
    root = packaged_configs()
    for cand in (root / rel, root / rel.with_suffix(".yaml")):
        if cand.is_file():
            return cand
    return None


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
    found = _packaged_recipe(path)
    if found is not None:
        return found
    rel = Path(*path.parts[1:]) if path.parts and path.parts[0] == "configs" else path
    root = packaged_configs()
    known = sorted(str(p.relative_to(root).with_suffix("")) for p in root.glob("*/*.yaml"))
    close = difflib.get_close_matches(str(rel.with_suffix("")), known, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"config file not found: {name}{hint}; packaged recipes: `unipred list`")


def load_config(
    path: str | os.PathLike | None, overrides: list[str] = (), check_paths=True, checks=True
):
    """YAML + ``key=value`` overrides -> validated RunConfig (a dataclass instance).

    ``path`` is a file or the name of a packaged recipe (see :func:`find_config`).
    ``checks=False`` keeps the parsing and typing but skips the checks of the names and of the
    task (``--help`` lists the keys of ``task=NAME`` even when its default model does not fit it)."""
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
    if not isinstance(task, str):
        raise ConfigError(f"task: expected the name of a task, got {_short(task)}")
    schema = OmegaConf.structured(schema_for(task))
    try:
        merged = OmegaConf.merge(schema, raw)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(_explain(e, schema, _where(e, path, overrides))) from None
    except (TypeError, ValueError) as e:  # a value OmegaConf accepted but a field refuses
        key = _culprit(schema, raw) or "?"
        where = _where(key, path, overrides)
        where = f" {where}" if where else ""
        raise ConfigError(f"invalid value for config key '{key}'{where}: {_one_line(e)}") from None
    from unipred.train.provenance import record

    record(cfg, path, overrides)  # where each value came from (--print-config)
    if not cfg.run_dir:
        cfg.run_dir = str(Path("runs") / cfg.task)
    if not checks:
        return cfg
    _check_choices(cfg)
    if check_paths:
        problem = device_problem(cfg)
        if problem:
            raise ConfigError(problem)
        check_data_paths(cfg)
    check_task(cfg, run=check_paths)
    return cfg


def _where(key_or_error, path, overrides) -> str:
    """ " on the command line" when the key came from an override, else " in FILE" (or "")."""
    key = key_or_error
    if isinstance(key_or_error, BaseException):
        key = getattr(key_or_error, "full_key", None) or getattr(key_or_error, "key", None)
    key = str(key or "")
    given = {str(o).partition("=")[0].strip() for o in overrides}
    if key and any(key == g or key.startswith(g + ".") or g.startswith(key + ".") for g in given):
        return "on the command line"
    return f"in {path}" if path else ""


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


def check_task(cfg, run: bool = False) -> None:
    """The task's own config checks (``Task.check_config``: patch vs input size, channels,
    tokenizer, classes vs the data; with ``run``, also ``Task.check_run``: what only a run
    needs), as one-line ``ConfigError``s before anything is built."""
    try:
        TASKS.get(cfg.task).check_config(cfg)
        if run:
            TASKS.get(cfg.task).check_run(cfg)
    except ConfigError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        msg = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
        raise ConfigError(msg.splitlines()[0] if msg else type(e).__name__) from None


def _check_choices(cfg) -> None:
    """String options with a fixed set of values fail at load time, naming key and choices."""
    try:
        cfg.optim.check()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        ObjectiveConfig(**_set_fields(cfg.model.objective))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.model.registers is not None and cfg.model.registers < 0:
        raise ConfigError(f"model.registers must be >= 0, got {cfg.model.registers}")
    frac = getattr(cfg.data, "max_bad_fraction", 0.0)
    if not 0 <= frac <= 1:
        raise ConfigError(f"data.max_bad_fraction must be in [0, 1] (1 = never stop), got {frac}")
    problem = choice_problem(cfg)
    if problem:
        raise ConfigError(problem)


# keys that moved: old dotted key -> (new key, why); a config with the old key is told where
MOVED_KEYS = {
    "data.head.num_classes": ("data.num_classes", "segmentation is one objective for every tokenizer"),
    "data.head.ignore_index": ("data.ignore_index", "segmentation is one objective for every tokenizer"),
}  # fmt: skip


def _explain(e: OmegaConfBaseException, schema: DictConfig, where: str) -> str:
    """Turn an OmegaConf error into one line naming the key and the closest valid key;
    ``where`` is " in FILE", " on the command line" or ""."""
    key = getattr(e, "full_key", None) or getattr(e, "key", None) or "?"
    where = f" {where}" if where else ""
    if str(key) in MOVED_KEYS:
        new, why = MOVED_KEYS[str(key)]
        return f"config key '{key}'{where} is now '{new}' ({why}); rename it"
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
            from unipred.train.checkpoint import split_source

            p = split_source(p)[0]
            p = p[: -len(":ema")] if p.endswith(":ema") else p
        if key == "ckpt" and p == "random":  # the protocols' random-init baseline
            continue
        if p and not _exists(p):
            raise ConfigError(f"{key}: path does not exist: {_clip(p)}")
    if cfg.resume not in ("", "auto") and not _exists(cfg.resume):
        raise ConfigError(f"resume: checkpoint does not exist: {_clip(cfg.resume)}")


def explain(cfg) -> str:
    """YAML comments with what the config resolves to: the model and the batch recipe."""
    mc = build_model_config(cfg.model)
    lines = [f"resolved model ({cfg.model.name} + overrides; the task may add its head):"]
    lines += OmegaConf.to_yaml(OmegaConf.structured(mc)).splitlines()
    try:
        plan = BatchPlan.of(cfg.trainer, cfg.optim)
        lines += ["batch recipe:"] + [f"  {k}: {v}" for k, v in plan.as_dict().items()]
        from unipred.train.run_report import planned_steps

        steps, how = planned_steps(cfg)
        lines.append(f"  total_steps: {steps if steps is not None else '?'}  ({how})")
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
