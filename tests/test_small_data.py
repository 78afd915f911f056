"""A researcher's own small images: label budgets, grey images, config-time shape checks,
the small-image recipes, ``fit CONFIG --help`` and the ``model.init`` report (issue 14)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from unipred.tasks.image.decode import decode_image

from unipred.base.registry import TASKS
from unipred.cli import main
from unipred.data.accounting import COUNTER, BadSampleCounter
from unipred.task import dataset_labels, per_class_indices
from unipred.train.config import ConfigError, build_model_config, load_config
from unipred.train.provenance import source_of


def _grey_folder(root, classes=3, per_class=6, size=12, colour_file=False):
    """class folders of grey PNGs (mode L); optionally one colour JPEG in the first class."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            a = (rng.random((size, size)) * 60 + 60 * c).astype(np.uint8)
            Image.fromarray(a, mode="L").save(root / f"c{c}" / f"{i:02d}.png")
    if colour_file:
        a = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(a, mode="RGB").save(root / "c0" / "zz_colour.png")
    return root


def _pack(src, out):
    import argparse

    from unipred.tasks.image.pack import add_arguments, pack

    p = argparse.ArgumentParser()
    add_arguments(p)
    return pack(p.parse_args([str(src), str(out), "--workers", "1"]))


def _task(overrides, config="small/finetune"):
    """The recipe with every label and no repeats unless ``overrides`` say otherwise."""
    cfg = load_config(config, ["data.labels_per_class=0", "data.repeat=1", *overrides])
    return TASKS.get(cfg.task)(cfg), cfg


# ---------------------------------------------------------------------------- label budgets
def test_per_class_indices_seeded_balanced_and_named_error():
    y = [0] * 10 + [1] * 7 + [2] * 12
    a = per_class_indices(y, 5, seed=0)
    assert len(a) == 15 and a == sorted(a)
    assert sorted(np.bincount(np.array(y)[a]).tolist()) == [5, 5, 5]
    assert per_class_indices(y, 5, seed=0) == a  # the same subset every time
    assert per_class_indices(y, 5, seed=1) != a
    with pytest.raises(ValueError, match="class 1 of .* has only 7"):
        per_class_indices(y, 8, seed=0)


def test_image_folder_label_budget_is_the_same_for_nepa_and_scratch(tmp_path):
    root = _grey_folder(tmp_path / "d", per_class=6)
    base = [f"data.root={root}", "data.labels_per_class=2", "data.repeat=3"]
    scratch, _ = _task(base + ["seed=1"])
    nepa, _ = _task(base + ["seed=2", "model.predictor.causal=true"])
    a, b = scratch.build_dataset("train"), nepa.build_dataset("train")
    assert len(a) == 3 * 2 * 3  # 3 classes x 2 labels x 3 repeats
    assert a.indices == b.indices  # the run seed does not move the subset
    assert sorted(np.bincount(dataset_labels(a)).tolist()) == [6, 6, 6]
    other, _ = _task(base + ["data.subset_seed=5"])
    assert other.build_dataset("train").indices != a.indices
    assert a.classes == ["c0", "c1", "c2"]
    x, y = a[0]
    assert x.shape == (1, 12, 12)  # grey, at the data's 12 px (img_size 0)
    with pytest.raises(ValueError, match="labels_per_class=7: class 0"):
        _task([f"data.root={root}", "data.labels_per_class=7"])[0].build_dataset("train")


@pytest.mark.parametrize("task_name", ["video_classify", "audio_classify", "image_classify"])
def test_label_budget_on_every_classify_task(task_name):
    smoke = TASKS.get(task_name).smoke_config()
    over = [f"task={task_name}", "data.labels_per_class=1", *(f"{k}={v}" for k, v in smoke.items())]
    task = TASKS.get(task_name)(load_config(None, over))
    labels = dataset_labels(task.build_dataset("train"))
    assert sorted(labels) == list(range(task.num_classes()))  # exactly one per class


def test_label_budget_refuses_streamed_shards(tmp_path):
    src = _grey_folder(tmp_path / "src", per_class=4)
    _pack(src, tmp_path / "sh")
    task, _ = _task([f"data.root={tmp_path / 'sh'}", "data.labels_per_class=2"])
    with pytest.raises(ValueError, match="streamed"):
        task.build_dataset("train")


