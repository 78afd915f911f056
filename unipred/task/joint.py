"""Joint pretraining: several data sources (modalities), one tokenizer each, ONE predictor.

``joint_pretrain`` is a modality-free task. Its ``data.sources`` names, per source, an existing
registered single-modality task (and/or one of its YAML recipes) with overrides, a sampling
weight and where its coordinates sit in the shared RoPE space. The task builds each source's
task from that config and reuses its ``build_dataset`` / ``collate_fn`` and the tokenizer its
``build_model`` would build; the model is an ordinary :class:`unipred.model.NEPA` whose
tokenizer is :class:`JointTokenizer` (registered as ``joint``): a dict of the sources'
tokenizers, an optional learned modality embedding per source, and one coordinate space.
Everything else (cls token, predictor, objective, loss, engine, EMA, checkpoints) is shared.

Batches go per source in turn: every micro-batch holds samples of one source (the same
source on every rank), ``data.interleave`` spreads the sources' turns over an epoch in the
ratio of their weights. Positions are a pure function of (seed, epoch, batch index), so a
resumed run continues every source exactly where it stopped. Design and measurements:
docs/joint.md.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from unipred.base.registry import TASKS, TOKENIZERS
from unipred.base.tokens import Tokens
from unipred.data.seeding import seeded
from unipred.nn.model import build_tokenizer
from unipred.nn.rope import lift_coords
from unipred.task import DataConfig, PretrainTask, collapse_stats

AXIS_NAMES = ("t", "y", "x")  # the default 3-axis space; docs/joint.md
SOURCE_KEYS = ("config", "task", "weight", "data", "model", "axes")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def default_axes(k: int, space: int) -> list[int] | None:
    """Where a tokenizer's k coordinates go in the (t, y, x) space when the config does not
    say: 1 axis -> t (a sequence), 2 -> (y, x) (an image grid), ``space`` -> all of them."""
    if k == space:
        return list(range(k))
    if space == 3:
        return {1: [0], 2: [1, 2]}.get(k)
    return None


def joint_input(source: str, x: Any) -> dict:
    """The model input of a joint batch: which source, and that source's own model input."""
    return {"source": source, "input": x}


# ------------------------------------------------------------------------------ tokenizer
@TOKENIZERS.register("joint")
class JointTokenizer(nn.Module):
    """{"source": NAME, "input": x} -> that source's tokenizer's Tokens, coordinates lifted into
    the shared ``space``-D RoPE space (unused axes 0), plus the source's modality embedding.

    ``sources``: name -> {"tokenizer": registered name, "args": tokenizer args, "axes": RoPE
    axis of each of its coordinates (None: :func:`default_axes`)}.
    """

    coord_dims = 3  # (t, y, x); an instance built with another ``space`` says so itself

    def __init__(self, dim: int, sources: dict | None = None, space: int = 3,
                 modality_embedding: bool = False):  # fmt: skip
        super().__init__()
        if sources is None:  # an example: every registered tokenizer that builds by default
            sources = _every_tokenizer(dim, int(space))
        if not sources:
            raise ValueError("the joint tokenizer needs at least one source")
        self.dim, self.space, self.coord_dims = dim, int(space), int(space)
        self.tokenizers = nn.ModuleDict()
        self.axes: dict[str, list[int]] = {}
        for name, spec in sources.items():
            if not _NAME.match(name):
                raise ValueError(f"joint source name {name!r}: use letters, digits and _")
            tok = build_tokenizer(spec["tokenizer"], dim, dict(spec.get("args") or {}))
            axes = spec.get("axes")
            axes = default_axes(tok.coord_dims, self.space) if axes is None else list(axes)
            if axes is None:
                raise ValueError(
                    f"data.sources.{name}.axes: the {spec['tokenizer']!r} tokenizer has "
                    f"{tok.coord_dims} coordinate axes; say where they go in the "
                    f"{self.space}-axis RoPE space (e.g. axes: {list(range(tok.coord_dims))})"
                )
            axes = [int(a) for a in axes]
            if (
                len(axes) != tok.coord_dims
                or len(set(axes)) != len(axes)
                or min(axes) < 0
                or max(axes) >= self.space
            ):
                raise ValueError(
                    f"data.sources.{name}.axes={axes}: need {tok.coord_dims} distinct axes in "
                    f"[0, {self.space}) (the {spec['tokenizer']!r} tokenizer's coordinates)"
                )
            self.tokenizers[name] = tok
            self.axes[name] = axes
            # the layout travels in the state dict, so a checkpoint alone says where each
            # source's coordinates went (checked when it initialises a single-modality model)
            self.register_buffer(
                f"layout_{name}", torch.tensor([self.space, *axes], dtype=torch.float32)
            )
        self.modality = (
            nn.ParameterDict({n: nn.Parameter(torch.zeros(dim)) for n in sources})
            if modality_embedding
            else None
        )

    def example_input(self, batch_size: int = 2) -> dict:
        name = next(iter(self.tokenizers))
        return joint_input(name, self.tokenizers[name].example_input(batch_size))

    def split(self, x) -> tuple[str, Any]:
        if not isinstance(x, dict) or "source" not in x or "input" not in x:
            raise ValueError(
                "the joint tokenizer expects {'source': NAME, 'input': batch} "
                f"(unipred.joint.joint_input), got {type(x).__name__}"
            )
        if x["source"] not in self.tokenizers:
            raise ValueError(
                f"joint input names source {x['source']!r}; this model has {list(self.tokenizers)}"
            )
        return x["source"], x["input"]

    def forward(self, x) -> Tokens:
        name, inner = self.split(x)
        t = self.tokenizers[name](inner)
        tokens = t.tokens
        if self.modality is not None:
            tokens = tokens + self.modality[name].to(tokens.dtype)
        return Tokens(tokens, lift_coords(t.coords, self.axes[name], self.space), t.valid)


