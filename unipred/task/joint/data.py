"""The joint data: per-source configs built from registered tasks (``data.sources``), and the
stream that interleaves whole micro-batches of each source in the ratio of their weights,
resumable exactly (positions are a function of seed, epoch and batch index)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from unipred.base.registry import TASKS
from unipred.data.seeding import seeded
from unipred.task.base import DataConfig
from unipred.task.joint.tokenizer import _NAME, joint_input

SOURCE_KEYS = ("config", "task", "weight", "data", "model", "axes")


# ------------------------------------------------------------------------------- sources
@dataclass
class JointData(DataConfig):
    """Sources, RoPE space, batching. A source: {config: a recipe of a single-modality task
    (optional), task: its registered name (optional with config), weight: its share of the
    batches (1.0), data: overrides of its data section, model: {name, tokenizer,
    tokenizer_args} overrides for its tokenizer, axes: RoPE axis of each of its coordinates}."""

    sources: dict[str, Any] = field(default_factory=dict)
    space: int = 3  # axes of the shared RoPE coordinate space: (t, y, x)
    modality_embedding: bool = False  # a learned vector per source added to its tokens
    interleave: str = "smooth"  # smooth (evenly spread turns) | random (seeded per epoch)
    batches_per_epoch: int = 0  # per rank; 0 = the sum of each source's batches per pass
    num_workers: int = 0


@dataclass
class Source:
    name: str
    task: Any  # the source's Task instance (its own validated RunConfig in task.cfg)
    weight: float
    axes: list[int] | None


def _dotlist(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out += _dotlist(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}={json.dumps(v)}")
    return out


def source_config(cfg, name: str, spec: dict):
    """The validated RunConfig of source ``name``: its recipe (``config``) or task, its
    overrides, the joint run's seed and width; errors name ``data.sources.NAME``."""
    from unipred.train.config import ConfigError, load_config

    where = f"data.sources.{name}"
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping (config/task/weight/data/model/axes)")
    bad = [k for k in spec if k not in SOURCE_KEYS]
    if bad:
        raise ConfigError(f"{where}.{bad[0]}: unknown key (valid: {', '.join(SOURCE_KEYS)})")
    if not spec.get("config") and not spec.get("task"):
        raise ConfigError(f"{where}: give a task (a registered pretraining task) or a config")
    over = []
    if spec.get("task"):
        over.append(f"task={spec['task']}")
    model = dict(spec.get("model") or {})
    bad = [k for k in model if k not in ("name", "tokenizer", "tokenizer_args")]
    if bad:
        raise ConfigError(
            f"{where}.model.{bad[0]}: a source sets only its tokenizer (name, tokenizer, "
            "tokenizer_args); the predictor is the joint model's"
        )
    over += _dotlist({"data": dict(spec.get("data") or {}), "model": model})
    over += [f"seed={cfg.seed}", "model.init=''", f"run_dir={cfg.run_dir}/{name}"]
    try:
        scfg = load_config(spec.get("config") or None, over)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    from unipred.task.joint.pretrain import JointPretrain  # the task module imports this one

    if scfg.task == cfg.task or issubclass(TASKS.get(scfg.task), JointPretrain):
        raise ConfigError(f"{where}: a joint task cannot be a source")
    return scfg


def build_sources(cfg) -> list[Source]:
    from unipred.train.config import ConfigError

    d = cfg.data
    if not d.sources:
        raise ConfigError("data.sources: joint_pretrain needs at least one source")
    out = []
    for name, spec in d.sources.items():
        if not _NAME.match(str(name)):
            raise ConfigError(f"data.sources.{name}: a source name uses letters, digits and _")
        scfg = source_config(cfg, name, spec)
        weight = float(spec.get("weight", 1.0))
        if not weight > 0 or not math.isfinite(weight):
            raise ConfigError(f"data.sources.{name}.weight={weight} must be > 0")
        axes = spec.get("axes")
        out.append(
            Source(
                name,
                TASKS.get(scfg.task)(scfg),
                weight,
                None if axes is None else [int(a) for a in axes],
            )
        )
    return out


# -------------------------------------------------------------------------------- stream
def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def quotas(weights: list[float], total: int) -> list[int]:
    """Split ``total`` batches in the ratio of ``weights`` (largest remainder)."""
    w = [x / sum(weights) for x in weights]
    q = [int(total * x) for x in w]
    rest = sorted(range(len(w)), key=lambda i: (total * w[i] - q[i], -i), reverse=True)
    for i in rest[: total - sum(q)]:
        q[i] += 1
    return q


def smooth_order(q: list[int]) -> list[int]:
    """The sources' turns of one epoch, each source's spread evenly (smooth weighted round
    robin): source i appears q[i] times."""
    cur, total, out = [0] * len(q), sum(q), []
    for _ in range(total):
        cur = [c + x for c, x in zip(cur, q)]
        i = max(range(len(q)), key=lambda j: (cur[j], -j))
        cur[i] -= total
        out.append(i)
    return out


