"""`unipred visualize`: attention and next-embedding prediction maps of a NEPA image model.

For each image and one patch p (random, or ``--patch``), as the release's
``run_visualization.py`` does (nepa-recipe.md section 11), it writes one PNG with:

1. the preprocessed image;
2. the image with patch p outlined (and p+1, the patch a causal model predicts, dashed);
3. the attention map: the attention row of p over all patch tokens (the cls column
   dropped), averaged over heads and the chosen layers;
4. the prediction map: the cosine between p's output (after the final norm) and every input
   patch embedding, softmaxed over patches (optionally top-p filtered and renormalised),
   drawn as (prob / max) ** gamma for contrast (the release uses gamma 10).

Weights: ``--ckpt`` (our checkpoint; ``--ema`` for its EMA weights), ``--official`` (a
released Hugging Face folder), or neither (random init of ``--model``, for comparison).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import numpy as np
import torch
from PIL import Image
from unipred.tasks.image.data import is_image_file
from unipred.tasks.image.transforms import ImageAugConfig, eval_transform


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="*", help="image files or folders (default: synthetic)")
    p.add_argument("--ckpt", default="", help="our checkpoint (.ckpt)")
    p.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    p.add_argument("--official", default="", help="an official NEPA Hugging Face folder")
    p.add_argument("--model", default="nepa_vit_b14", help="size for random init")
    p.add_argument("--size", type=int, default=None,
                   help="image side, a multiple of the patch (default: the size the checkpoint "
                        "was trained at, else 224)")  # fmt: skip
    p.add_argument("--num-images", type=int, default=8)
    p.add_argument("--patch", type=int, default=-1, help="patch index (-1: random per image)")
    p.add_argument("--layers", type=int, nargs="*", default=None, help="blocks (default: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="top-p filter of the prediction map")
    p.add_argument("--gamma", type=float, default=10.0, help="contrast exponent of the map")
    p.add_argument("--out", default="runs/visualize", help="output folder for the PNGs")
    p.add_argument("--seed", type=int, default=0)


def load_model(args) -> torch.nn.Module:
    """The model named by --ckpt / --official / --model, in eval mode."""
    if args.ckpt:
        return _from_checkpoint(args.ckpt, args.ema).eval()
    if args.official:
        from unipred.weights.hub import load_official_nepa

        return load_official_nepa(args.official).eval()
    from unipred.nn.model import NEPA

    torch.manual_seed(args.seed)
    return NEPA.from_name(args.model).eval()


def _from_checkpoint(path: str, ema: bool):
    from omegaconf import OmegaConf

    from unipred.base.registry import TASKS
    from unipred.train.checkpoint import _strip, check_state_dict, read_checkpoint
    from unipred.train.config import schema_for

    ckpt = read_checkpoint(path)
    if "unipred_config" not in ckpt:
        raise ValueError(f"{path}: missing key 'unipred_config' (not a unipred checkpoint)")
    raw = ckpt["unipred_config"]
    schema = OmegaConf.structured(schema_for(raw["task"]))
    cfg = OmegaConf.to_object(OmegaConf.merge(schema, raw))
    cfg.model.init = ""  # the weights come from this checkpoint
    model = TASKS.get(cfg.task)(cfg).build_model()
    if ema and "ema_state_dict" not in ckpt:
        raise ValueError(f"{path}: missing key 'ema_state_dict' (asked for --ema)")
    sd = ckpt["ema_state_dict"] if ema else _strip(ckpt["state_dict"])
    check_state_dict(path, sd, model.state_dict())
    model.load_state_dict(sd)
    aug = getattr(cfg.data, "aug", None)
    model.trained_size = getattr(aug, "img_size", None)  # visualize at the training size
    model.trained_aug = aug  # and with its normalisation (1 channel for grey data)
    return model


def load_images(
    paths: list[str], n: int, size: int, seed: int, aug=None, chans: int = 3
) -> list[tuple[str, torch.Tensor]]:
    """(name, normalised (chans, size, size) tensor) for up to n images; synthetic if none given.
    ``aug`` is the training run's ImageAugConfig (its mean/std), ``chans`` the model's input
    channels: a model trained on grey images reads them grey (1 channel)."""
    files = []
    for p in paths:
        if os.path.isdir(p):
            files += sorted(os.path.join(p, f) for f in os.listdir(p) if is_image_file(f))
        else:
            files.append(p)
    aug = dataclasses.replace(aug, img_size=size) if aug is not None else None
    tf = eval_transform(aug or ImageAugConfig(img_size=size))
    mode = "L" if chans == 1 else "RGB"
    out = []
    for f in files[:n]:
        with Image.open(f) as im:
            out.append((os.path.splitext(os.path.basename(f))[0], tf(im.convert(mode))))
    if not files:
        rng = np.random.default_rng(seed)
        for i in range(n):
            a = np.clip(rng.normal(rng.uniform(40, 215, 3), 30, (size, size, 3)), 0, 255)
            out.append((f"synthetic{i}", tf(Image.fromarray(a.astype(np.uint8)).convert(mode))))
    return out


@torch.no_grad()
def maps(model, x: torch.Tensor, patch: int, layers=None, top_p: float = 1.0) -> dict:
    """Attention and prediction maps of patch ``patch`` for one image x (3, H, W)."""
    out = model.forward_features(x[None], return_attn=True)
    npre = model.n_prefix
    n_h, n_w = model.tokenizer.grid(x.shape[1], x.shape[2])
    n = n_h * n_w
    if not 0 <= patch < n:
        raise ValueError(f"--patch {patch} is outside the {n_h}x{n_w} patch grid")
    layers = list(range(len(out.attentions))) if layers is None else list(layers)
    att = torch.stack([out.attentions[i][0] for i in layers])  # (L, H, T, T)
    attn = att[:, :, npre + patch, npre:].float().mean(dim=(0, 1))  # (N,) cls column dropped
    pred = out.hidden[0, npre + patch].float()
    inputs = out.inputs[0, npre:].float()  # (N, D) the raw patch embeddings
    cos = torch.nn.functional.cosine_similarity(pred[None], inputs, dim=-1)
    prob = cos.softmax(dim=0)
    if top_p < 1.0:
        prob = _top_p(prob, top_p)
    return {
        "attention": attn.reshape(n_h, n_w).numpy(),
        "prediction": prob.reshape(n_h, n_w).numpy(),
        "grid": (n_h, n_w),
    }


def _top_p(prob: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the most likely entries whose mass reaches p, renormalised."""
    sorted_p, idx = prob.sort(descending=True)
    keep = sorted_p.cumsum(0) - sorted_p < p
    out = torch.zeros_like(prob)
    out[idx[keep]] = prob[idx[keep]]
    return out / out.sum()


