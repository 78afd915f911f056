"""Load and save checkpoints in the official NEPA (Hugging Face ``vit_nepa``) layout.

A folder with ``config.json`` plus ``model.safetensors`` (or ``pytorch_model.bin``) is read
without transformers installed. Pretraining (``ViTNepaForPreTraining``) and classification
(``ViTNepaForImageClassification``) checkpoints are told apart by their keys. The official
model keeps q, k, v as separate matrices and, when gated, separate gate/up projections; ours
fuses them, so conversion concatenates on load and splits on save (the round trip is exact).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from unipred.nn.model import NEPA, ModelConfig
from unipred.nn.predictor import PredictorConfig
from unipred.train.formats import INIT_SOURCES
from unipred.weights.pretrained import for_inference

_ACT = {"gelu": "gelu", "silu": "silu", "swish": "silu"}
PREFIX = "vit_nepa."


class CheckpointKeyError(KeyError):
    """A checkpoint whose keys do not match the model; the message lists them."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


def config_from_official(hf: dict, *, has_head: bool | None = None) -> ModelConfig:
    """Translate an official ``config.json`` dict into our ModelConfig."""
    act = hf.get("hidden_act", "gelu")
    if act not in _ACT:
        raise ValueError(f"config.json: hidden_act {act!r} is not supported (use gelu or silu)")
    gated = bool(hf.get("use_gated_mlp", False))
    mlp = {("gelu", False): "gelu", ("silu", False): "silu", ("gelu", True): "geglu",
           ("silu", True): "swiglu"}[(_ACT[act], gated)]  # fmt: skip
    d = hf["hidden_size"]
    pc = PredictorConfig(
        dim=d,
        depth=hf["num_hidden_layers"],
        heads=hf["num_attention_heads"],
        mlp_ratio=hf.get("intermediate_size", 4 * d) / d,
        mlp=mlp,
        qkv_bias=hf.get("qkv_bias", True),
        qk_norm=hf.get("qk_norm", False),
        qk_norm_affine=hf.get("qk_norm_affine", False),
        layerscale=hf.get("layerscale_value"),
        drop_path=hf.get("drop_path_prob", 0.0) or 0.0,
        norm_eps=hf.get("layer_norm_eps", 1e-12),
        causal=hf.get("is_causal", True),
        rope_theta=hf.get("rope_theta", 100.0),
        rope_shift=hf.get("pos_embed_shift"),
        rope_jitter=hf.get("pos_embed_jitter"),
        rope_rescale=hf.get("pos_embed_rescale"),
    )
    if hf.get("qk_norm_bias"):
        raise ValueError("config.json: qk_norm_bias=true is not supported (no release uses it)")
    arch = " ".join(hf.get("architectures") or [])
    if has_head is None:
        has_head = "Classification" in arch
    n_cls = len(hf.get("id2label") or {}) or hf.get("num_labels", 0)
    head = ("mean" if hf.get("add_pooling_layer", True) else "last") if has_head else None
    return ModelConfig(
        tokenizer="image",
        tokenizer_args={
            "patch_size": hf.get("patch_size", 14),
            "in_chans": hf.get("num_channels", 3),
        },
        predictor=pc,
        head=head,
        num_classes=n_cls if has_head else 0,
    )


