"""The ``unipred`` command.

    unipred fit CONFIG [key=value ...] [--print-config]
    unipred eval CONFIG ckpt=PATH [protocol=knn|linear|attentive|layers|finetune] [ema=both]
    unipred evaluate-suite CONFIG ckpt=PATH [protocols=knn,linear,...] [out=DIR]
    unipred export CKPT OUT [--ema] [--push REPO_ID] | --timm [--bidirectional]
    unipred list
    unipred data ... | demo NAME ... | visualize ... | convert ...

``data``, ``demo``, ``visualize``, ``convert`` and ``export`` are dispatched lazily: ``data`` to
``unipred.data.cli``, ``convert`` to ``unipred.weights.hub``, ``export`` to ``unipred.weights.pretrained``, and
``demo NAME`` / ``visualize`` to the module a modality registered for them (``COMMANDS`` in
``unipred.base.registry``; each a ``main(argv) -> int``), so a missing or broken one never affects
the others.
"""

from __future__ import annotations

import importlib
import os
import sys

USAGE = """usage: unipred COMMAND ...

commands:
  fit CONFIG [key=value ...] [--print-config]   train (resume=auto continues a run)
  eval CONFIG ckpt=PATH [key=value ...]         validate a checkpoint (raw and EMA weights);
        protocol=knn|linear|attentive|layers|finetune ema=true|false|both
                                                other protocols (docs/evaluation.md)
  evaluate-suite CONFIG ckpt=PATH [protocols=knn,linear,attentive,layers] [out=DIR]
                                                every protocol; results.md/.json in the run folder
  compare [key=value ...] [--labels 10,20 --seeds 0,1,2 --ckpt CKPT --out DIR]
                                                fine-tune vs scratch, frozen vs random init vs
                                                raw input, per label budget and seed
  export CKPT OUT [--ema] [--push REPO_ID]      checkpoint -> save_pretrained folder (docs/hub.md)
  export CKPT OUT --timm [--bidirectional]      checkpoint -> timm's local-dir folder
  list                                          registered tokenizers, tasks and model sizes
  data SUBCOMMAND ...                           data preparation (unipred data --help)
  demo NAME ...                                 runnable demos (unipred demo --help)
  visualize ...                                 attention / prediction maps
  convert SRC DST                               an official NEPA folder -> ours

`unipred COMMAND --help` describes one command; `python -m unipred ...` is the same program.
"""

# the usage of the commands this module runs itself; the others bring their own (argparse)
COMMAND_USAGE = {
    "fit": """usage: unipred fit CONFIG [key=value ...] [--print-config]
       unipred fit task=NAME [key=value ...] [--print-config]

Train a task. CONFIG is a YAML file or a packaged recipe (`unipred list` names them); without
one, task=NAME picks the task and every other key keeps its default.

options:
  --print-config  print the effective config, the resolved model and the batch recipe (total
                  optimizer steps included), then exit without training
  -h, --help      this text; after CONFIG or task=NAME: every key of that task, with its type,
                  default and the recipe's value

resume=auto continues the newest checkpoint of run_dir; RUN_DIR/results.json holds the final
metrics of a run.
""",
    "eval": """usage: unipred eval CONFIG ckpt=PATH [protocol=NAME] [ema=true|false|both] [key=value ...]

Evaluate a checkpoint: the task's own validation (raw and EMA weights), or one protocol on
frozen features: protocol=knn|linear|attentive|layers, or protocol=finetune. Each protocol
writes RUN_DIR/eval/<protocol>.json beside the checkpoint (docs/evaluation.md).

options:
  --print-config  print the effective config, then exit
  -h, --help      this text; after CONFIG: every key of that task
""",
    "evaluate-suite": """usage: unipred evaluate-suite CONFIG ckpt=PATH [protocols=knn,linear,...] [out=DIR] [key=value ...]

Run every frozen-feature protocol on a checkpoint (and its baselines); results.md and
results.json go to out (default: the checkpoint's run folder, eval/).

options:
  --print-config  print the effective config, then exit
  -h, --help      this text; after CONFIG: every key of that task
""",
    "list": """usage: unipred list

Every registered tokenizer, data source, task, segmentation decoder, model size and command,
and the packaged recipes.
""",
}

LAZY = {
    "data": "unipred.data.cli",
    "convert": "unipred.weights.hub",
    "export": "unipred.weights.pretrained",
}
LAZY["compare"] = (
    "unipred.protocols.compare"  # NEPA vs scratch / random init / raw input (issue #23)
)