# ------------------------------------------------------------------------------ grey images
def test_grey_to_rgb_is_not_counted_but_lossy_conversions_are():
    counter = BadSampleCounter()
    grey = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16), mode="L")
    buf = io.BytesIO()
    grey.save(buf, format="PNG")
    img = decode_image(buf.getvalue(), "g.png", counter=counter)
    a = np.asarray(img)
    assert img.mode == "RGB" and (a[..., 0] == a[..., 2]).all()
    snap = counter.snapshot()
    assert snap["converted/total"] == 0 and "converted/gray" not in snap
    cmyk = io.BytesIO()
    grey.convert("CMYK").save(cmyk, format="JPEG")
    decode_image(cmyk.getvalue(), "c.jpg", counter=counter)
    assert counter.snapshot()["converted/cmyk"] == 1


def test_in_chans_1_reads_grey_and_counts_only_colour_files(tmp_path):
    root = _grey_folder(tmp_path / "d", per_class=2)
    COUNTER.reset()
    task, _ = _task([f"data.root={root}", f"data.val_root={root}"])
    for split in ("train", "val"):
        ds = task.build_dataset(split)
        xs = [ds[i][0] for i in range(len(ds))]
        assert all(x.shape == (1, 12, 12) for x in xs), split
    assert COUNTER.snapshot()["converted/total"] == 0
    # a colour file among grey ones (the check peeks at one file only) is greyed and counted
    (root / "c1" / "00.png").unlink()
    a = np.random.default_rng(1).integers(0, 255, (12, 12, 3), dtype=np.uint8)
    Image.fromarray(a, mode="RGB").save(root / "c1" / "00.png")
    ds = _task([f"data.root={root}", "data.repeat=1"])[0].build_dataset("train")
    COUNTER.reset()
    xs = [ds[i][0] for i in range(len(ds))]
    assert all(x.shape == (1, 12, 12) for x in xs)
    assert COUNTER.snapshot()["converted/color_to_gray"] == 1
    COUNTER.reset()


def test_grey_images_to_an_rgb_model_are_three_equal_channels_uncounted(tmp_path):
    root = _grey_folder(tmp_path / "d", per_class=2)
    COUNTER.reset()
    task, _ = _task([f"data.root={root}", "model.tokenizer_args.in_chans=3"])
    x = task.build_dataset("train")[0][0]
    assert x.shape == (3, 12, 12) and torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    assert COUNTER.snapshot()["converted/total"] == 0


def test_grey_shards_with_in_chans_1(tmp_path):
    src = _grey_folder(tmp_path / "src", per_class=4)
    _pack(src, tmp_path / "sh")
    cfg = load_config("small/pretrain", [f"data.root={tmp_path / 'sh'}", "data.num_workers=0"])
    ds = TASKS.get(cfg.task)(cfg).build_dataset("train")
    x, y = next(iter(ds))
    assert x.shape == (1, 12, 12) and 0 <= y < 3


# ------------------------------------------------------------------- config-time shape checks
@pytest.mark.parametrize(
    "overrides, match",
    [
        (
            ["model.tokenizer_args.patch_size=6"],
            r"img_size=20 is not a multiple of the patch size 6",
        ),
        (["data.num_classes=2"], r"data.num_classes=2 \(command line\) but data.root holds 3 "),
        (["model.name=nepa_audio_debug"], r"'audio' tokenizer"),
        (["data.aug.mean=[0.4,0.5,0.6]"], r"data.aug.mean has 3 values .* in_chans=1"),
        (["model.tokenizer_args.in_chans=2"], r"in_chans=2"),
        (["data.labels_per_class=-1"], r"labels_per_class=-1"),
    ],
)
def test_shape_mistakes_fail_at_config_time(tmp_path, overrides, match):
    root = _grey_folder(tmp_path / "d")
    given = ["data.aug.img_size=20", "model.tokenizer_args.in_chans=1"]  # set, not "as the data"
    with pytest.raises(ConfigError, match=match):
        load_config("small/finetune", [f"data.root={root}", *given, *overrides])


