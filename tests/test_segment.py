"""Segmentation is written once (unipred.task.segment) and works for every tokenizer: tokens are laid
on the grid their coordinates span, whatever the tokenizer, and the shipped tasks learn on an
image source (2-D labels), an audio source (labels over time only) and a video source (labels
per pixel of every frame); ADE20K's UperNet decoder runs through the same objective."""

import pytest
import torch

from unipred import NEPA, TASKS
from unipred.task.segment import (
    LinearSegmenter,
    SegmentOutput,
    SegmentTask,
    check_labels,
    grid_cells,
    resize_to,
    segment_loss,
    tokens_to_grid,
)
from unipred.train.config import load_config
from unipred.train.engine import fit


def _cfg(task: str, *over: str):
    smoke = TASKS.get(task).smoke_config()
    args = [f"task={task}", *(f"{k}={v}" for k, v in smoke.items()), "trainer.accelerator=cpu"]
    return load_config(None, [*args, *over])


def test_image_tokens_land_on_their_patch_grid():
    model = NEPA.from_name("nepa_debug")
    x = torch.randn(2, 3, 24, 32)  # 6 x 8 patches of 4 px
    tk = model.tokenizer(x)
    vals = torch.randn(2, tk.tokens.shape[1], 5)
    grid = tokens_to_grid(vals, tk.coords)
    assert grid.shape == (2, 5, 6, 8)
    torch.testing.assert_close(grid, vals.transpose(1, 2).reshape(2, 5, 6, 8))
    # the cells computed once serve every batch with these coordinates
    cells = grid_cells(tk.coords)
    torch.testing.assert_close(tokens_to_grid(vals, tk.coords, cells=cells), grid)


def test_dropped_axes_are_averaged_and_padding_is_left_out():
    # (time, frequency) tokens, time-major: 3 steps x 2 bands; sample 1 has 2 real steps
    t = torch.tensor([-0.5, 0.0, 0.5]).repeat_interleave(2)
    f = torch.tensor([-0.5, 0.5]).repeat(3)
    coords = torch.stack([t, f], dim=-1)
    vals = torch.arange(12.0).reshape(2, 6, 1)
    valid = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    grid = tokens_to_grid(vals, coords, valid, axes=(0,))
    assert grid.shape == (2, 1, 3)
    assert grid[0, 0].tolist() == [0.5, 2.5, 4.5]  # the two bands of each step averaged
    assert grid[1, 0].tolist() == [6.5, 8.5, 0.0]  # padded step: no token, no value
    freq_only = tokens_to_grid(vals, coords, None, axes=(1,))
    assert freq_only[0, 0].tolist() == [2.0, 3.0]


def test_grid_and_label_axes_must_agree():
    with pytest.raises(ValueError, match="label_axes"):
        resize_to(torch.zeros(1, 3, 4, 4), (16,))
    with pytest.raises(ValueError, match="label_axes=\\(2,\\)"):
        tokens_to_grid(torch.zeros(1, 4, 3), torch.zeros(4, 2), axes=(2,))


def test_loss_ignores_positions_and_adds_the_aux_head():
    logits = torch.zeros(1, 3, 2, 2, requires_grad=True)
    labels = torch.tensor([[[0, 255], [255, 255]]])  # one labelled position
    loss, logs = segment_loss(SegmentOutput(logits), labels, 255)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(3.0)).item())
    aux = SegmentOutput(logits, torch.zeros(1, 3, 2, 2), aux_weight=0.5)
    loss2, logs2 = segment_loss(aux, labels, 255)
    assert loss2.item() == pytest.approx(1.5 * loss.item()) and "loss_aux" in logs2


def test_a_pretrained_backbone_loads_and_the_probe_trains_the_decoder_alone():
    cfg = _cfg("debug_image_segment", "data.mode=probe")
    task = TASKS.get("debug_image_segment")(cfg)
    assert isinstance(task, SegmentTask) and task.num_classes() == 5  # background + 4 shapes
    model = task.build_model()
    assert isinstance(model, LinearSegmenter)
    backbone = NEPA(task.model_config(head="none")).state_dict()
    missing, unexpected = model.load_state_dict(backbone, strict=False)
    assert not unexpected and missing and all(k.startswith("head.") for k in missing)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("head.") for n in trainable)
    x, y = torch.utils.data.default_collate([task.build_dataset("train")[i] for i in range(2)])
    assert x.shape == (2, 3, 32, 32) and y.shape == (2, 32, 32) and int(y.max()) <= 4
    model.train()
    loss, _ = task.training_step(model, (x, y))
    assert not model.predictor.training  # the frozen backbone runs in eval mode
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("head."))


def test_upernet_needs_an_image_backbone_and_says_so():
    from unipred.train.config import ConfigError

    for task in ("audio_events_segment", "video_segment"):
        with pytest.raises(ConfigError, match="needs the image tokenizer.*data.decoder=linear"):
            _cfg(task, "data.decoder=upernet")
    # an image source without UperNet settings: four blocks spread over the depth
    model = TASKS.get("debug_image_segment")(_cfg("debug_image_segment", "data.decoder=upernet"))
    assert model.build_model().layers == (0, 0, 1, 1)  # nepa_debug: depth 2


