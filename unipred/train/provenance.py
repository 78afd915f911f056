"""Where each value of a run config came from: a default, a recipe file, one of its
``_base_`` files, the command line, the data, or this machine.

``load_config`` records the sources on the config it returns (``sources(cfg)``: dotted key ->
a short text); checks that fill a value in from the data or the machine add theirs with
``set_source``. ``annotated_yaml`` is what ``unipred fit CONFIG --print-config`` prints: the
effective config with each key's source as a trailing comment.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

ATTR = "_unipred_sources"  # the attribute of a RunConfig instance holding its sources


def _leaves(node, prefix: str = ""):
    if isinstance(node, dict) and node:
        for k, v in node.items():
            yield from _leaves(v, f"{prefix}{k}.")
    elif prefix:
        yield prefix[:-1]


def _show(path: Path) -> str:
    """A config path as a user reads it: relative to the working folder when inside it, else
    relative to the packaged recipes (``image/vit_b14_finetune.yaml``), else absolute."""
    from unipred.train.config import packaged_configs

    path = Path(path).resolve()
    for root, label in ((Path.cwd(), ""), (packaged_configs().resolve(), "recipe ")):
        try:
            return f"{label}{path.relative_to(root)}"
        except ValueError:
            continue
    return str(path)


def file_sources(path: str | os.PathLike, base: bool = False) -> dict[str, str]:
    """{dotted key: source} of a YAML file and its ``_base_`` files (later files win)."""
    path = Path(path)
    try:
        raw = OmegaConf.load(path)
    except Exception:  # read_yaml has already named the problem
        return {}
    if not isinstance(raw, DictConfig):
        return {}
    out: dict[str, str] = {}
    bases = raw.get("_base_")
    for b in [bases] if isinstance(bases, str) else list(bases or []):
        if isinstance(b, str):
            out.update(file_sources(path.parent / b, base=True))
    label = ("_base_ " if base else "") + _show(path)
    plain = OmegaConf.to_container(raw, resolve=False)
    plain.pop("_base_", None)
    out.update({k: label for k in _leaves(plain)})
    return out


def record(cfg, path, overrides) -> None:
    """Attach the sources of ``cfg`` (built from ``path`` + ``overrides``) to it."""
    src = file_sources(path) if path else {}
    for item in overrides:
        try:
            plain = OmegaConf.to_container(OmegaConf.from_dotlist([str(item)]), resolve=False)
        except Exception:
            continue
        src.update({k: "command line" for k in _leaves(plain)})
    object.__setattr__(cfg, ATTR, src)


def sources(cfg) -> dict[str, str]:
    """{dotted key: where its value came from}; keys not listed hold their default."""
    return getattr(cfg, ATTR, None) or {}


def set_source(cfg, key: str, why: str) -> None:
    """Record that ``key`` was filled in by a check (``why``: "data: ...", "this machine")."""
    src = getattr(cfg, ATTR, None)
    if src is None:
        src = {}
        try:
            object.__setattr__(cfg, ATTR, src)
        except (AttributeError, TypeError):
            return
    src[key] = why


def source_of(cfg, key: str) -> str:
    """The source of ``key`` (or of the nearest enclosing key given as a whole), else
    "default"."""
    src = sources(cfg)
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        got = src.get(".".join(parts[:n]))
        if got:
            return got
    return "default"


_LINE = re.compile(r"^(\s*)([^\s:#-][^:]*):(.*)$")


def annotated_yaml(cfg) -> str:
    """The effective config as YAML, each key followed by ``# <where it came from>``."""
    from unipred.train.config import to_yaml

    out, stack = [], []  # stack: (indent, key) of the enclosing mappings
    src = sources(cfg)
    for line in to_yaml(cfg).splitlines():
        m = _LINE.match(line)
        if not m:
            out.append(line)
            continue
        indent, key, rest = len(m.group(1)), m.group(2).strip(), m.group(3)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([k for _, k in stack] + [key])
        stack.append((indent, key))
        nested = rest.strip() == "" and any(k.startswith(dotted + ".") for k in src)
        if rest.strip() == "" and (nested or not _is_leaf(cfg, dotted)):
            out.append(line)  # a section: its keys carry the sources
            continue
        out.append(f"{line}  # {source_of(cfg, dotted)}")
    return "\n".join(out) + "\n"


def _is_leaf(cfg, dotted: str) -> bool:
    import dataclasses

    node = cfg
    for part in dotted.split("."):
        if isinstance(node, dict):
            node = node.get(part)
        else:
            node = getattr(node, part, None)
    return not (dataclasses.is_dataclass(node) or (isinstance(node, dict) and node))