def _split(argv: list[str]):
    flags = [a for a in argv if a.startswith("-") and "=" not in a]
    rest = [a for a in argv if a not in flags]
    config = rest[0] if rest and "=" not in rest[0] else None
    overrides = rest[1:] if config else rest
    return config, overrides, flags


class UsageError(Exception):
    """A command line that cannot be run as written: one line, exit 2."""


FLAGS = ("--print-config",)


def _load(argv: list[str], command: str = "fit"):
    from unipred.train.config import load_config

    config, overrides, flags = _split(argv)
    if "--help" in flags or "-h" in flags:
        if config or overrides:  # the keys of this task, with types, defaults, the recipe's values
            print(config_keys_help(config, overrides), end="")
        else:
            print(COMMAND_USAGE[command], end="")
        raise SystemExit(0)
    unknown = [f for f in flags if f not in FLAGS]
    if unknown:
        raise UsageError(
            f"unknown option {' '.join(unknown)}; `unipred {command}` accepts {', '.join(FLAGS)}"
            f" and --help"
        )
    printing = "--print-config" in flags
    cfg = load_config(config, overrides, check_paths=not printing)
    return cfg, printing


def _type_name(tp) -> str:
    name = getattr(tp, "__name__", None) if not getattr(tp, "__args__", None) else None
    return name or str(tp).replace("typing.", "")


def _field_comments(cls) -> dict[str, str]:
    """{field: its trailing ``# comment``} from the source of a config dataclass (and bases)."""
    import inspect
    import re

    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for m in re.finditer(r"^\s+(\w+): [^\n#]+#\s*(.+)$", src, re.M):
            out[m.group(1)] = m.group(2).strip()
    return out


def _walk_keys(cls, value, prefix: str):
    """(dotted key, type, default, value in the config, comment) for every leaf of a config
    dataclass."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    notes = _field_comments(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], prefix + f.name
        cur = getattr(value, f.name, None) if value is not None else None
        if dataclasses.is_dataclass(cur) and not isinstance(cur, type):
            yield from _walk_keys(type(cur), cur, key + ".")
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        yield key, _type_name(tp), default, cur, notes.get(f.name, "")


def config_keys_help(config: str | None, overrides: list[str] = ()) -> str:
    """Every key of CONFIG's task (or of ``task=NAME`` among the overrides): type, default, and
    this recipe's value where it differs."""
    from unipred.train.config import load_config, schema_for

    # no checks: the keys are listed even when task=NAME's default model (an image size) does
    # not fit that task; the run itself checks them
    cfg = load_config(config, list(overrides), check_paths=False, checks=False)
    what = f"{config} (task {cfg.task})" if config else f"task {cfg.task}"
    lines = [f"keys of {what}; set any with key=value:"]
    rows = list(_walk_keys(schema_for(cfg.task), cfg, ""))
    width = max(len(k) for k, *_ in rows)
    for key, tp, default, cur, comment in rows:
        note = f"   (this recipe: {cur!r})" if cur != default else ""
        lines.append(f"  {key:<{width}}  {tp} = {default!r}{note}")
        if comment:
            lines.append(f"  {'':<{width}}    # {comment}")
    return "\n".join(lines) + "\n"


def cmd_fit(argv: list[str]) -> int:
    from unipred.train.config import explain

    cfg, printing = _load(argv)
    if printing:
        from unipred.train.machine import apply_to_run
        from unipred.train.provenance import annotated_yaml

        apply_to_run(cfg)  # what a run on this machine would use, and the line saying so
        print(annotated_yaml(cfg) + explain(cfg), end="")
        return 0
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from unipred.train.callbacks import NonFiniteLossError
    from unipred.train.checkpoint import DiskFullError
    from unipred.train.engine import fit

    try:
        fit(cfg)
    except NonFiniteLossError as e:
        print(f"unipred fit: stopped: {e}", file=sys.stderr)
        return 1
    except DiskFullError as e:  # the write failed, the previous checkpoint did not
        print(f"unipred fit: stopped: {e}", file=sys.stderr)
        return 1
    except SIGTERMException:  # SIGTERM / SIGUSR1: checkpoint.Preemption wrote last.ckpt
        print(
            f"unipred fit: stopped by a signal; {cfg.run_dir}/checkpoints/last.ckpt holds the "
            "run: continue it with resume=auto",
            file=sys.stderr,
        )
        return 143  # 128 + SIGTERM: interrupted, resumable (0 means the run finished)
    return 0