def config_to_official(cfg: ModelConfig, image_size: int = 224) -> dict:
    """Our ModelConfig -> an official-style ``config.json`` dict."""
    pc = cfg.predictor
    gated, act = pc.mlp in ("swiglu", "geglu"), ("silu" if pc.mlp in ("swiglu", "silu") else "gelu")
    out = {
        "model_type": "vit_nepa",
        "architectures": ["ViTNepaForImageClassification" if cfg.head else "ViTNepaForPreTraining"],
        "hidden_size": pc.dim, "num_hidden_layers": pc.depth, "num_attention_heads": pc.heads,
        "intermediate_size": pc.mlp_hidden, "hidden_act": act, "use_gated_mlp": gated,
        "qkv_bias": pc.qkv_bias, "qk_norm": pc.qk_norm, "qk_norm_affine": pc.qk_norm_affine,
        "qk_norm_bias": False, "layerscale_value": pc.layerscale, "drop_path_prob": pc.drop_path,
        "layer_norm_eps": pc.norm_eps, "is_causal": pc.causal, "rope_theta": pc.rope_theta,
        "pos_embed_shift": pc.rope_shift, "pos_embed_jitter": pc.rope_jitter,
        "pos_embed_rescale": pc.rope_rescale, "image_size": image_size,
        "patch_size": cfg.tokenizer_args.get("patch_size", 14),
        "num_channels": cfg.tokenizer_args.get("in_chans", 3), "initializer_range": cfg.init_std,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        "add_pooling_layer": cfg.head != "last",
    }  # fmt: skip
    if cfg.head:
        out["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_classes)}
        out["label2id"] = {f"LABEL_{i}": i for i in range(cfg.num_classes)}
    return out


# ------------------------------------------------------------------------- key conversion
def _block_map(i: int, o: str, pc: PredictorConfig) -> list[tuple[str, list[str]]]:
    """(our key, [official keys it is made of]) for block i; several keys = concatenated."""
    a, m = f"{o}encoder.layer.{i}.attention.", f"predictor.blocks.{i}."
    out = []
    for kind in ("weight", "bias") if pc.qkv_bias else ("weight",):
        out.append(
            (f"{m}attn.qkv.{kind}", [f"{a}attention.{n}.{kind}" for n in ("query", "key", "value")])
        )
    if pc.qk_norm and pc.qk_norm_affine:
        out += [(f"{m}attn.q_norm.weight", [f"{a}attention.q_norm.weight"]),
                (f"{m}attn.k_norm.weight", [f"{a}attention.k_norm.weight"])]  # fmt: skip
    L = f"{o}encoder.layer.{i}."
    gated = pc.mlp in ("swiglu", "geglu")
    for kind in ("weight", "bias"):
        up = [f"{L}intermediate.gate_proj.{kind}"] if gated else []
        out += [
            (f"{m}attn.proj.{kind}", [f"{a}output.dense.{kind}"]),
            (f"{m}mlp.fc1.{kind}", up + [f"{L}intermediate.up_proj.{kind}"]),
            (f"{m}mlp.fc2.{kind}", [f"{L}output.dense.{kind}"]),
            (f"{m}norm1.{kind}", [f"{L}layernorm_before.{kind}"]),
            (f"{m}norm2.{kind}", [f"{L}layernorm_after.{kind}"]),
        ]
    if pc.layerscale is not None:
        out += [(f"{m}ls1.gamma", [f"{L}layer_scale.lambda1"]),
                (f"{m}ls2.gamma", [f"{L}output.layer_scale.lambda1"])]  # fmt: skip
    return out


def key_map(cfg: ModelConfig, prefix: str = PREFIX) -> list[tuple[str, list[str]]]:
    """The full list of (our key, official keys) pairs for a model configuration."""
    e = f"{prefix}embeddings."
    pairs = [
        ("cls_token", [f"{e}cls_token"]),
        ("tokenizer.proj.weight", [f"{e}patch_embeddings.projection.weight"]),
        ("tokenizer.proj.bias", [f"{e}patch_embeddings.projection.bias"]),
    ]
    for i in range(cfg.predictor.depth):
        pairs += _block_map(i, prefix, cfg.predictor)
    pairs += [("predictor.norm.weight", [f"{prefix}layernorm.weight"]),
              ("predictor.norm.bias", [f"{prefix}layernorm.bias"])]  # fmt: skip
    if cfg.head in ("mean", "last"):
        if cfg.head == "mean":
            pairs += [
                ("head.fc_norm.weight", ["fc_norm.weight"]),
                ("head.fc_norm.bias", ["fc_norm.bias"]),
            ]
        pairs += [("head.classifier.weight", ["classifier.weight"]),
                  ("head.classifier.bias", ["classifier.bias"])]  # fmt: skip
    return pairs


def official_to_ours(sd: dict, cfg: ModelConfig, strict: bool = True, source: str = "checkpoint"):
    """Official state dict -> (our state dict, missing official keys). Raises on a mismatch."""
    if not any(k.startswith(PREFIX) for k in sd) and any(k.startswith("embeddings.") for k in sd):
        sd = {PREFIX + k: v for k, v in sd.items()}  # a bare ViTNepaModel / EMA file
    pairs = key_map(cfg)
    wanted = {k for _, ks in pairs for k in ks}
    missing = sorted(wanted - set(sd))
    unexpected = sorted(set(sd) - wanted)
    if strict and (missing or unexpected):
        raise CheckpointKeyError(
            f"{source}: keys do not match the configuration.\n  missing: {missing}\n  unexpected: {unexpected}"
        )
    ours = {}
    for k, ks in pairs:
        if all(x in sd for x in ks):
            ours[k] = torch.cat([sd[x] for x in ks], dim=0) if len(ks) > 1 else sd[ks[0]]
    return ours, missing


def ours_to_official(sd: dict, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {}
    for k, ks in key_map(cfg):
        parts = sd[k].chunk(len(ks), dim=0) if len(ks) > 1 else [sd[k]]
        out.update({x: p.contiguous().clone() for x, p in zip(ks, parts)})
    return out


# ------------------------------------------------------------------------------- file I/O
def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read model.safetensors or pytorch_model.bin from a folder (or a file path)."""
    p = Path(path)
    if p.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin", "pytorch_model_ema.bin"):
            if (p / name).exists():
                p = p / name
                break
        else:
            raise FileNotFoundError(
                f"{path}: no model.safetensors or pytorch_model.bin in the folder"
            )
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    from unipred.train.checkpoint import CheckpointError, safe_load

    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(p))
        obj = safe_load(p)
    except CheckpointError:
        raise  # one line naming the file (refused or unreadable)
    except Exception as e:  # corrupt or truncated files
        raise ValueError(f"{p}: cannot read the checkpoint ({type(e).__name__}: {e})") from e
    return obj.get("state_dict", obj) if isinstance(obj, dict) else obj


@for_inference
def load_official_nepa(path: str | Path, *, weights: str | None = None, **overrides) -> NEPA:
    """Build a NEPA model from an official Hugging Face folder (config.json + weights), in
    eval mode (``for_inference``).

    ``weights`` picks a file inside the folder (e.g. "pytorch_model_ema.bin"). ``overrides``
    replace predictor fields after reading the config (e.g. ``causal=False``).
    """
    folder = Path(path)
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    hf = json.loads(cfg_path.read_text())
    sd = read_state_dict(folder / weights if weights else folder)
    has_head = any(k.startswith("classifier.") for k in sd)
    cfg = config_from_official(hf, has_head=has_head)
    if overrides:
        import dataclasses

        cfg.predictor = dataclasses.replace(cfg.predictor, **overrides)
    model = NEPA(cfg)
    ours, _ = official_to_ours(sd, cfg, strict=True, source=str(folder))
    model.load_state_dict(ours, strict=True)
    return model


def init_from_official(model, path: str) -> None:
    """``model.init=official:PATH``: a released classifier whose head fits ``model`` loads
    whole (it evaluates with its own head); otherwise every backbone tensor is copied."""
    from unipred.train.checkpoint import load_backbone

    src = load_official_nepa(path).state_dict()
    head = {k: tuple(v.shape) for k, v in src.items() if k.startswith("head.")}
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith("head.")}
    if head and head == mine:
        model.load_state_dict(src, strict=True)
        print(f"model.init: loaded {path}: all {len(src)} tensors matched, 0 new")
    else:
        load_backbone(model, src, path)


INIT_SOURCES["official"] = init_from_official  # the training layer reads model.init through it


def save_official_nepa(model: NEPA, path: str | Path, image_size: int = 224) -> Path:
    """Write ``config.json`` + ``model.safetensors`` in the official layout (atomically).

    Refuses (ValueError naming why) a model the layout cannot represent: another tokenizer
    than the image one (audio, video), tokenizer options or a head it has no field for."""
    from safetensors.torch import save_file

    check_official_layout(model)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    sd = ours_to_official(model.state_dict(), model.cfg)
    _atomic(folder / "model.safetensors", lambda f: save_file(sd, f, metadata={"format": "pt"}))
    cfg = json.dumps(config_to_official(model.cfg, image_size), indent=2)
    _atomic(folder / "config.json", lambda f: Path(f).write_text(cfg))
    return folder


def _atomic(dest: Path, write) -> None:
    from unipred.base.atomic import atomic_write

    atomic_write(dest, write)  # the user's umask (0644 under 022), never mkstemp's 0600


def main(argv: list[str]) -> int:
    """``unipred convert SRC DST``: official folder -> our export, or back with --to-official."""
    ap = argparse.ArgumentParser(prog="unipred convert", description=main.__doc__)
    ap.add_argument("src", help="official Hugging Face folder (config.json + weights)")
    ap.add_argument("dst", help="output folder")
    ap.add_argument("--weights", default=None, help="file inside SRC, e.g. pytorch_model_ema.bin")
    args = ap.parse_args(argv)
    model = load_official_nepa(args.src, weights=args.weights)
    save_official_nepa(model, args.dst)
    n = sum(p.numel() for p in model.parameters())
    print(f"converted {args.src} -> {args.dst} ({n:,} parameters, head={model.cfg.head})")
    return 0


# ------------------------------------------------------------------- what a layout can hold
def official_layout_problems(model: NEPA) -> list[str]:
    """Why ``model`` cannot be written in the official ViTNepa layout (empty list: it can)."""
    from unipred.base.registry import TOKENIZERS

    cfg, out = model.cfg, []
    if not isinstance(model.tokenizer, TOKENIZERS.get("image")):
        out.append(
            f"its tokenizer is {cfg.tokenizer!r} ({type(model.tokenizer).__name__}); the official "
            "layout holds only a Conv2d patch embedding over pixels with 2-D RoPE"
        )
    extra = sorted(set(cfg.tokenizer_args) - {"patch_size", "in_chans"})
    if extra:
        out.append(f"tokenizer_args {extra} have no official config.json field")
    if cfg.head not in (None, "mean", "last"):
        out.append(f"head {cfg.head!r} has no official equivalent (only mean / last classifiers)")
    if cfg.predictor.qk_norm and cfg.predictor.qk_norm_affine is None:
        out.append("qk_norm_affine must be true or false")
    return out


def check_official_layout(model: NEPA) -> None:
    problems = official_layout_problems(model)
    if problems:
        raise ValueError(
            "cannot export to the official NEPA layout: "
            + "; ".join(problems)
            + ". Use model.save_pretrained(folder) (any modality) instead."
        )


# the timm export lives in unipred.weights.timm_export; its names stay reachable here
# (``from unipred.weights.hub import to_timm``), loaded on first use
_TIMM = (
    "TIMM_ARCH",
    "timm_problems",
    "timm_kwargs",
    "timm_state_dict",
    "to_timm",
    "TIMM_WEIGHTS",
    "TIMM_CONFIG",
    "timm_pretrained_cfg",
    "load_timm",
    "set_layernorm_eps",
    "export_timm",
)


def __getattr__(name: str):
    if name in _TIMM:
        from unipred.weights import timm_export

        return getattr(timm_export, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
