"""Evaluation protocols of self-supervised backbones, for any modality.

Every protocol consumes a backbone and a labelled dataset, nothing else: the backbone is any
module with ``forward_features(x, layers=...)`` returning ``hidden`` (B, T, D, after the final
norm), ``layers`` (the requested block outputs) and ``valid`` (B, T) or None, and an
``n_prefix`` attribute (leading tokens that are not patches, e.g. cls); the data are the
``train`` / ``val`` splits of a classification task (``Task.feature_dataset``), with labels
as the second element of each batch.

* ``knn``: DINO's weighted k-nearest-neighbour classifier on L2-normalised pooled features,
  cosine similarity, k = 20, votes weighted by exp(similarity / 0.07).
* ``linear``: MAE's linear probe (BatchNorm without affine + one linear layer) on pooled
  features of the frozen backbone in eval mode; features are computed once and cached unless
  ``linear.augment=true`` (then the task's training pipeline is run every epoch).
* ``attentive``: V-JEPA's attentive probe: one learned query cross-attends to all patch
  tokens of the frozen backbone (one cross-attention block with its MLP), then a linear layer.
* ``layers``: one linear probe on the pooled output of every block, plus the final norm, all
  trained together on features of one pass over the data; prints accuracy per layer, names
  the best one.
* ``finetune``: the task's own training run (engine.fit) from the checkpoint's backbone.

The frozen protocols share one feature pass per weight set (raw / EMA): ``run_protocols``.
"""

from unipred.nn.features import (
    FeatureCache,
    frozen_features,
)
from unipred.protocols.attentive import (
    AttentiveProbe,
    run_attentive,
)
from unipred.protocols.features import (
    Features,
    _backbone,
    _head,
    _labels,
    _pad_cat,
    _to,
    extract_features,
    load_backbone_weights,
    weight_sets,
)
from unipred.protocols.knn import (
    _scores,
    knn_classify,
    run_knn,
    topk_accuracy,
)
from unipred.protocols.layers import (
    LayerProbes,
    run_layers,
)
from unipred.protocols.linear import (
    LinearProbe,
    _cosine,
    predict,
    run_linear,
    train_probe,
)
from unipred.protocols.report import (
    LABELS,
    _pct,
    comparison_markdown,
    format_row,
    read_results,
    results_markdown,
    row_details,
    suite_folder,
    write_results,
)
from unipred.protocols.settings import (
    EVAL_ROOTS,
    FROZEN,
    PROTOCOLS,
    RANDOM,
    AttentiveSettings,
    EvalSettings,
    FeatureSettings,
    KNNSettings,
    ProbeSettings,
    ProtocolError,
    RawSettings,
    _list_arg,
    parse_eval_settings,
    settings_dict,
    split_eval_args,
)
from unipred.protocols.suite import (
    _autocast,
    _device,
    _loader,
    _num_classes,
    demo_settings,
    evaluate_suite,
    frozen_columns,
    frozen_eval,
    need_classification,
    run_finetune,
    run_linear_augmented,
    run_protocols,
)

__all__ = [
    "FeatureCache",
    "frozen_features",
    "AttentiveSettings",
    "EVAL_ROOTS",
    "EvalSettings",
    "FROZEN",
    "FeatureSettings",
    "KNNSettings",
    "PROTOCOLS",
    "ProbeSettings",
    "ProtocolError",
    "RANDOM",
    "RawSettings",
    "parse_eval_settings",
    "settings_dict",
    "split_eval_args",
    "_list_arg",
    "Features",
    "extract_features",
    "load_backbone_weights",
    "weight_sets",
    "_backbone",
    "_head",
    "_labels",
    "_pad_cat",
    "_to",
    "knn_classify",
    "run_knn",
    "topk_accuracy",
    "_scores",
    "LinearProbe",
    "predict",
    "run_linear",
    "train_probe",
    "_cosine",
    "AttentiveProbe",
    "run_attentive",
    "LayerProbes",
    "run_layers",
    "LABELS",
    "comparison_markdown",
    "format_row",
    "read_results",
    "results_markdown",
    "row_details",
    "suite_folder",
    "write_results",
    "_pct",
    "evaluate_suite",
    "demo_settings",
    "frozen_columns",
    "frozen_eval",
    "need_classification",
    "run_finetune",
    "run_linear_augmented",
    "run_protocols",
    "_autocast",
    "_device",
    "_loader",
    "_num_classes",
]