def test_class_count_below_the_labels_is_one_clear_line(tmp_path, capsys):
    from unipred.cli import main
    from unipred.train.config import ConfigError

    with pytest.raises(ConfigError, match="data.num_classes=2 but the data have 5 classes"):
        _cfg("debug_image_segment", "data.num_classes=2")
    labels = torch.tensor([[0, 1, 4, 255]])  # a source that does not report its classes
    with pytest.raises(ValueError, match="class 4 but the model has 3 outputs.*num_classes=5"):
        check_labels(labels, 3, 255)
    # a ValueError while a run is built is one line and exit 2, not a traceback
    run = tmp_path / "run"
    rc = main(["fit", "debug/shapes_segment", "data.labels_per_class=1", f"run_dir={run}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "unknown config key" in err[0]
    rc = main(["fit", "small/finetune", "data.val_root=/nonexistent-but-remote{0..1}.tar",
               "data.aug.img_size=20", "model.tokenizer_args.in_chans=1", "data.num_classes=3",
               f"run_dir={run}", "trainer.accelerator=cpu"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("unipred fit: error: ") and "data.root" in err[-1], err


def test_unknown_decoder_and_classification_protocols_are_refused():
    from unipred.protocols import ProtocolError, need_classification

    with pytest.raises(Exception, match="data.decoder='uper'"):
        _cfg("debug_image_segment", "data.decoder=uper")
    with pytest.raises(ProtocolError, match="not a classification task"):
        need_classification(_cfg("debug_image_segment"), "protocol=knn")


def _majority(task) -> tuple[float, float]:
    """Accuracy and mIoU of always predicting the most frequent class of the validation set."""
    ds = task.build_dataset("val")
    y = torch.cat([ds[i][1].flatten() for i in range(len(ds))])
    y = y[y != task.cfg.data.ignore_index]
    counts = torch.bincount(y, minlength=task.num_classes()).float()
    top = counts.max() / counts.sum()
    return float(top), float(top) / int((counts > 0).sum())  # IoU of the majority class only


LEARNS = {  # task -> overrides: a few seconds of CPU training each
    "debug_image_segment": ["model.name=nepa_debug", "data.train_samples=512",
                            "data.val_samples=64", "trainer.max_epochs=4"],
    "audio_events_segment": ["data.train_samples=512", "data.val_samples=32",
                             "data.seconds=2.0", "trainer.max_epochs=3"],
    "video_segment": ["data.image_size=32", "data.num_frames=4", "data.train_samples=512",
                      "data.val_samples=32", "trainer.max_epochs=3"],
}  # fmt: skip


@pytest.mark.parametrize("task", sorted(LEARNS))
def test_the_generic_task_learns_on_images_audio_and_video(tmp_path, task):
    over = ["trainer.global_batch=16", "optim.lr=2e-3", "model.predictor.causal=false",
            "ema.enabled=false", "trainer.progress_bar=false", f"run_dir={tmp_path}",
            "trainer.precision=32-true", *LEARNS[task]]  # fmt: skip
    cfg = _cfg(task, *over)
    acc0, miou0 = _majority(TASKS.get(task)(cfg))
    trainer = fit(cfg)
    m = trainer.callback_metrics
    acc, miou = float(m["val/aAcc"]), float(m["val/mIoU"])
    # at least a fifth fewer wrong positions than the majority class, and a far better mIoU
    assert 1 - acc < 0.8 * (1 - acc0) and miou > miou0 + 0.1, (task, acc, acc0, miou, miou0)


def test_the_moved_class_count_key_says_where_it_went():
    from unipred.train.config import ConfigError

    with pytest.raises(ConfigError, match="'data.head.num_classes'.* is now 'data.num_classes'"):
        load_config(None, ["task=segment_ade20k", "data.head.num_classes=150"])


def test_batch_size_counts_samples_of_tensor_dict_and_list_batches():
    task = TASKS.get("audio_events_segment")(_cfg("audio_events_segment"))
    batch = task.collate_fn("train")([task.build_dataset("train")[i] for i in range(3)])
    assert isinstance(batch[0], dict) and task.batch_size(batch) == 3
    assert task.batch_size(([torch.zeros(3, 8, 8)] * 5, [torch.zeros(8, 8)] * 5)) == 5
    assert task.batch_size((torch.zeros(4, 3, 8, 8), torch.zeros(4, 8, 8))) == 4


def test_the_task_checks_the_labels_of_its_first_training_batch():
    cfg = _cfg("debug_image_segment")
    cfg.data.num_classes = 3  # past the config checks: the shapes have 5 classes
    task = TASKS.get("debug_image_segment")(cfg)
    model = task.build_model()
    x, y = torch.utils.data.default_collate([task.build_dataset("train")[i] for i in range(4)])
    assert int(y.max()) >= 3
    with pytest.raises(ValueError, match="the model has 3 outputs"):
        task.training_step(model, (x, y))
    ok = y.clamp_max(2)
    task.training_step(model, (x, ok))  # checked once, then no host sync on later steps
    assert task._labels_checked