def test_colour_data_with_in_chans_1_is_refused(tmp_path):
    root = _grey_folder(tmp_path / "d", colour_file=True)
    (root / "c0" / "00.png").unlink()  # so the colour file is the first one looked at
    for n in range(1, 6):
        (root / "c0" / f"{n:02d}.png").unlink()
    with pytest.raises(ConfigError, match=r"zz_colour.png is a colour \(RGB\) image"):
        load_config("small/pretrain", [f"data.root={root}", "model.tokenizer_args.in_chans=1"])
    load_config("small/pretrain", [f"data.root={root}", "model.tokenizer_args.in_chans=3",
                                   "data.aug.mean=[0.5]", "data.aug.std=[0.5]"])  # fmt: skip


def test_shape_mistake_exits_2_in_one_line_before_any_folder(tmp_path, capsys):
    root = _grey_folder(tmp_path / "d")
    run = tmp_path / "run"
    for extra in ([], ["--print-config"]):
        rc = main(["fit", "small/pretrain", f"data.root={root}", f"run_dir={run}",
                   "data.aug.img_size=20", "model.tokenizer_args.patch_size=3", *extra])  # fmt: skip
        err = capsys.readouterr().err
        assert rc == 2 and len(err.strip().splitlines()) == 1 and "patch size 3" in err
        assert not run.exists()


def test_a_recipe_that_reads_its_shape_from_the_data_needs_data_root(tmp_path, capsys):
    run = tmp_path / "run"
    for config in ("small/pretrain", "image/small_finetune"):
        rc = main(["fit", config, f"run_dir={run}"])
        err = capsys.readouterr().err
        assert rc == 2 and len(err.strip().splitlines()) == 1, err
        assert "data.root is empty" in err and "data.aug.img_size" in err
        assert not run.exists()
    assert main(["fit", "small/pretrain", "--print-config"]) == 0  # printing needs no data


def test_a_folder_without_images_is_refused(tmp_path):
    (tmp_path / "d" / "a").mkdir(parents=True)
    (tmp_path / "d" / "a" / "x.wav").write_bytes(b"RIFF")
    with pytest.raises(ConfigError, match="holds no image files"):
        load_config("small/pretrain", [f"data.root={tmp_path / 'd'}"])


def test_other_tasks_check_their_shapes():
    with pytest.raises(ConfigError, match="not a multiple of the patch size 4"):
        load_config(None, ["task=video_pretrain", "model.name=nepa_video_debug",
                           "data.image_size=10"])  # fmt: skip
    with pytest.raises(ConfigError, match="num_frames=5 is not a multiple of the tubelet"):
        load_config(None, ["task=video_pretrain", "model.name=nepa_video_debug",
                           "data.image_size=8", "data.num_frames=5"])  # fmt: skip
    with pytest.raises(ConfigError, match="'image' tokenizer but this task reads audio"):
        load_config(None, ["task=audio_pretrain", "model.name=nepa_debug"])
    with pytest.raises(ConfigError, match="n_mels=30 is not a multiple"):
        load_config(None, ["task=audio_pretrain", "model.name=nepa_audio_debug",
                           "model.tokenizer_args.n_mels=30"])  # fmt: skip
    with pytest.raises(ConfigError, match="Fashion-MNIST images are grey"):
        load_config(None, ["task=fmnist_classify", "model.tokenizer_args.patch_size=7"])


def test_val_folder_with_more_classes_than_the_model_is_refused(tmp_path):
    root = _grey_folder(tmp_path / "d", classes=2)
    val = _grey_folder(tmp_path / "v", classes=3)
    with pytest.raises(ConfigError, match="data.val_root holds 3 classes but the model has 2"):
        load_config("small/finetune", [f"data.root={root}", f"data.val_root={val}"])


def test_num_classes_comes_from_the_class_folders(tmp_path):
    root = _grey_folder(tmp_path / "d", classes=4)
    task, cfg = _task([f"data.root={root}"])
    # read once, at config time, and written where every part of the run reads it
    assert cfg.data.num_classes == 4 and task.num_classes() == 4
    assert source_of(cfg, "data.num_classes") == "from data.root"
    assert task.build_model().head.classifier.out_features == 4


