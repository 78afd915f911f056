"""Export to timm: a NEPA model as timm's ViT (Eva with DINOv3 RoPE), exactly when the layout
allows (``to_timm``, ``export_timm``, ``load_timm``); the official release's key layout it
builds on lives in unipred.weights.hub."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from unipred.nn.model import NEPA
from unipred.weights.hub import _atomic, official_layout_problems
from unipred.weights.pretrained import for_inference

# ------------------------------------------------------------------------------- timm
TIMM_ARCH = "vit_base_patch16_dinov3"  # timm's Eva class, DINOv3 flavour: the same RoPE as NEPA


def timm_problems(model: NEPA, bidirectional: bool = False) -> list[str]:
    """Why ``model`` does not map exactly onto timm's ViT (Eva with DINOv3 RoPE)."""
    pc, out = model.cfg.predictor, official_layout_problems(model)
    if pc.causal and not bidirectional:
        out.append(
            "its attention is causal and timm's ViT has no causal mode (pass "
            "bidirectional=True to export its bidirectional forward, as fine-tuning reads it)"
        )
    if pc.mlp not in ("gelu", "swiglu"):
        out.append(f"mlp {pc.mlp!r}: timm's Eva blocks have GELU or SwiGLU MLPs only")
    if pc.mlp_hidden != int(pc.dim * pc.mlp_ratio):
        out.append(f"mlp width {pc.mlp_hidden} is not int(dim * mlp_ratio) as timm computes it")
    if pc.coord_dims != 2:
        out.append(f"{pc.coord_dims}-D RoPE (timm's ViT has 2-D RoPE)")
    if pc.head_dim % 4:
        out.append(f"head dim {pc.head_dim} is not a multiple of 4 (2-D RoPE in timm needs it)")
    if model.cfg.head == "last":
        out.append("head 'last' (last-token pooling): timm pools the first token or the mean")
    return out


def timm_kwargs(model: NEPA, bidirectional: bool = False) -> dict:
    """``timm.create_model(TIMM_ARCH, **kwargs)`` arguments that rebuild ``model``'s network."""
    problems = timm_problems(model, bidirectional)
    if problems:
        raise ValueError("cannot export to timm: " + "; ".join(problems))
    from functools import partial

    from unipred.base.extras import require

    layers = require("timm.layers", "vision", "exporting to timm")
    pc, cfg = model.cfg.predictor, model.cfg
    return dict(
        pretrained=False,
        patch_size=cfg.tokenizer_args.get("patch_size", 14),
        in_chans=cfg.tokenizer_args.get("in_chans", 3),
        img_size=224,
        dynamic_img_size=True,  # any size divisible by the patch, as ours
        embed_dim=pc.dim,
        depth=pc.depth,
        num_heads=pc.heads,
        qkv_bias=pc.qkv_bias,
        qkv_fused=True,
        attn_type="rope",  # timm's AttentionRope keeps the key bias (Eva's own drops it)
        qk_norm=pc.qk_norm,
        mlp_ratio=pc.mlp_ratio,
        swiglu_mlp=pc.mlp == "swiglu",
        # timm drops None arguments: without LayerScale, gammas of 1 (exact: x * 1 == x)
        init_values=pc.layerscale if pc.layerscale is not None else 1.0,
        drop_path_rate=pc.drop_path,
        norm_layer=partial(layers.LayerNorm, eps=pc.norm_eps),
        class_token=True,
        num_reg_tokens=0,
        use_abs_pos_emb=False,
        use_rot_pos_emb=True,
        rope_type="dinov3",
        rope_temperature=pc.rope_theta,
        rope_rotate_half=True,
        num_classes=cfg.num_classes if cfg.head else 0,
        global_pool="avg",
        use_fc_norm=cfg.head == "mean",
        use_post_transformer_norm=True,  # ours has the final norm and then fc_norm
    )