class JointStream(torch.utils.data.IterableDataset):
    """Samples of several map-style datasets, ``batch_size`` consecutive ones from one source.

    Epoch e has ``batches`` micro-batches per rank; source i gets ``quotas(weights)[i]`` of
    them, in the order of ``interleave``. Source i's k-th batch overall is batch k mod P of
    its pass k // P (P batches per rank per pass): the samples ``perm[rank::world][...]`` of a
    seeded permutation per (source, pass), so 1 x B and 2 x B/2 read the same global batches.
    Everything is a function of (seed, epoch, batch index): ``resume`` skips without reading.
    Implements :class:`unipred.data.loader.ResumableStream`.
    """

    def __init__(self, names, datasets, weights, seed, batch_size, batches=0, accumulate=1,
                 interleave="smooth", train=True):  # fmt: skip
        self.names, self.datasets, self.weights = list(names), list(datasets), list(weights)
        self.seed, self.req_batches, self.accumulate = seed, batches, max(1, accumulate)
        self.interleave, self.train = interleave, train
        self.epoch, self.batch_size, self._skip = 0, int(batch_size), (None, 0)
        self.rank, self.world = _dist()

    # -- ResumableStream ------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.rank, self.world = _dist()

    def resume(self, batches: int, batch_size: int) -> None:
        self.batch_size = int(batch_size)
        self.rank, self.world = _dist()
        self._skip = (self.epoch, int(batches))

    # -- layout ---------------------------------------------------------------------------
    def per_pass(self, i: int) -> int:
        """Batches of source i per rank per pass (whole batches; the rest of a pass is
        dropped, a different rest each pass)."""
        return len(self.datasets[i]) // self.world // self.batch_size

    def batches(self) -> int:
        """Micro-batches per rank per epoch, a multiple of the gradient accumulation."""
        n = self.req_batches or sum(self.per_pass(i) for i in range(len(self.datasets)))
        return n // self.accumulate * self.accumulate

    def __len__(self) -> int:
        return self.batches() * self.batch_size if self.train else self._val_len()

    def order(self, epoch: int) -> list[int]:
        q = quotas(self.weights, self.batches())
        if self.interleave == "random":
            seq = [i for i, n in enumerate(q) for _ in range(n)]
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            return [seq[j] for j in torch.randperm(len(seq), generator=g).tolist()]
        return smooth_order(q)

    def _perm(self, i: int, p: int) -> list[int]:
        key = (i, p)
        if getattr(self, "_perm_key", None) != key:
            g = torch.Generator().manual_seed((self.seed + 1) * 1_000_003 + 10_007 * i + p)
            n = len(self.datasets[i])
            self._perm_cache = torch.randperm(n, generator=g)[self.rank :: self.world].tolist()
            self._perm_key = key
        return self._perm_cache

    def indices(self, i: int, k: int) -> list[int]:
        """Dataset indices of source i's k-th batch (counted from the start of training)."""
        P = self.per_pass(i)
        if P < 1:
            raise ValueError(
                f"joint source {self.names[i]!r} has {len(self.datasets[i])} samples, fewer than "
                f"one batch of {self.batch_size} per rank x {self.world} ranks"
            )
        p, j = divmod(k, P)
        b = self.batch_size
        return self._perm(i, p)[j * b : (j + 1) * b]

    def plan(self, epoch: int) -> list[tuple[int, int]]:
        """(source, that source's batch count) of every micro-batch of ``epoch``."""
        q = quotas(self.weights, self.batches())
        seen = [epoch * n for n in q]
        out = []
        for i in self.order(epoch):
            out.append((i, seen[i]))
            seen[i] += 1
        return out

    # -- iteration ------------------------------------------------------------------------
    def _worker(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)

    def __iter__(self):
        if not self.train:
            yield from self._val_iter()
            return
        wid, nw = self._worker()
        epoch, skip = self.epoch, self._skip[1] if self._skip[0] == self.epoch else 0
        plan = self.plan(epoch)
        for j in range(skip, len(plan)):
            if (j - skip) % nw != wid:  # the DataLoader takes batch i from worker i % W
                continue
            i, k = plan[j]
            name, ds = self.names[i], self.datasets[i]
            for idx in self.indices(i, k):
                # the sample's random choices: seeded by (seed, epoch, source, index)
                with seeded(self.seed, epoch, name, idx):
                    item = ds[idx]
                yield name, item

    def _val_batches(self):
        b = self.batch_size
        for i, ds in enumerate(self.datasets):
            mine = list(range(len(ds)))[self.rank :: self.world]
            for j in range(len(mine) // b):
                yield i, mine[j * b : (j + 1) * b]

    def _val_len(self) -> int:
        return sum(1 for _ in self._val_batches()) * self.batch_size

    def _val_iter(self):
        wid, nw = self._worker()
        for j, (i, idx) in enumerate(self._val_batches()):
            if j % nw == wid:
                for k in idx:
                    yield self.names[i], self.datasets[i][k]


class JointCollate:
    """Items (source, sample) of one source -> ({"source", "input"}, n): the source task's own
    collate, then its ``inputs`` (what its model would be called with)."""

    def __init__(self, tasks: dict, collates: dict):
        self.tasks, self.collates = tasks, collates

    def __call__(self, items):
        names = {n for n, _ in items}
        if len(names) != 1:
            raise ValueError(f"a joint batch mixes sources {sorted(names)}")
        name = names.pop()
        fn = self.collates[name] or torch.utils.data.default_collate
        batch = fn([x for _, x in items])
        task = self.tasks[name]
        return joint_input(name, task.inputs(batch)), task.batch_size(batch)