def test_small_recipes_load_with_their_documented_shapes():
    for name in ("small/pretrain", "small/pretrain_patch", "small/finetune", "small/probe"):
        cfg = load_config(name, check_paths=False)
        # size and channels "as the data" (0), one mean/std value that serves 1 or 3 channels
        assert cfg.data.aug.img_size == 0 and cfg.model.tokenizer_args["in_chans"] == 0
        assert cfg.data.aug.mean == [0.5] and cfg.data.aug.std == [0.5]
        assert cfg.data.aug.auto_augment is None and cfg.data.aug.reprob == 0
        assert cfg.data.aug.eval_crop_pct == 1.0
    # small/pretrain is next-embedding prediction (stop-gradient, shift; the cosine until the data
    # are read) with the rest chosen from the data (tests/test_auto.py); small/pretrain_patch the
    # pixels
    pre = build_model_config(load_config("small/pretrain", check_paths=False).model).objective
    assert (pre.target, pre.loss, pre.stop_grad, pre.shift) == ("embedding", "cosine", True, True)
    assert pre.auto
    patch = load_config("small/pretrain_patch", check_paths=False).model
    assert build_model_config(patch).objective.target == "patch"
    ft = load_config("small/finetune", check_paths=False)
    assert ft.optim.freeze == [] and ft.data.aug.mixup == 0 and ft.data.aug.cutmix == 0
    # the frozen protocols of small/probe read a 3 x 3 grid of token means and cross-validate
    # the linear probe's lr on the training labels (docs/small-data.md)
    probe = load_config("small/probe", check_paths=False)
    assert probe.eval_defaults == {"features": {"pool": "grid", "grid": 3},
                                   "linear": {"lr_grid": [3e-4, 1e-3, 3e-3, 1e-2]}}  # fmt: skip


