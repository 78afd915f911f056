"""What ``unipred eval`` accepts: the protocol names, their settings (``knn.*``, ``linear.*``,
``attentive.*``, ``layers.*``, ``features.*``) and how the command line is parsed into them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

FROZEN = ("knn", "linear", "attentive", "layers")


PROTOCOLS = (*FROZEN, "finetune")


RANDOM = "random"  # ckpt=random: the random-init baseline

POOLS = ("mean", "last", "cls", "grid")  # features.pool, or several joined by '+'


def pool_parts(pool: str) -> list[str]:
    """The poolings of ``features.pool``: one name, or several joined by '+' (``mean+last``:
    the mean of the tokens, then the last real token, concatenated)."""
    return str(pool).split("+")


class ProtocolError(ValueError):
    """Bad protocol settings or data; the message names the key or the problem."""


# ------------------------------------------------------------------------------- settings
@dataclass
class KNNSettings:
    k: int = 20  # DINO's protocol
    temperature: float = 0.07


@dataclass
class ProbeSettings:
    """Training of a probe on frozen features (AdamW, cosine schedule, no warmup)."""

    epochs: int = 100
    lr: float = 1e-2
    weight_decay: float = 0.0
    batch: int = 1024
    augment: bool = False  # linear only: run the training pipeline every epoch (no cache)
    # linear only: learning rates to choose from by stratified k-fold cross-validation on the
    # labelled training features (never the validation set), per row: the backbone, the
    # random-init network and the raw input each get the lr that suits them; [] = ``lr``. It
    # costs folds x len(lr_grid) extra probe trainings per row: meant for labelled subsets
    lr_grid: list[float] = field(default_factory=list)
    folds: int = 5


@dataclass
class AttentiveSettings:
    epochs: int = 20
    lr: float = 1e-3
    weight_decay: float = 0.01  # V-JEPA's attentive probe
    batch: int = 256
    heads: int = 0  # 0 = the backbone's head count
    mlp_ratio: float = 4.0


@dataclass
class FeatureSettings:
    batch: int = 256  # batch of the feature pass
    # mean over patch tokens | last | cls | grid: the tokens averaged per cell of a grid over
    # their coordinates, cells concatenated (keeps where things are, as the raw input does)
    pool: str = "mean"
    grid: int = 2  # pool=grid: cells per coordinate axis (2 on an image: 2 x 2 cells)
    # k-NN and linear read this block's output (negative: from the top) instead of the final
    # norm; autoregressive models probe best in the middle (iGPT, AIM)
    block: int | None = None
    # the pooled outputs of these blocks appended to the read-out above (e.g. [0, 1, 2]; the
    # same pooling): early blocks keep local statistics of the input that later ones trade
    # for prediction, and a linear read-out can weigh both
    concat: list[int] = field(default_factory=list)
    # per-sample standardisation of the tokens before pooling, for every row alike (backbone,
    # random init, raw input): none | sample (one mean and std per sample: its level) |
    # feature (each feature's mean and std per sample: cepstral mean/variance normalisation on
    # log-mel patches; needs pool=grid or last, the mean of such tokens is zero). A test
    # sample's statistics come from itself only (unipred.protocols.features.normalise_tokens)
    norm: str = "none"
    # true: append every block below the top one (blocks 0 .. depth-2) whatever the model's
    # depth, so a recipe's read-out fits every size of its model; with concat: both, once each
    concat_below: bool = False
    max_train: int = 0  # use the first N training samples (0 = all)
    max_val: int = 0
    num_workers: int = -1  # -1 = data.num_workers


@dataclass
class RawSettings:
    """The raw-input baseline (unipred.protocols.baselines): the tokenizer's patches through the
    backbone rows' read-out (``features.pool`` / ``grid`` / ``norm``), and flattened."""

    max_dim: int = 4096  # values per sample above which each patch / cell is averaged down
    flat: bool = True  # also the flattened patches (weights "input_flat"), the old raw row


@dataclass
class EvalSettings:
    """The ``unipred eval`` / ``evaluate-suite`` keys that are not run-config keys."""

    protocol: str = ""  # "" = the task's own validation (engine.evaluate)
    protocols: list[str] = field(default_factory=lambda: list(FROZEN))  # evaluate-suite
    ema: str = "both"  # true | false | both (raw and EMA weights)
    out: str = ""  # evaluate-suite: results folder ("" = <run folder of ckpt>/eval)
    seed: int = 0  # probe initialisation and batch order
    knn: KNNSettings = field(default_factory=KNNSettings)
    linear: ProbeSettings = field(default_factory=ProbeSettings)
    attentive: AttentiveSettings = field(default_factory=AttentiveSettings)
    layers: ProbeSettings = field(default_factory=ProbeSettings)  # the linear probe's recipe
    features: FeatureSettings = field(default_factory=FeatureSettings)
    # print the random-init backbone, the raw input and the data source's own baselines
    # beside the backbone's rows (unipred.protocols.baselines)
    baselines: bool = True
    raw: RawSettings = field(default_factory=RawSettings)


