"""Semantic segmentation on a NEPA backbone: BEiT/MAE-style pyramid + UperNet + FCN aux head.

Pure PyTorch (no mmcv/mmseg). Read top to bottom: config, conv block, pyramid neck, UperNet
(PPM + FPN), FCN auxiliary head, ``SegmentationModel``, inference (whole / sliding window,
multi-scale + flip), checkpoint loading.

Patch-size padding (512 px crops vs 14 px patches): ``SegmentationModel.forward`` pads the
image on the right and bottom with zeros (the normalised mean colour) up to the next multiple
of the patch size (512 -> 518), runs backbone and heads on the padded image, upsamples the
logits to the padded size and crops them back to the input size. The image is never resized
or distorted, and padded pixels have no labels (they are cut away before the loss), which is
the same as padding the labels with the ignore index. Sliding-window inference uses the same
forward on each 512 window, so every window is handled identically in training and testing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from unipred.nn.model import NEPA, ModelConfig, model_config
from unipred.task.segment import SegmentOutput, segment_loss

# predict()'s defaults where neither the call nor the model's ``inference`` sets one
INFERENCE = {"mode": "slide", "crop": 512, "stride": 341, "scales": (1.0,), "flip": False,
             "window_batch": 8}  # fmt: skip


@dataclass
class SegHeadConfig:
    """UperNet + auxiliary FCN head, as in mmseg's ``upernet_beit`` / ``upernet_mae`` configs."""

    layers: list[int] = field(default_factory=lambda: [3, 5, 7, 11])  # 0-indexed blocks (B)
    channels: int | None = None  # UperNet width; None = backbone width (768 B, 1024 L)
    pool_scales: list[int] = field(default_factory=lambda: [1, 2, 3, 6])
    dropout: float = 0.1  # Dropout2d before each classifier
    aux_channels: int = 256
    aux_weight: float = 0.4  # 0 disables the auxiliary head
    sync_bn: bool = False  # SyncBatchNorm in the head (multi-GPU runs; DDP on CPU cannot)


class ConvBNReLU(nn.Sequential):
    """mmcv's ConvModule(conv without bias, BatchNorm, ReLU)."""

    def __init__(self, cin: int, cout: int, k: int):
        conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        super().__init__(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Pyramid(nn.Module):
    """Four same-width maps at strides p/4, p/2, p, 2p (x4 deconv, x2 deconv, identity, pool)."""

    def __init__(self, dim: int):
        super().__init__()
        self.up4 = nn.Sequential(
            nn.ConvTranspose2d(dim, dim, 2, 2), nn.BatchNorm2d(dim), nn.GELU(),
            nn.ConvTranspose2d(dim, dim, 2, 2),
        )  # fmt: skip
        self.up2 = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.down2 = nn.MaxPool2d(2, 2)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.up4(feats[0]), self.up2(feats[1]), feats[2], self.down2(feats[3])]


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class UperHead(nn.Module):
    """Pyramid pooling on the coarsest map, then a top-down FPN; all levels fused at 1/4."""

    def __init__(self, cin: int, ch: int, num_classes: int, pool_scales, dropout: float):
        super().__init__()
        self.ppm = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBNReLU(cin, ch, 1)) for s in pool_scales
        )
        self.ppm_bottleneck = ConvBNReLU(cin + len(pool_scales) * ch, ch, 3)
        self.lateral = nn.ModuleList(ConvBNReLU(cin, ch, 1) for _ in range(3))
        self.fpn = nn.ModuleList(ConvBNReLU(ch, ch, 3) for _ in range(3))
        self.fpn_bottleneck = ConvBNReLU(4 * ch, ch, 3)
        self.classifier = _classifier(ch, num_classes, dropout)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        top = feats[3]
        pooled = [_resize(p(top), top.shape[2:]) for p in self.ppm]
        lat = [conv(f) for conv, f in zip(self.lateral, feats[:3])]
        lat.append(self.ppm_bottleneck(torch.cat([top, *pooled], dim=1)))
        for i in range(3, 0, -1):  # top-down: coarse maps added into the next finer one
            lat[i - 1] = lat[i - 1] + _resize(lat[i], lat[i - 1].shape[2:])
        outs = [conv(x) for conv, x in zip(self.fpn, lat[:3])] + [lat[3]]
        size = outs[0].shape[2:]
        fused = self.fpn_bottleneck(torch.cat([outs[0]] + [_resize(o, size) for o in outs[1:]], 1))
        return self.classifier(fused)