def draw(path: str, x: torch.Tensor, m: dict, patch: int, gamma: float, causal: bool) -> None:
    """Write the four panels of one image to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    img = ((x.permute(1, 2, 0).float() + 1) / 2).clamp(0, 1).numpy()  # undo Normalize(0.5, 0.5)
    if img.shape[2] == 1:  # a grey model's input: drawn grey
        img = np.repeat(img, 3, axis=2)
    (n_h, n_w), H, W = m["grid"], x.shape[1], x.shape[2]
    ph, pw = H / n_h, W / n_w
    pred = m["prediction"] / max(float(m["prediction"].max()), 1e-12)
    panels = [
        ("image", None),
        ("patch", None),
        ("attention", m["attention"]),
        ("prediction", pred**gamma),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.4))
    for ax, (title, heat) in zip(axes, panels):
        ax.imshow(img)
        if heat is not None:
            ax.imshow(heat, cmap="inferno", alpha=0.6, extent=(0, W, H, 0), interpolation="nearest")
        if title != "image":
            r, c = divmod(patch, n_w)
            ax.add_patch(Rectangle((c * pw, r * ph), pw, ph, fill=False, ec="cyan", lw=2))
            if causal and patch + 1 < n_h * n_w:
                r, c = divmod(patch + 1, n_w)
                ax.add_patch(
                    Rectangle((c * pw, r * ph), pw, ph, fill=False, ec="lime", lw=1.5, ls="--")
                )
        ax.set_title(
            title if title != "prediction" else f"prediction (gamma {gamma:g})", fontsize=9
        )
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``unipred visualize``."""
    parser = argparse.ArgumentParser(prog="unipred visualize", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        model = load_model(args)
        size = args.size or getattr(model, "trained_size", None) or 224
        chans = getattr(model.tokenizer, "in_chans", 3)
        aug = getattr(model, "trained_aug", None)
        images = load_images(args.images, args.num_images, size, args.seed, aug, chans)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"visualize: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    causal = bool(model.predictor.cfg.causal)
    for name, x in images:
        n_h, n_w = model.tokenizer.grid(x.shape[1], x.shape[2])
        patch = args.patch if args.patch >= 0 else int(rng.integers(n_h * n_w))
        try:
            m = maps(model, x, patch, args.layers, args.top_p)
        except ValueError as e:
            print(f"visualize: {e}", file=sys.stderr)
            return 2
        path = os.path.join(args.out, f"{name}_p{patch}.png")
        draw(path, x, m, patch, args.gamma, causal)
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