EVAL_ROOTS = tuple(f.name for f in dataclasses.fields(EvalSettings))


def split_eval_args(overrides: list[str]) -> tuple[list[str], list[str]]:
    """Split ``key=value`` arguments into (eval settings, run-config overrides)."""
    mine, rest = [], []
    for a in overrides:
        key = a.split("=", 1)[0]
        root = key.split(".", 1)[0]
        # ``ema=both`` is ours; ``ema.enabled=...`` stays the run config's EMA section
        if root in EVAL_ROOTS and (root != "ema" or "." not in key):
            mine.append(a)
        else:
            rest.append(a)
    return mine, rest


def parse_eval_settings(args: list[str]) -> EvalSettings:
    """``protocol=knn knn.k=10 ema=false`` -> EvalSettings; a bad key or value names it."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    args = [_list_arg(a) for a in args]
    try:
        merged = OmegaConf.merge(OmegaConf.structured(EvalSettings), OmegaConf.from_dotlist(args))
        s: EvalSettings = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ProtocolError(f"eval setting '{key}': {str(e).splitlines()[0]}") from None
    s.ema = str(s.ema).lower()
    if s.ema not in ("true", "false", "both"):
        raise ProtocolError(f"ema={s.ema!r}: use true, false or both")
    for name in ([s.protocol] if s.protocol else []) + list(s.protocols):
        if name not in PROTOCOLS:
            raise ProtocolError(f"protocol {name!r} is not one of {', '.join(PROTOCOLS)}")
    parts = pool_parts(s.features.pool)
    if any(p not in POOLS for p in parts) or len(set(parts)) < len(parts):
        raise ProtocolError(f"features.pool={s.features.pool!r}: use mean, last, cls or grid, or "
                            "several of them joined by '+' (e.g. mean+last: concatenated)")  # fmt: skip
    if s.features.norm not in ("none", "sample", "feature"):
        raise ProtocolError(f"features.norm={s.features.norm!r}: use none, sample or feature")
    if s.features.norm == "feature" and {"mean", "cls"} & set(parts):
        raise ProtocolError(
            f"features.norm=feature with features.pool={s.features.pool}: the mean of tokens "
            "standardised per feature is zero (cls is not a patch token); use pool=grid or last"
        )
    if s.features.grid < 1:
        raise ProtocolError(f"features.grid={s.features.grid} must be >= 1 (cells per axis)")
    if s.linear.lr_grid:
        if any(lr <= 0 for lr in s.linear.lr_grid) or s.linear.folds < 2:
            raise ProtocolError(
                f"linear.lr_grid={s.linear.lr_grid} / linear.folds={s.linear.folds}: every lr "
                "must be > 0 and folds >= 2"
            )
        if s.linear.augment:
            raise ProtocolError(
                "linear.lr_grid with linear.augment=true: the augmented probe runs the training "
                "pipeline every epoch and is not cross-validated; give linear.lr instead"
            )
    if s.layers.lr_grid:
        raise ProtocolError(
            "layers.lr_grid: the per-layer probes train together at one lr; give layers.lr"
        )
    if s.knn.k < 1 or s.knn.temperature <= 0:
        raise ProtocolError(f"knn.k={s.knn.k} must be >= 1 and knn.temperature > 0")
    if s.raw.max_dim < 0:
        raise ProtocolError(f"raw.max_dim={s.raw.max_dim} must be >= 0 (0 = no limit)")
    return s


def recipe_eval_args(eval_defaults: dict) -> list[str]:
    """A recipe's ``eval_defaults`` mapping as ``key=value`` eval arguments, to be parsed
    BEFORE the command line's (which override them); ProtocolError naming a key that is not an
    eval setting."""
    from omegaconf import OmegaConf

    if not eval_defaults:
        return []
    flat = OmegaConf.to_container(OmegaConf.create(eval_defaults))
    dotlist: list[str] = []

    def walk(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                v = "null" if v is None else ",".join(map(str, v)) if isinstance(v, list) else v
                dotlist.append(f"{prefix}{k}={v}")

    walk(flat)
    mine, rest = split_eval_args(dotlist)
    if rest:
        raise ProtocolError(f"eval_defaults: {rest[0].split('=')[0]} is not an eval setting")
    return mine


def _list_arg(a: str) -> str:
    """``protocols=knn,linear`` -> ``protocols=[knn,linear]`` (OmegaConf's list syntax)."""
    k, _, v = a.partition("=")
    lists = ("protocols", "features.concat", "linear.lr_grid", "layers.lr_grid")
    if k in lists and v and not v.startswith("["):
        return f"{k}=[{v}]"
    return a


def settings_dict(s: EvalSettings) -> dict[str, Any]:
    return dataclasses.asdict(s)