def _eval_settings(argv: list[str]):
    from unipred.protocols import parse_eval_settings, split_eval_args

    config, overrides, flags = _split(argv)
    mine, rest = split_eval_args(overrides)
    settings = parse_eval_settings(mine)  # checked now; merged over the recipe's defaults later
    return mine, settings, [config, *rest, *flags] if config else [*rest, *flags], config


def _with_recipe_defaults(settings, cfg, argv_settings: list[str]):
    """The eval settings with the recipe's ``eval_defaults`` under the command line's."""
    if not cfg.eval_defaults:
        return settings
    from unipred.protocols import parse_eval_settings
    from unipred.protocols.settings import ProtocolError, recipe_eval_args

    try:
        defaults = recipe_eval_args(cfg.eval_defaults)
    except ProtocolError as e:
        raise UsageError(str(e)) from None
    return parse_eval_settings([*defaults, *argv_settings])


def cmd_eval(argv: list[str]) -> int:
    from unipred.train.config import to_yaml

    mine, settings, argv, _ = _eval_settings(argv)
    cfg, printing = _load(argv, "eval")
    settings = _with_recipe_defaults(settings, cfg, mine)
    if printing:
        print(to_yaml(cfg), end="")
        return 0
    if not cfg.ckpt and not cfg.model.init:
        raise UsageError("give ckpt=PATH (or model.init=...) to evaluate")
    if settings.protocol:  # the backbone's rows, then its baselines' (unipred.protocols.baselines)
        from unipred.protocols.baselines import run_with_baselines

        results = run_with_baselines(cfg, settings, [settings.protocol])
        _save_eval(results, cfg, settings, settings.protocol)
        return 0
    from unipred.protocols import suite_folder
    from unipred.train.engine import evaluate

    # logs go beside the checkpoint (its run folder's eval/), never into the run_dir of the
    # YAML, which is usually someone's training run
    cfg.run_dir = str(suite_folder(cfg.ckpt or cfg.model.init.split(":", 1)[-1], settings.out))
    print(f"unipred eval: logs in {cfg.run_dir}", flush=True)
    units: dict = {}
    metrics = evaluate(cfg, units)
    for k, v in sorted(metrics.items()):  # in percent where the progress lines show percent
        print(f"{k}: {100 * v:.2f} %" if units.get(k) == "%" else f"{k}: {v:.6g}")
    _save_eval({"metrics": metrics, "units": "as logged: accuracies and IoUs as fractions (0-1)"},
               cfg, settings, "validate")  # fmt: skip
    return 0


def _save_eval(results: dict, cfg, settings, protocol: str) -> None:
    """``<run folder of the checkpoint>/eval/<protocol>.json`` (or ``out=DIR``)."""
    import dataclasses

    from unipred.protocols import suite_folder
    from unipred.protocols.report import write_protocol_result

    ckpt = cfg.ckpt or cfg.model.init.split(":", 1)[-1]
    results.setdefault("meta", {}).update(
        checkpoint=str(ckpt), task=cfg.task, protocol=protocol,
        settings=dataclasses.asdict(settings),
    )  # fmt: skip
    try:
        folder = suite_folder(ckpt, settings.out)
    except ValueError as e:  # ckpt=random: no run folder
        print(f"unipred eval: results not saved: {e}", flush=True)
        return
    print(f"unipred eval: wrote {write_protocol_result(results, folder, protocol)}", flush=True)


def cmd_suite(argv: list[str]) -> int:
    from unipred.protocols import evaluate_suite

    mine, settings, argv, config = _eval_settings(argv)
    cfg, printing = _load(argv, "evaluate-suite")
    settings = _with_recipe_defaults(settings, cfg, mine)
    if printing:
        from unipred.train.config import to_yaml

        print(to_yaml(cfg), end="")
        return 0
    evaluate_suite(cfg, settings, config_name=str(config or ""))
    return 0


def _packaged_configs():
    """The packaged recipes' folder, found without importing unipred.config (and Lightning)."""
    from importlib.resources import files
    from pathlib import Path

    return Path(str(files("unipred.configs")))