class FCNHead(nn.Module):
    """Auxiliary head on the stride-p map: one 3x3 conv block, dropout, 1x1 classifier."""

    def __init__(self, cin: int, ch: int, num_classes: int, dropout: float):
        super().__init__()
        self.conv = ConvBNReLU(cin, ch, 3)
        self.classifier = _classifier(ch, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.conv(x))


def _classifier(ch: int, num_classes: int, dropout: float) -> nn.Sequential:
    conv = nn.Conv2d(ch, num_classes, 1)
    nn.init.normal_(conv.weight, std=0.01)  # mmseg's conv_seg init
    nn.init.zeros_(conv.bias)
    return nn.Sequential(nn.Dropout2d(dropout), conv)


class SegHead(nn.Module):
    """Pyramid neck + UperNet decode head + optional FCN auxiliary head."""

    def __init__(self, dim: int, cfg: SegHeadConfig, num_classes: int):
        super().__init__()
        ch = cfg.channels or dim
        self.neck = Pyramid(dim)
        self.decode = UperHead(dim, ch, num_classes, cfg.pool_scales, cfg.dropout)
        self.aux = (FCNHead(dim, cfg.aux_channels, num_classes, cfg.dropout)
                    if cfg.aux_weight > 0 else None)  # fmt: skip