def _every_tokenizer(dim: int, space: int) -> dict:
    out = {}
    for name in TOKENIZERS.names():
        if name == "joint":
            continue
        try:
            tok = build_tokenizer(name, dim, {})
        except Exception:  # noqa: BLE001 - needs arguments, or an optional library
            continue
        if default_axes(tok.coord_dims, space) is not None and _NAME.match(name):
            out[name] = {"tokenizer": name, "args": {}}
    return out


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
    Implements :class:`unipred.loader.ResumableStream`.
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


# ---------------------------------------------------------------------------------- task
@TASKS.register("joint_pretrain")
class JointPretrain(PretrainTask):
    """Joint next-embedding pretraining: several sources (modalities), one predictor."""

    data_config = JointData

    def __init__(self, cfg):
        super().__init__(cfg)
        self.sources = build_sources(cfg)
        self._pending: set[str] = set()  # sources owed collapse statistics
        self._asked = False

    @classmethod
    def check_config(cls, cfg) -> None:
        d = cfg.data
        if d.interleave not in ("smooth", "random"):
            raise ValueError(f"data.interleave={d.interleave!r}: use smooth or random")
        if d.space < 1:
            raise ValueError(f"data.space={d.space} must be >= 1")
        if cfg.model.tokenizer or cfg.model.tokenizer_args:
            raise ValueError(
                "model.tokenizer / model.tokenizer_args: a joint model's tokenizers are its "
                "sources' (data.sources.NAME.model.tokenizer_args)"
            )
        if cfg.model.objective.target == "patch":
            raise ValueError(
                "model.objective.target=patch: raw patches differ in size between sources; "
                "joint pretraining predicts embeddings or layers"
            )
        t = cfg.trainer
        if t.strategy == "ddp" and not t.find_unused_parameters:
            raise ValueError(
                "joint_pretrain under DDP: set trainer.find_unused_parameters=true (a batch "
                "uses one source's tokenizer, the others get no gradient)"
            )
        if t.strategy == "fsdp":
            raise ValueError("joint_pretrain: trainer.strategy=fsdp is not supported; use ddp")
        build_sources(cfg)  # each source's own config and checks, errors naming the source

    @classmethod
    def smoke_config(cls):
        return {"data.sources": {"a": {"task": "fmnist_pretrain", "data": {"generated_samples": 8},
                                       "model": {"tokenizer_args": {"in_chans": 1, "patch_size": 7}}},
                                 "b": {"task": "video_pretrain", "data": {"image_size": 8, "num_frames": 4, "train_samples": 8, "val_samples": 4, "num_workers": 0},
                                       "model": {"name": "nepa_video_debug"}}},
                "model.name": "nepa_debug", "trainer.global_batch": 4}  # fmt: skip

    # -- model ------------------------------------------------------------------------------
    def tokenizer_specs(self) -> dict:
        """name -> {tokenizer, args, axes}: what each source task's own model would use (its
        build_model, so adjustments it makes, e.g. the audio sample rate, carry over)."""
        mc = self.model_config(head="none")
        pc = mc.predictor
        specs = {}
        for s in self.sources:
            scfg = s.task.cfg
            p = scfg.model.predictor
            p.dim, p.heads, p.depth = pc.dim, pc.heads, 1  # only the tokenizer is kept
            smc = s.task.build_model().cfg
            specs[s.name] = {"tokenizer": smc.tokenizer, "args": dict(smc.tokenizer_args),
                             "axes": s.axes}  # fmt: skip
        return specs

    def build_model(self):
        import dataclasses

        from unipred.nn.model import NEPA

        d = self.cfg.data
        mc = self.model_config(head="none")
        args = {"sources": self.tokenizer_specs(), "space": d.space,
                "modality_embedding": d.modality_embedding}  # fmt: skip
        mc = dataclasses.replace(mc, tokenizer="joint", tokenizer_args=args)
        mc.predictor = dataclasses.replace(mc.predictor, coord_dims=d.space)
        return NEPA(mc)

    # -- data -------------------------------------------------------------------------------
    def build_dataset(self, split):
        from unipred.train.config import batch_plan

        names, sets, weights = [], [], []
        for s in self.sources:
            ds = s.task.build_dataset(split)
            if ds is None:
                continue
            if isinstance(ds, torch.utils.data.IterableDataset) or not hasattr(ds, "__len__"):
                raise ValueError(
                    f"data.sources.{s.name}: its {split} data is a stream "
                    f"({type(ds).__name__}); joint pretraining reads map-style sources "
                    "(folders, CSVs, in-memory sets) so that every source resumes exactly"
                )
            names.append(s.name)
            sets.append(ds)
            weights.append(s.weight)
        if not sets:
            return None
        plan = batch_plan(self.cfg)
        d = self.cfg.data
        return JointStream(names, sets, weights, self.cfg.seed, plan["per_device_batch"],
                           d.batches_per_epoch,
                           plan["accumulate_grad_batches"], d.interleave, split == "train")  # fmt: skip

    def collate_fn(self, split):
        return JointCollate(
            {s.name: s.task for s in self.sources},
            {s.name: s.task.collate_fn(split) for s in self.sources},
        )

    def batch_size(self, batch) -> int:
        return int(batch[1])

    # -- steps ------------------------------------------------------------------------------
    def training_step(self, model, batch):
        x = self.inputs(batch)
        name = x["source"]
        out = model(x)
        logs = {"loss": out.loss.detach(), f"{name}/loss": out.loss.detach()}
        if self.want_stats and not self._asked:  # a new monitoring period: every source owes
            self._pending = {s.name for s in self.sources}
        self._asked = self.want_stats
        if self.want_stats or name in self._pending:  # per modality: each source's first
            self._pending.discard(name)  # batch of the period (every batch on monitored steps)
            for pre, t in (("", out.predictions), ("target_", out.targets)):
                stats = collapse_stats(t, out.valid)
                logs.update({f"collapse/{name}/{pre}{k}": v for k, v in stats.items()})
        return out.loss, logs

    def validation_step(self, model, batch, metrics):
        x = self.inputs(batch)
        loss = model(x).loss
        return {"loss": loss, f"{x['source']}/loss": loss}


