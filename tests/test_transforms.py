"""Augmentations equal the release's (nepa-recipe.md sections 8 and 10)."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from unipred.tasks.image.transforms import (
    ImageAugConfig,
    MixupCollate,
    eval_resize_size,
    eval_transform,
    train_transform,
)


def _img(h=300, w=400, seed=0):
    a = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(a)


def _finetune_cfg():
    return ImageAugConfig(
        interpolation="bicubic",
        auto_augment="rand-m9-mstd0.5-inc1",
        reprob=0.25,
        remode="pixel",
        recount=1,
        mixup=0.8,
        cutmix=1.0,
    )


def test_pretrain_transform_is_rrc_bilinear_flip_normalize():
    tf = train_transform(ImageAugConfig())
    kinds = [type(t) for t in tf.transforms]
    assert kinds == [T.RandomResizedCrop, T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    rrc, flip, _, norm = tf.transforms
    assert rrc.size == (224, 224) and rrc.scale == (0.08, 1.0)
    assert rrc.ratio == pytest.approx((3 / 4, 4 / 3))
    assert rrc.interpolation == InterpolationMode.BILINEAR
    assert flip.p == 0.5 and list(norm.mean) == [0.5] * 3 and list(norm.std) == [0.5] * 3
    x = tf(_img())
    assert x.shape == (3, 224, 224) and x.min() >= -1 and x.max() <= 1


def test_finetune_transform_is_timms_randaugment_and_erasing():
    from timm.data.auto_augment import RandAugment
    from timm.data.random_erasing import RandomErasing
    from timm.data.transforms import RandomResizedCropAndInterpolation

    tf = train_transform(_finetune_cfg())
    by_type = {type(t): t for t in tf.transforms}
    rrc = by_type[RandomResizedCropAndInterpolation]
    assert rrc.scale == (0.08, 1.0) and rrc.size == (224, 224)
    assert "bicubic" in repr(rrc)
    ra = by_type[RandAugment]
    assert ra.num_layers == 2 and len(ra.ops) == 15  # "inc1": the increasing-op set
    assert all(op.magnitude == 9 and op.magnitude_std == 0.5 for op in ra.ops)
    assert any(op.name == "SolarizeIncreasing" for op in ra.ops)
    er = by_type[RandomErasing]
    assert er.probability == 0.25 and er.mode == "pixel" and er.max_count == 1
    assert not any(isinstance(t, T.ColorJitter) for t in tf.transforms)  # RandAugment: no jitter
    torch.manual_seed(0)
    assert tf(_img()).shape == (3, 224, 224)


@pytest.mark.parametrize(
    "crop_pct, mode, size", [(0.875, "shorter", 256), (0.95, "square", (235, 235))]
)
def test_eval_transform_b_and_l(crop_pct, mode, size):
    cfg = ImageAugConfig(eval_crop_pct=crop_pct, eval_resize_mode=mode)
    tf = eval_transform(cfg)
    resize = tf.transforms[0]
    assert resize.size in (size, [size])
    assert resize.interpolation == InterpolationMode.BICUBIC
    img = _img(300, 400)
    want = T.Compose(
        [
            T.Resize(size, interpolation=InterpolationMode.BICUBIC),
            T.CenterCrop(224),
            T.ToTensor(),
            T.Normalize([0.5] * 3, [0.5] * 3),
        ]
    )(img)
    torch.testing.assert_close(tf(img), want)


def test_eval_sizes_follow_crop_pct():
    assert eval_resize_size(ImageAugConfig(eval_crop_pct=0.875)) == 256
    assert eval_resize_size(ImageAugConfig(eval_crop_pct=0.95)) == 235
    # the L square resize does not keep the aspect ratio: a 300x400 image becomes 235x235
    tf = eval_transform(ImageAugConfig(eval_crop_pct=0.95, eval_resize_mode="square"))
    assert tf.transforms[0](_img(300, 400)).size == (235, 235)


def test_mixup_collate_gives_smoothed_soft_targets():
    collate = MixupCollate(_finetune_cfg(), num_classes=10, label_smoothing=0.1)
    m = collate.mixup
    assert (m.mixup_alpha, m.cutmix_alpha, m.mix_prob, m.switch_prob, m.mode) == (
        0.8,
        1.0,
        1.0,
        0.5,
        "batch",
    )
    assert m.label_smoothing == 0.1
    samples = [(torch.randn(3, 8, 8), i % 10) for i in range(5)]  # odd: last one dropped
    x, y = collate(samples)
    assert x.shape == (4, 3, 8, 8) and y.shape == (4, 10)
    torch.testing.assert_close(y.sum(dim=1), torch.ones(4))
    assert float(y.min()) >= 0.1 / 10 - 1e-6  # smoothing floor


def test_bad_config_values_name_the_key():
    with pytest.raises(ValueError, match="aug.interpolation"):
        ImageAugConfig(interpolation="lanczos9")
    with pytest.raises(ValueError, match="eval_resize_mode"):
        ImageAugConfig(eval_resize_mode="stretch")
    with pytest.raises(ValueError, match="eval_crop_pct"):
        ImageAugConfig(eval_crop_pct=1.5)


def test_randaugment_posterize_at_full_magnitude_does_not_crash():
    """rand-m9-mstd0.5-inc1 can draw magnitude 10, i.e. posterize to 0 bits, which Pillow >= 11
    rejects; the fine-tune transform keeps the old all-black result instead of raising."""
    tf = train_transform(_finetune_cfg())  # installs the 0-bit-safe posterize
    ra = next(t for t in tf.transforms if type(t).__name__ == "RandAugment")
    op = next(op for op in ra.ops if op.name == "PosterizeIncreasing")
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0  # -> 0 bits kept
    out = np.asarray(op(_img(64, 64)))
    assert out.shape == (64, 64, 3) and not out.any()
    op.magnitude = 5  # 2 bits kept: the two most significant bits survive
    out = np.asarray(op(_img(64, 64)))
    assert out.any() and not (out & 0x3F).any()