class SegmentationModel(NEPA):
    """A NEPA backbone plus a UperNet head: the image modality's ``upernet`` decoder of the
    generic segmentation objective (unipred.task.segment). The backbone's parameter names are
    exactly NEPA's (``tokenizer.*``, ``cls_token``, ``predictor.*``) and the new modules live
    under ``head.*`` like NEPA's classifier, so any NEPA checkpoint (pretraining or
    fine-tuning, ours or official) loads through ``unipred.train.checkpoint.apply_init`` /
    ``model.init``. ``inference`` holds ``predict``'s defaults (the config's ``data.eval``)."""

    def __init__(self, cfg: ModelConfig, head: SegHeadConfig, num_classes: int = 150,
                 ignore_index: int = 255, inference: dict | None = None):  # fmt: skip
        if cfg.tokenizer != "image":
            raise ValueError(f"the upernet decoder needs the image tokenizer (a 2-D patch grid), "
                             f"not {cfg.tokenizer!r}; use data.decoder=linear")  # fmt: skip
        if cfg.head is not None:
            cfg = dataclasses.replace(cfg, head=None, num_classes=0)
        super().__init__(cfg)
        depth, dim = cfg.predictor.depth, cfg.predictor.dim
        layers = list(head.layers)
        if len(layers) != 4 or sorted(layers) != layers or layers[0] < 0 or layers[-1] >= depth:
            raise ValueError(f"seg head layers must be 4 non-decreasing block indices in "
                             f"[0, {depth}), got {layers}")  # fmt: skip
        self.head_cfg, self.layers = head, tuple(layers)
        self.ignore_index, self.inference = ignore_index, dict(inference or {})
        self.patch_size = self.tokenizer.patch_size
        # the final norm is not on the path to the heads (block outputs are taken before it);
        # freezing it keeps DDP from waiting for gradients that never come
        self.predictor.norm.requires_grad_(False)
        self.head = SegHead(dim, head, num_classes)
        if head.sync_bn:  # BatchNorm statistics over all GPUs (mmseg's SyncBN); needs CUDA
            nn.SyncBatchNorm.convert_sync_batchnorm(self.head)

    @classmethod
    def from_name(cls, name: str, head: SegHeadConfig | None = None, num_classes: int = 150,
                  **overrides):  # fmt: skip
        """``SegmentationModel.from_name("nepa_vit_b14", causal=False, drop_path=0.1)``."""
        return cls(model_config(name, **overrides), head or SegHeadConfig(), num_classes)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) with H, W multiples of p -> 4 maps (B, D, H/p, W/p), bidirectional."""
        B, _, H, W = x.shape
        gh, gw = H // self.patch_size, W // self.patch_size
        wanted = sorted(set(self.layers))  # a tiny model may feed one block to two levels
        out = self.forward_features(x, layers=tuple(wanted), causal=False)
        by_block = dict(zip(wanted, out.layers))
        # (B, T, D) -> drop the prefix -> (B, N, D) -> (B, D, gh, gw)
        return [by_block[i][:, self.n_prefix :].transpose(1, 2).reshape(B, -1, gh, gw)
                for i in self.layers]  # fmt: skip

    def forward(self, x: torch.Tensor) -> SegmentOutput:
        """(B, 3, H, W), any H, W -> logits at (H, W); see the module docstring on padding."""
        H, W = x.shape[2:]
        p = self.patch_size
        x = F.pad(x, (0, (-W) % p, 0, (-H) % p))  # right/bottom zeros up to a multiple of p
        feats = self.features(x)
        logits = _resize(self.head.decode(self.head.neck(feats)), x.shape[2:])[:, :, :H, :W]
        aux = None
        if self.head.aux is not None and self.training:
            aux = _resize(self.head.aux(feats[2]), x.shape[2:])[:, :, :H, :W]
        return SegmentOutput(logits, aux, self.head_cfg.aux_weight)

    def loss(self, out: SegmentOutput, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Cross-entropy (mean over labelled pixels) + aux_weight x the aux head's."""
        return segment_loss(out, labels, self.ignore_index)

    # ------------------------------------------------------------------------- inference
    @torch.no_grad()
    def predict(self, img, out_size=None, mode=None, crop=None, stride=None, scales=None,
                flip=None, window_batch=None) -> torch.Tensor:  # fmt: skip
        """Class probabilities (B, C, *out_size) for normalised images (B, 3, H, W).

        Per scale (a ratio of the given size) and flip: ``mode`` "whole" runs the image at
        once, "slide" runs ``crop`` windows every ``stride`` pixels and averages the logits
        where windows overlap (mmseg's slide_inference). Logits are resized to ``out_size``
        (default: the input size), softmaxed, and averaged over scales and flips.
        """
        given = dict(mode=mode, crop=crop, stride=stride, scales=scales, flip=flip,
                     window_batch=window_batch)  # fmt: skip
        o = {**INFERENCE, **self.inference, **{k: v for k, v in given.items() if v is not None}}
        mode, crop, stride, flip, window_batch = (o[k] for k in ("mode", "crop", "stride", "flip",
                                                                  "window_batch"))  # fmt: skip
        scales = o["scales"]
        H, W = img.shape[2:]
        out_size = tuple(out_size or (H, W))
        probs = 0.0
        views = [(s, f) for s in scales for f in ((False, True) if flip else (False,))]
        for s, f in views:
            x = img if s == 1.0 else _resize(img, (int(H * s + 0.5), int(W * s + 0.5)))
            x = x.flip(-1) if f else x
            if mode == "whole":
                logits = self(x).logits
            elif mode == "slide":
                logits = slide_logits(self, x, crop, stride, window_batch)
            else:
                raise ValueError(f"inference mode must be 'whole' or 'slide', got {mode!r}")
            logits = logits.flip(-1) if f else logits
            probs = probs + _resize(logits.float(), out_size).softmax(dim=1)
        return probs / len(views)


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """mmseg's grid: windows every ``stride``, the last one flush with the border."""
    n = max(size - crop + stride - 1, 0) // stride + 1
    return sorted({max(min(i * stride + crop, size) - crop, 0) for i in range(n)})


def slide_logits(model, img, crop: int, stride: int, window_batch: int = 8) -> torch.Tensor:
    """Average of the logits of overlapping ``crop`` windows; (B, 3, H, W) -> (B, C, H, W)."""
    B, _, H, W = img.shape
    ch, cw = min(crop, H), min(crop, W)
    boxes = [(y, x) for y in window_starts(H, ch, stride) for x in window_starts(W, cw, stride)]
    total = count = None
    for i in range(0, len(boxes), window_batch):
        chunk = boxes[i : i + window_batch]
        wins = torch.cat([img[:, :, y : y + ch, x : x + cw] for y, x in chunk])  # (b*B, 3, ch, cw)
        out = model(wins).logits.float()
        if total is None:
            total = out.new_zeros(B, out.shape[1], H, W)
            count = out.new_zeros(1, 1, H, W)
        for j, (y, x) in enumerate(chunk):
            total[:, :, y : y + ch, x : x + cw] += out[j * B : (j + 1) * B]
            count[:, :, y : y + ch, x : x + cw] += 1
    return total / count
