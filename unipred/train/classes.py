"""The number of classes of a classification run, decided once, at config time.

Three places can say how many classes there are: the config (``data.num_classes``, or its
older spelling ``model.num_classes``), the data (the training folder's classes, as the data
source counts them; ``DataSource.num_classes``) and the checkpoint whose classifier is used
as it is (``ckpt=`` of ``unipred eval``, ``model.init=ckpt:``). ``resolve_classes`` picks
the first that knows, in that order (a released classifier, ``model.init=official:``, comes
last: a different count there only means its head is replaced), writes the count to
``data.num_classes`` (the model's head follows it: ``ClassifyTask.build_model``) and turns
any disagreement into one ``ConfigError`` line naming both values and where each came from,
before a process starts or a model is built.
"""

from __future__ import annotations

import json
from pathlib import Path

from unipred.train.provenance import set_source, source_of


def _ckpt_classes(path: str) -> int | None:
    """Rows of the classifier of one of our checkpoints (None: no classifier, no file)."""
    if not path or not Path(path).is_file():
        return None
    from unipred.train.checkpoint import safe_load

    ckpt = safe_load(path)  # memory-mapped: only the header and one tensor's shape are read
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else {}
    w = sd.get("model.head.classifier.weight", sd.get("head.classifier.weight"))
    return int(w.shape[0]) if w is not None and getattr(w, "dim", lambda: 0)() == 2 else None


def _official_classes(folder: str) -> int | None:
    """The class count of a released classifier folder (config.json), None for a backbone."""
    cfg = Path(folder) / "config.json"
    if not cfg.is_file():
        return None
    try:
        hf = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return None  # loading it names the problem
    if "Classification" not in " ".join(hf.get("architectures") or []):
        return None
    return len(hf.get("id2label") or {}) or hf.get("num_labels") or None


def checkpoint_classes(cfg) -> tuple[int | None, str, bool]:
    """(class count, what says it, binding): the classifier of the weights a run starts from.
    ``binding``: the head is used as it is (a different count is a conflict)."""
    if cfg.ckpt and cfg.ckpt != "random":
        return _ckpt_classes(cfg.ckpt), f"the classifier of ckpt={cfg.ckpt}", True
    kind, _, path = cfg.model.init.partition(":")
    if kind == "ckpt":
        return _ckpt_classes(path), f"the classifier of model.init={cfg.model.init}", True
    if kind == "official":
        return _official_classes(path), f"the released classifier {path}", False
    return None, "", False  # pretrain: the classifier is new


def resolve_classes(cfg, data_count) -> str | None:
    """Set ``cfg.data.num_classes`` from the config, the data or the checkpoint; one
    ``ConfigError`` line on a conflict. ``data_count()`` is the training data's class count
    (None: unknown or no training data). Returns "N (from ...)" or None when unknown."""
    from unipred.train.config import ConfigError

    d, m = cfg.data.num_classes or 0, cfg.model.num_classes or 0
    for key, v in (("data.num_classes", d), ("model.num_classes", m)):
        if v < 0:
            raise ConfigError(f"{key}={v} must be >= 0 (0 = from the data or the checkpoint)")
    if d and m and d != m:
        raise ConfigError(
            f"data.num_classes={d} ({source_of(cfg, 'data.num_classes')}) but model.num_classes="
            f"{m} ({source_of(cfg, 'model.num_classes')}): the class count has one key, "
            "data.num_classes (0 = from the data); drop model.num_classes"
        )
    said = []  # (count, how a message names it, the key or thing that says it)
    if d or m:
        key = "data.num_classes" if d else "model.num_classes"
        said.append((d or m, f"{key}={d or m} ({source_of(cfg, key)})", key))
    found = data_count()
    if found:
        root = getattr(cfg.data, "root", "")
        said.append((found, f"data.root holds {found} classes ({root})", "data.root"))
    n_ck, what_ck, binding = checkpoint_classes(cfg)
    if n_ck and binding:
        said.append((n_ck, f"{what_ck} has {n_ck} rows", what_ck))
    for (a, la, _), (b, lb, _) in zip(said, said[1:]):
        if a != b:
            raise ConfigError(
                f"the number of classes disagrees: {la} but {lb}; make them agree "
                "(data.num_classes=0 reads it from the data)"
            )
    if said:
        n, _, key = said[0]
    elif n_ck:
        n, key = n_ck, what_ck
    else:
        return None
    if key != "data.num_classes":
        set_source(cfg, "data.num_classes", f"from {key}")
    cfg.data.num_classes = n
    cfg.model.num_classes = None  # the head follows data.num_classes
    return f"{n} (from {key})"
