"""Joint pretraining: several data sources (modalities), one tokenizer each, ONE predictor.

``joint_pretrain`` is a modality-free task. Its ``data.sources`` names, per source, an existing
registered single-modality task (and/or one of its YAML recipes) with overrides, a sampling
weight and where its coordinates sit in the shared RoPE space. The task builds each source's
task from that config and reuses its ``build_dataset`` / ``collate_fn`` and the tokenizer its
``build_model`` would build; the model is an ordinary :class:`unipred.nn.model.NEPA` whose
tokenizer is :class:`JointTokenizer` (registered as ``joint``): a dict of the sources'
tokenizers, an optional learned modality embedding per source, and one coordinate space.
Everything else (cls token, predictor, objective, loss, engine, EMA, checkpoints) is shared.

Batches go per source in turn: every micro-batch holds samples of one source (the same
source on every rank), ``data.interleave`` spreads the sources' turns over an epoch in the
ratio of their weights. Positions are a pure function of (seed, epoch, batch index), so a
resumed run continues every source exactly where it stopped. Design and measurements:
docs/joint.md.
"""

from unipred.task.joint.data import (
    SOURCE_KEYS,
    JointCollate,
    JointData,
    JointStream,
    Source,
    _dist,
    _dotlist,
    build_sources,
    quotas,
    smooth_order,
    source_config,
)
from unipred.task.joint.pretrain import (
    JointPretrain,
)
from unipred.task.joint.tokenizer import (
    _NAME,
    AXIS_NAMES,
    JointTokenizer,
    _every_tokenizer,
    default_axes,
    joint_input,
)
from unipred.task.joint.weights import (
    is_joint_state,
    single_from_joint,
)

__all__ = [
    "AXIS_NAMES",
    "JointTokenizer",
    "default_axes",
    "joint_input",
    "_every_tokenizer",
    "JointCollate",
    "JointData",
    "JointStream",
    "SOURCE_KEYS",
    "Source",
    "build_sources",
    "quotas",
    "smooth_order",
    "source_config",
    "_NAME",
    "_dist",
    "_dotlist",
    "JointPretrain",
    "is_joint_state",
    "single_from_joint",
]