# ------------------------------------------------------------------ --help and model.init
def test_fit_config_help_lists_the_task_keys(capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "small/finetune", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "task image_classify" in out
    lines = {ln.split()[0]: ln for ln in out.splitlines()[1:]}
    assert (
        "int = 224" in lines["data.aug.img_size"] and "this recipe: 0" in lines["data.aug.img_size"]
    )
    assert "int = 0" in lines["data.labels_per_class"]
    assert "str = 'finetune'" in lines["data.mode"] and "trainer.threads" in lines
    with pytest.raises(SystemExit):
        main(["eval", "small/probe", "--help"])
    assert "data.mode" in capsys.readouterr().out


def test_model_init_reports_what_it_loaded(tmp_path, capsys):
    from unipred.nn.model import NEPA, model_config
    from unipred.train.checkpoint import load_backbone

    src = NEPA(model_config("nepa_debug", head=None)).state_dict()
    model = NEPA(model_config("nepa_debug", head="mean", num_classes=3))
    load_backbone(model, src, "pre.ckpt")
    out = capsys.readouterr().out
    n_new = sum(1 for k in model.state_dict() if k not in src)
    assert f"model.init: loaded pre.ckpt: {len(src)} tensors matched, {n_new} new" in out
    assert "head.classifier.*" in out


def test_frozen_protocols_read_only_the_label_budget(tmp_path):
    """``unipred eval protocol=knn|linear data.labels_per_class=K`` fits on K per class (the
    same images as fine-tuning with that budget, once each), and scores every val image."""
    from unipred.protocols import FeatureSettings, _loader

    root = _grey_folder(tmp_path / "d", per_class=6)
    val = _grey_folder(tmp_path / "v", per_class=4)
    over = [f"data.root={root}", f"data.val_root={val}", "data.num_workers=0"]
    task, _ = _task([*over, "data.labels_per_class=2", "data.repeat=5"], config="small/probe")
    train = _loader(task, "train", FeatureSettings(batch=64), 0)
    ys = torch.cat([b[1] for b in train])
    assert sorted(ys.tolist()) == [0, 0, 1, 1, 2, 2]  # 2 per class, not repeated
    assert train.dataset.indices == task.build_dataset("train").indices[:6]
    assert len(_loader(task, "val", FeatureSettings(), 0).dataset) == 12
    every, _ = _task(over, config="small/probe")
    assert len(_loader(every, "train", FeatureSettings(), 0).dataset) == 18


# ------------------------------------------------------------------- sizes from the data
def _colour_folder(root, size):
    rng = np.random.default_rng(1)
    for c in range(2):
        (root / f"k{c}").mkdir(parents=True)
        for i in range(3):
            a = rng.integers(0, 255, (size, size + 2, 3), dtype=np.uint8)
            Image.fromarray(a, mode="RGB").save(root / f"k{c}" / f"{i}.png")
    return root


@pytest.mark.parametrize("config", ["small/pretrain", "small/finetune"])
def test_size_and_channels_zero_come_from_the_data(tmp_path, config):
    zero = ["data.aug.img_size=0", "model.tokenizer_args.in_chans=0", "data.num_workers=0"]
    zero += ["data.labels_per_class=0"] if config == "small/finetune" else []
    grey = _grey_folder(tmp_path / "g", size=13)  # 13 px, patch 4: nearest multiple 12
    cfg = load_config(config, [f"data.root={grey}", *zero])
    assert cfg.data.aug.img_size == 12 and cfg.model.tokenizer_args["in_chans"] == 1
    colour = _colour_folder(tmp_path / "c", size=22)  # 22 x 24: the longer side, 24
    cfg = load_config(config, [f"data.root={colour}", *zero])
    assert cfg.data.aug.img_size == 24 and cfg.model.tokenizer_args["in_chans"] == 3
    task = TASKS.get(cfg.task)(cfg)
    x, _ = task.build_dataset("train")[0]
    assert x.shape == (3, 24, 24)
    assert task.build_model().tokenizer.proj.weight.shape[1] == 3
    # an explicit value is kept (and checked against the data as before)
    cfg = load_config(config, [f"data.root={grey}", "data.aug.img_size=16"])
    assert cfg.data.aug.img_size == 16


def test_size_from_the_data_without_data_is_one_clear_line(tmp_path):
    zero = ["data.aug.img_size=0", "model.tokenizer_args.in_chans=0"]
    with pytest.raises(ConfigError, match=r"data.root is empty: data.aug.img_size and"):
        load_config("small/pretrain", zero)  # a run needs the data to read the shape from
    cfg = load_config("small/pretrain", zero, check_paths=False)  # --help, --print-config ...
    task = TASKS.get(cfg.task)(cfg)
    with pytest.raises(ValueError, match=r"img_size and model.tokenizer_args.in_chans=0 .*data"):
        task.build_model()  # ... but nothing is built on it
    (tmp_path / "empty.tar").write_bytes(b"")  # a shard first_image cannot read
    with pytest.raises(ConfigError, match=r"in_chans=0 \(from the data\): no local image .*set"):
        load_config("small/pretrain", [f"data.root={tmp_path / 'empty.tar'}", zero[0]])


def test_frozen_protocols_load_a_backbone_pretrained_with_an_objective_head(tmp_path):
    """A pixel-target (or MLP-head) pretraining has parameters of its own (``objective.*``):
    ``unipred eval protocol=knn|linear`` drops them like ``model.init=pretrain:`` does."""
    from unipred.nn.model import NEPA, model_config
    from unipred.nn.objectives import ObjectiveConfig
    from unipred.protocols import load_backbone_weights, weight_sets

    pre = NEPA(model_config("nepa_debug", head=None, objective=ObjectiveConfig(target="patch")))
    assert any(k.startswith("objective.") for k in pre.state_dict())
    pre.save_pretrained(tmp_path / "pre")
    ((name, sd),) = weight_sets(str(tmp_path / "pre"), "false")
    clf = NEPA(model_config("nepa_debug", head="probe", num_classes=3))
    load_backbone_weights(clf, sd, "pre")
    assert torch.equal(clf.tokenizer.proj.weight, pre.tokenizer.proj.weight)


def test_a_size_read_from_the_data_that_the_patch_changes_is_announced(tmp_path, caplog):
    root = _grey_folder(tmp_path / "d", size=16)
    with caplog.at_level("WARNING"):
        cfg = load_config("small/pretrain", [f"data.root={root}"])  # patch 4 divides 16
    assert cfg.data.aug.img_size == 16 and "resized" not in caplog.text
    with caplog.at_level("WARNING"):
        cfg = load_config(
            "small/pretrain", [f"data.root={root}", "model.tokenizer_args.patch_size=3"]
        )
    assert cfg.data.aug.img_size == 15
    assert "is 16x16 and the patch is 3, so images are resized to 15 px" in caplog.text