def cmd_list(argv: list[str]) -> int:
    from unipred.listing import listing

    if argv:
        raise UsageError(f"`unipred list` takes no arguments, got {' '.join(argv)}")
    data = listing()
    for title, rows in data["sections"]:
        print(f"{title}:")
        for name, doc in rows:
            print(f"  {name:<28} {doc}")
    print("commands (unipred demo NAME, unipred data NAME, ...):")
    for name, module in data["commands"]:
        print(f"  {name:<28} {module}")
    root = _packaged_configs()
    print(f"recipes (unipred fit NAME; files in {root}):")
    for path in sorted(root.glob("*/*.yaml")):
        print(f"  {path.relative_to(root).with_suffix('')}")
    if data["errors"]:  # what they registered is missing above; using it names the error
        print("plugins that failed to load:")
        for module, err in sorted(data["errors"].items()):
            print(f"  {module:<28} {err}")
    return 0


def demo_usage() -> str:
    """``unipred demo`` usage with the demos the installed modalities registered."""
    from unipred.listing import listing

    names = [n.split(" ", 1)[1] for n, _ in listing()["commands"] if n.startswith("demo ")]
    lines = ["usage: unipred demo NAME [options]", "", "demos:"]
    lines += [f"  {n}" for n in names] or ["  (none registered)"]
    lines.append("\n`unipred demo NAME --help` describes one.")
    return "\n".join(lines) + "\n"


def _lazy(module: str, argv: list[str]) -> int:
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            print(
                f"unipred: this command needs {module}, which is not installed in this version",
                file=sys.stderr,
            )
            return 2
        raise
    return int(mod.main(argv) or 0)


def _registered(command: str, argv: list[str]) -> int:
    from unipred.base.registry import COMMANDS

    try:
        module = COMMANDS.get(command)
    except KeyError as e:
        print(f"unipred: {e.args[0]}", file=sys.stderr)
        return 2
    return _lazy(module, argv)


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "this input is wrong" (one line, exit 2), imported only when
    one was raised: ``unipred --help`` and ``unipred list`` never load torch for them."""
    from unipred.base.extras import MissingExtra
    from unipred.protocols import ProtocolError
    from unipred.train.checkpoint import CheckpointError
    from unipred.train.config import ConfigError, RecipeError

    return ConfigError, CheckpointError, RecipeError, MissingExtra, ProtocolError


def _dispatch(cmd: str, rest: list[str]) -> int | None:
    if cmd == "fit":
        return cmd_fit(rest)
    if cmd == "eval":
        return cmd_eval(rest)
    if cmd == "evaluate-suite":
        return cmd_suite(rest)
    if cmd == "list":
        return cmd_list(rest)
    if cmd in LAZY:
        return _lazy(LAZY[cmd], rest)
    if cmd == "demo":
        return _registered(f"demo {rest[0]}", rest[1:])
    if cmd == "visualize":
        return _registered("visualize", rest)
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``unipred`` console script (and of ``python -m unipred``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd in COMMAND_USAGE and (rest in (["-h"], ["--help"]) or (not rest and cmd != "list")):
        # bare `unipred fit` is a question, not a request to train a default task
        print(COMMAND_USAGE[cmd], end="", file=sys.stdout if rest else sys.stderr)
        return 0 if rest else 2
    if cmd == "demo" and (not rest or rest[0] in ("-h", "--help")):
        print(demo_usage(), end="", file=sys.stdout if rest else sys.stderr)
        return 0 if rest else 2
    if cmd != "list":  # `list` reads its cache; every other command needs the whole package
        import unipred

        unipred.load_all()
    try:
        code = _dispatch(cmd, rest)
        sys.stdout.flush()  # a reader gone early (`unipred list | head`) shows up here
    except BrokenPipeError:
        # the reader has what it wanted: no traceback, and no second error when Python
        # flushes stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except UsageError as e:
        print(f"unipred {cmd}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if isinstance(e, _user_errors()):
            print(f"unipred {cmd}: error: {e}", file=sys.stderr)
            return 2
        # what the data or the model refused while a run was being built or fed (a class
        # count below the labels, a label budget above a class, a decoder that does not fit
        # the backbone, a data set whose files or system packages are not there): the message
        # names it; the traceback only on request
        if (
            not isinstance(e, (ValueError, FileNotFoundError))
            or cmd not in ("fit", "eval", "evaluate-suite")
            or os.environ.get("UNIPRED_DEBUG")
        ):
            raise
        from unipred.data.book import error_line

        msg = error_line(e)  # (a DataLoader worker's error: its own message)
        print(f"unipred {cmd}: error: {msg} (UNIPRED_DEBUG=1 shows the traceback)",
              file=sys.stderr)  # fmt: skip
        return 2
    if code is None:
        print(f"unipred: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr, end="")
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