def timm_state_dict(model: NEPA, residual_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Our state dict renamed (and completed) for the timm model of :func:`timm_kwargs`;
    ``residual_scale`` != 1 writes the equivalent network whose LayerNorm inputs are that many
    times larger (:func:`fold_norm_eps`, what a timm build with another epsilon needs)."""
    pc = model.cfg.predictor
    out = {}
    for k, v in model.state_dict().items():
        if k == "cls_token":
            out[k] = v
        elif k.startswith("tokenizer.proj."):
            out["patch_embed.proj." + k.split(".")[-1]] = v
        elif k.startswith("predictor.blocks."):
            i, rest = k.split(".")[2], ".".join(k.split(".")[3:])
            rest = {"ls1.gamma": "gamma_1", "ls2.gamma": "gamma_2"}.get(rest, rest)
            out[f"blocks.{i}.{rest}"] = v
        elif k.startswith("predictor.norm."):
            out["norm." + k.split(".")[-1]] = v
        elif k.startswith("head.fc_norm."):
            out["fc_norm." + k.split(".")[-1]] = v
        elif k.startswith("head.classifier."):
            out["head." + k.split(".")[-1]] = v
        elif k.startswith("objective."):
            # pretraining-only parts (the MLP head per horizon step, a mask token, an EMA
            # teacher): the encoder's forward never reads them, fine-tuning drops them too
            continue
        else:
            raise ValueError(f"no timm name for {k!r}")
    if pc.layerscale is None:
        for i in range(pc.depth):
            out[f"blocks.{i}.gamma_1"] = torch.ones(pc.dim)
            out[f"blocks.{i}.gamma_2"] = torch.ones(pc.dim)
    if pc.qk_norm:  # ours has no bias (and, without affine, no weight): the identity values
        for i in range(pc.depth):
            for n in ("q_norm", "k_norm"):
                w = f"blocks.{i}.attn.{n}.weight"
                out.setdefault(w, torch.ones(pc.head_dim))
                out[f"blocks.{i}.attn.{n}.bias"] = torch.zeros(pc.head_dim)
    out = {k: v.detach().clone() for k, v in out.items()}
    if residual_scale != 1.0:
        fold_norm_eps(out, model, residual_scale)
    return out


def fold_norm_eps(sd: dict[str, torch.Tensor], model: NEPA, s: float) -> None:
    """Rescale the timm state dict ``sd`` (in place) so that every LayerNorm sees its input
    ``s`` times larger and every output is unchanged.

    Why: LayerNorm(s * x, eps) == LayerNorm(x, eps / s**2) exactly (the mean and the deviation
    scale with s, the epsilon does not). timm builds this architecture's LayerNorms with its
    own epsilon (1e-5) and its JSON config has no field for another one, so an export for
    ``timm.create_model("local-dir:...")`` scales the inputs by s = sqrt(timm_eps / our_eps)
    instead of changing the epsilon. What writes into the residual stream is multiplied by s:
    the patch embedding, the cls token and both LayerScale gammas of every block, so every
    block's norm1 / norm2 and the final norm see s * x. With QK-norm the q and k rows of the
    fused qkv projection are scaled too (its LayerNorms see s * q, s * k). A mean-pooling
    classifier's fc_norm reads the pooled final-norm output, so the final norm's weight and
    bias are scaled as well: then timm's ``forward_features`` (the final-norm tokens) is s
    times ours, while its pre-logits and logits equal ours."""
    pc, d = model.cfg.predictor, model.cfg.predictor.dim
    for k in ("cls_token", "patch_embed.proj.weight", "patch_embed.proj.bias"):
        if k in sd:
            sd[k] = sd[k] * s
    for i in range(pc.depth):
        for g in ("gamma_1", "gamma_2"):
            sd[f"blocks.{i}.{g}"] = sd[f"blocks.{i}.{g}"] * s
        if pc.qk_norm:
            for k in (f"blocks.{i}.attn.qkv.weight", f"blocks.{i}.attn.qkv.bias"):
                if k in sd:  # rows [0, 2d) are q and k, [2d, 3d) v (v needs no scaling)
                    sd[k] = torch.cat([sd[k][: 2 * d] * s, sd[k][2 * d :]])
    if "fc_norm.weight" in sd:
        sd["norm.weight"] = sd["norm.weight"] * s
        sd["norm.bias"] = sd["norm.bias"] * s


def to_timm(model: NEPA, bidirectional: bool = False):
    """A timm model (``timm.create_model``) with ``model``'s weights, in eval mode."""
    from unipred.base.extras import require

    timm = require("timm", "vision", "exporting to timm")
    kw = timm_kwargs(model, bidirectional)
    net = timm.create_model(TIMM_ARCH, **kw)
    net.load_state_dict(timm_state_dict(model), strict=True)
    return net.eval()


TIMM_WEIGHTS = "model.safetensors"  # the names timm's local-dir / hf-hub loaders look for
TIMM_CONFIG = "config.json"


def timm_pretrained_cfg(model: NEPA, image_size: int = 224) -> dict:
    """timm's ``pretrained_cfg`` of an export: NEPA's preprocessing (mean = std = 0.5, not
    ImageNet's), the input size, bicubic resizing and the release's 0.875 centre crop."""
    chans = model.cfg.tokenizer_args.get("in_chans", 3)
    return {
        "tag": "unipred",
        "input_size": [chans, image_size, image_size],
        "fixed_input_size": False,  # any size divisible by the patch
        "interpolation": "bicubic",
        "crop_pct": 0.875,
        "crop_mode": "center",
        "mean": [0.5] * chans,
        "std": [0.5] * chans,
        "num_classes": model.cfg.num_classes if model.cfg.head else 0,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "see the model card of the source checkpoint",
    }


@for_inference
def load_timm(folder: str | Path):
    """``timm.create_model("local-dir:FOLDER", pretrained=True)`` in eval mode. An export of
    this version needs nothing else (its weights fold the LayerNorm epsilon in, see
    :func:`fold_norm_eps`); one written before that (``config.json`` holding
    ``unipred.norm_eps`` but no ``unipred.residual_scale``) gets the epsilon set here."""
    from unipred.base.extras import require

    timm = require("timm", "vision", "loading a timm export")
    folder = Path(folder)
    net = timm.create_model(f"local-dir:{folder}", pretrained=True)
    extra = json.loads((folder / TIMM_CONFIG).read_text()).get("unipred", {})
    if extra.get("norm_eps") is not None and "residual_scale" not in extra:
        set_layernorm_eps(net, extra["norm_eps"])
    return net


def timm_norm_eps(model: NEPA) -> float:
    """The LayerNorm epsilon timm gives ``TIMM_ARCH`` when ``create_model`` gets no
    ``norm_layer`` (as from a local-dir config.json), read off a one-block build of the
    export's width so that a timm release that changes it changes the folding too."""
    from unipred.base.extras import require

    timm = require("timm", "vision", "exporting to timm")
    pc = model.cfg.predictor
    net = timm.create_model(TIMM_ARCH, pretrained=False, embed_dim=pc.dim, depth=1,
                            num_heads=pc.heads, num_classes=0)  # fmt: skip
    eps = {m.eps for m in net.modules() if isinstance(m, torch.nn.LayerNorm)}
    if len(eps) != 1:
        raise ValueError(f"timm's {TIMM_ARCH} mixes LayerNorm epsilons {sorted(eps)}")
    return eps.pop()


def set_layernorm_eps(net: torch.nn.Module, eps: float) -> torch.nn.Module:
    """Every LayerNorm of ``net`` takes ``eps`` (NEPA's 1e-12 where timm builds 1e-5)."""
    for m in net.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = eps
    return net


def export_timm(model: NEPA, folder: str | Path, bidirectional: bool = False,
                image_size: int = 224) -> Path:  # fmt: skip
    """Write timm's own model folder: ``model.safetensors`` (timm's key names) and
    ``config.json`` (``architecture``, ``model_args``, ``pretrained_cfg`` with NEPA's
    preprocessing), so plain ``timm.create_model("local-dir:FOLDER", pretrained=True)``
    builds it and gives our logits. timm builds its LayerNorms with its own epsilon (its JSON
    has no field for ours), so the weights are written with every LayerNorm input scaled by
    ``sqrt(timm_eps / norm_eps)`` (:func:`fold_norm_eps`, exact); the factor is recorded as
    ``unipred.residual_scale`` (timm's block outputs are that many times ours; docs/hub.md)."""
    from safetensors.torch import save_file

    kw = timm_kwargs(model, bidirectional)
    pc = model.cfg.predictor
    timm_eps = timm_norm_eps(model)
    scale = math.sqrt(timm_eps / pc.norm_eps)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in timm_state_dict(model, scale).items()}
    _atomic(folder / TIMM_WEIGHTS, lambda f: save_file(sd, f, metadata={"format": "pt"}))
    args = {k: v for k, v in kw.items() if k not in ("norm_layer", "pretrained")}
    args["img_size"] = image_size
    js = {
        "architecture": TIMM_ARCH,
        "num_classes": args["num_classes"],
        "num_features": pc.dim,
        "global_pool": args["global_pool"],
        "model_args": args,
        "pretrained_cfg": timm_pretrained_cfg(model, image_size),
        "unipred": {
            "norm_eps": pc.norm_eps,
            "timm_norm_eps": timm_eps,
            "residual_scale": scale,
            "note": "the weights fold unipred's LayerNorm epsilon (norm_eps) into timm's "
            "(timm_norm_eps): every LayerNorm input is residual_scale times unipred's, so "
            "logits, pre-logits and normed features equal unipred's, while block outputs "
            "(forward_intermediates without norm) are residual_scale times unipred's"
            + (" and so is forward_features (the fc_norm reads it)" if args["use_fc_norm"] else ""),
            "causal_attention_exported_as": "bidirectional" if pc.causal else None,
        },
    }
    _atomic(folder / TIMM_CONFIG, lambda f: Path(f).write_text(json.dumps(js, indent=2) + "\n"))
    return folder