# ------------------------------------------------------------- joint -> single-modality init
def is_joint_state(sd: dict) -> bool:
    return any(k.startswith("tokenizer.tokenizers.") for k in sd)


def single_from_joint(model, sd: dict, where, source: str = "") -> dict:
    """A joint state dict -> the state dict of ``model`` (a single-modality NEPA): the chosen
    source's tokenizer becomes ``tokenizer.*``, its modality embedding is folded into the
    tokenizer's projection bias (adding a constant to every token is exactly that), the other
    sources are dropped. The source is ``source`` or the only one whose tokenizer tensors fit
    ``model``'s. Refuses a model whose RoPE layout differs from the one pretrained."""
    from unipred.train.checkpoint import CheckpointError

    names = sorted({k.split(".")[2] for k in sd if k.startswith("tokenizer.tokenizers.")})
    want = {k[len("tokenizer.") :]: v for k, v in model.state_dict().items()
            if k.startswith("tokenizer.")}  # fmt: skip

    def tok_of(n):
        pre = f"tokenizer.tokenizers.{n}."
        return {k[len(pre) :]: v for k, v in sd.items() if k.startswith(pre)}

    def fits(n):
        t = tok_of(n)
        return t.keys() == want.keys() and all(t[k].shape == want[k].shape for k in t)

    if source:
        if source not in names:
            raise CheckpointError(f"{where}: no joint source {source!r} (it has {names})")
        if not fits(source):
            raise CheckpointError(
                f"{where}: the tokenizer of joint source {source!r} does not fit this model's "
                f"{type(model.tokenizer).__name__} (keys or shapes differ)"
            )
    else:
        ok = [n for n in names if fits(n)]
        if len(ok) != 1:
            what = "none" if not ok else f"{ok}: add @SOURCE to model.init"
            raise CheckpointError(
                f"{where}: joint checkpoint with sources {names}; whose tokenizer fits this "
                f"model's {type(model.tokenizer).__name__}: {what}"
            )
        source = ok[0]
    layout = sd.get(f"tokenizer.layout_{source}")
    if layout is not None:
        space, axes = int(layout[0]), [int(a) for a in layout[1:]]
        pc = model.predictor.cfg
        have = list(pc.rope_axes) if pc.rope_axes is not None else list(range(pc.coord_dims))
        if pc.rope_dims != space or have != axes:
            raise CheckpointError(
                f"{where}: joint source {source!r} was pretrained with its coordinates on RoPE "
                f"axes {axes} of {space}; set model.predictor.rope_space={space} "
                f"model.predictor.rope_axes=[{','.join(map(str, axes))}]"
            )
    out = {k: v for k, v in sd.items() if not k.startswith("tokenizer.")}
    out.update({f"tokenizer.{k}": v for k, v in tok_of(source).items()})
    emb = sd.get(f"tokenizer.modality.{source}")
    if emb is not None:
        if "tokenizer.proj.bias" not in out:
            raise CheckpointError(
                f"{where}: source {source!r} has a modality embedding but this model's "
                "tokenizer has no tokenizer.proj.bias to fold it into"
            )
        out["tokenizer.proj.bias"] = out["tokenizer.proj.bias"] + emb.to(
            out["tokenizer.proj.bias"].dtype
        )
    print(f"model.init: joint checkpoint, source {source!r} of {names}")
    return out
