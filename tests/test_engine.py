"""The engine end to end on tiny generated-image runs (CPU, a few steps each)."""

import json
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from unipred.task import collapse_stats
from unipred.train import optim
from unipred.train.callbacks import CollapseMonitor, NonFiniteLossError
from unipred.train.checkpoint import CheckpointError, apply_init, load_weights, read_checkpoint
from unipred.train.config import load_config
from unipred.train.engine import LitTask, evaluate, fit

TINY = Path(__file__).resolve().parents[1] / "configs/debug/image_nepa_tiny.yaml"


def tiny(tmp_path, *over):
    base = [
        f"run_dir={tmp_path}",
        "trainer.progress_bar=false",
        "trainer.loggers=[csv]",
        "data.image_size=16",
        "data.train_samples=32",
        "data.val_samples=8",
        "trainer.global_batch=8",
        "model.predictor.rope_rescale=0",
        "trainer.log_every_n_steps=1",
    ]
    return load_config(TINY, base + list(over))


def _weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.lightning_module.model.state_dict().items()}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """One tiny pretraining run shared by the tests that only read its outputs."""
    tmp_path = tmp_path_factory.mktemp("pretrain")
    cfg = tiny(
        tmp_path,
        "trainer.ckpt_every_n_steps=2",
        "ema.decay=0.5",
        "trainer.collapse_every_n_steps=2",
    )
    return tmp_path, fit(cfg)


def test_fit_writes_recipe_checkpoints_and_ema(pretrained):
    tmp_path, trainer = pretrained
    assert trainer.global_step == 4
    recipe = json.loads((tmp_path / "recipe.json").read_text())
    assert recipe["global_batch"] == 8 and recipe["total_steps"] == 4
    assert recipe["lr"] == pytest.approx(3e-2 * 8 / 256)
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["last.ckpt", "step00000002.ckpt", "step00000004.ckpt"]
    ck = read_checkpoint(tmp_path / "checkpoints/last.ckpt", require_training_state=True)
    raw = {k[6:]: v for k, v in ck["state_dict"].items()}
    ema = ck["ema_state_dict"]
    assert set(ema) == set(raw) and int(ck["ema_n_averaged"]) == 4
    assert not torch.equal(ema["cls_token"], raw["cls_token"])  # averaged, not a copy
    metrics = (next((tmp_path / "logs").rglob("metrics.csv"))).read_text()
    assert "val/loss" in metrics and "val_ema/loss" in metrics and "train/loss" in metrics
    ema_cb = next(cb for cb in trainer.callbacks if type(cb).__name__ == "EMA")
    assert not ema_cb.module.training  # validated in eval mode (no drop path / RoPE jitter)
    # the module keeps the raw weights at the end (the EMA lives in the checkpoint)
    assert torch.equal(trainer.lightning_module.model.cls_token.detach(), raw["cls_token"])


def test_accumulation_gives_the_same_weights_as_one_big_batch(tmp_path):
    a = fit(tiny(tmp_path / "a", "trainer.per_device_batch=4", "ema.enabled=false"))
    assert a.accumulate_grad_batches == 2
    b = fit(tiny(tmp_path / "b", "ema.enabled=false"))
    assert b.accumulate_grad_batches == 1
    wa, wb = _weights(a), _weights(b)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)


def test_classify_task_logs_raw_and_ema_accuracy_and_eval(tmp_path, capsys):
    cfg = tiny(tmp_path, "task=debug_image_classify", "optim.blr=1e-2", "ema.decay=0.5")
    fit(cfg)
    metrics = next((tmp_path / "logs").rglob("metrics.csv")).read_text()
    for key in ("val/acc1", "val/acc5", "val_ema/acc1", "val_ema/acc5"):
        assert key in metrics
    assert (tmp_path / "best/best.ckpt").exists()  # selected by val_ema/acc1
    ecfg = tiny(tmp_path, "task=debug_image_classify", f"ckpt={tmp_path}/checkpoints/last.ckpt")
    res = evaluate(ecfg)
    assert {"val/acc1", "val_ema/acc1", "val/loss", "val_ema/loss"} <= set(res)
    assert 0.0 <= res["val/acc1"] <= 1.0


def test_non_finite_loss_stops_naming_the_step(tmp_path):
    class Poison(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                with torch.no_grad():
                    pl_module.model.cls_token.fill_(float("nan"))

    cfg = tiny(tmp_path, "trainer.ckpt_every_n_steps=2")
    with pytest.raises(NonFiniteLossError, match="step 3"):
        fit(cfg, callbacks=[Poison()])
    ck = read_checkpoint(tmp_path / "checkpoints/last.ckpt", require_training_state=True)
    assert ck["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in ck["state_dict"].values())


def test_collapse_stats_and_warning():
    torch.manual_seed(0)
    healthy = collapse_stats(torch.randn(2, 64, 32))
    collapsed = collapse_stats(torch.randn(2, 64, 1) * torch.ones(1, 1, 32))
    assert healthy["erank"] > 20 and collapsed["erank"] < 1.5
    mon = CollapseMonitor(10, dim=32)

    class T:  # the parts of a Lightning Trainer the monitor reads
        global_step, is_global_zero, loggers = 10, True, []

    with pytest.warns(UserWarning, match="collapsing"):
        mon.on_train_batch_end(
            T(), None, {"logs": {f"collapse/{k}": v for k, v in collapsed.items()}}, None, 0
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mon.on_train_batch_end(
            T(), None, {"logs": {f"collapse/{k}": v for k, v in healthy.items()}}, None, 0
        )


def test_collapse_stats_are_logged_during_pretraining(pretrained):
    tmp_path, _ = pretrained
    metrics = next((tmp_path / "logs").rglob("metrics.csv")).read_text()
    assert "train/collapse/erank" in metrics and "train/collapse/std_min" in metrics


def test_bad_checkpoints_name_the_file_and_key(pretrained, tmp_path):
    last = pretrained[0] / "checkpoints/last.ckpt"
    bad = tmp_path / "truncated.ckpt"
    bad.write_bytes(last.read_bytes()[:1000])
    model = LitTask(tiny(tmp_path)).model
    with pytest.raises(CheckpointError, match="truncated.ckpt"):
        load_weights(model, bad)
    other = LitTask(tiny(tmp_path, "model.predictor.depth=3")).model
    with pytest.raises(CheckpointError, match=r"last.ckpt: missing key 'predictor.blocks.2"):
        load_weights(other, last)
    wide = LitTask(tiny(tmp_path, "model.predictor.dim=32")).model
    with pytest.raises(CheckpointError, match=r"last.ckpt: key 'cls_token' has shape"):
        load_weights(wide, last)


def test_pretrain_to_classifier_init(pretrained, tmp_path):
    last = pretrained[0] / "checkpoints/last.ckpt"
    cls = LitTask(tiny(tmp_path, "task=debug_image_classify")).model
    apply_init(cls, f"pretrain:{last}:ema")
    ema = read_checkpoint(last)["ema_state_dict"]
    assert torch.equal(cls.cls_token, ema["cls_token"])
    assert torch.equal(
        cls.predictor.blocks[1].mlp.fc2.weight, ema["predictor.blocks.1.mlp.fc2.weight"]
    )
    assert cls.head.classifier.weight.abs().sum() == 0 and cls.head.classifier.bias.abs().sum() == 0
    # through the config: model.init is applied when the LightningModule is built
    lit = LitTask(tiny(tmp_path, "task=debug_image_classify", f"model.init=pretrain:{last}"))
    raw = read_checkpoint(last)["state_dict"]
    assert torch.equal(lit.model.cls_token, raw["model.cls_token"])


def test_gradient_clipping_caps_the_global_norm(tmp_path):
    lit = LitTask(tiny(tmp_path, "optim.grad_clip=1.0"))
    for p in lit.model.parameters():
        p.grad = torch.full_like(p, 10.0)
    lit.configure_gradient_clipping(None)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in lit.model.parameters()]))
    assert norm == pytest.approx(1.0, rel=1e-4)


def test_official_init_copies_the_backbone(tmp_path):
    from unipred.nn.model import NEPA
    from unipred.weights.hub import save_official_nepa

    src = NEPA.from_name("nepa_debug")  # pretraining layout: no head, no affine QK-norm
    folder = save_official_nepa(src, tmp_path / "official", image_size=16)
    cls = LitTask(tiny(tmp_path, "task=debug_image_classify", f"model.init=official:{folder}"))
    m = cls.model
    assert torch.equal(m.cls_token, src.cls_token)
    assert torch.equal(
        m.predictor.blocks[0].attn.qkv.weight, src.predictor.blocks[0].attn.qkv.weight
    )
    assert m.head.classifier.weight.abs().sum() == 0


def test_speed_switches_are_safe_on_cpu(tmp_path):
    cfg = tiny(
        tmp_path,
        "trainer.precision=bf16-mixed",
        "trainer.activation_checkpointing=true",
        "trainer.channels_last=true",
        "trainer.fast_dev_run=2",
    )
    trainer = fit(cfg)
    assert trainer.lightning_module.model.predictor.grad_checkpointing
    assert trainer.global_step == 2


def test_eval_command(pretrained, capsys):
    from unipred.cli import main

    tmp_path, _ = pretrained
    args = [
        "eval",
        str(TINY),
        f"ckpt={tmp_path}/checkpoints/last.ckpt",
        f"run_dir={tmp_path}/ev",
        "data.image_size=16",
        "data.val_samples=8",
        "trainer.progress_bar=false",
        "trainer.loggers=[]",
        "model.predictor.rope_rescale=0",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "val/loss:" in out and "val_ema/loss:" in out


def test_classify_loss_soft_and_hard_targets(tmp_path):
    from unipred.tasks.image.debug import DebugImageClassify

    task = DebugImageClassify(tiny(tmp_path, "task=debug_image_classify"))
    logits = torch.randn(6, 4, dtype=torch.bfloat16)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    hard = task.loss(logits, y)
    soft = task.loss(logits, torch.nn.functional.one_hot(y, 4).float())
    assert hard.dtype == torch.float32 and torch.allclose(hard, soft)
    task.cfg.data.label_smoothing = 0.1
    ref = torch.nn.functional.cross_entropy(logits.float(), y, label_smoothing=0.1)
    assert torch.allclose(task.loss(logits, y), ref)


def test_cli_names_missing_plugin_modules(capsys):
    from unipred.cli import main

    assert main(["demo", "no_such_demo"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'demo no_such_demo'" in err and "'demo image'" in err
    assert main(["frobnicate"]) == 2


def test_max_steps_runs_across_epochs(tmp_path):
    trainer = fit(tiny(tmp_path, "trainer.max_steps=6", "ema.enabled=false"))  # 4 steps/epoch
    assert trainer.global_step == 6 and trainer.current_epoch >= 1
    assert json.loads((tmp_path / "recipe.json").read_text())["total_steps"] == 6


@pytest.mark.slow  # the full debug recipe: 32 steps, about 35 s on a loaded 2-core box
def test_debug_config_runs_from_the_command_line(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "unipred.cli",
            "fit",
            str(TINY),
            f"run_dir={tmp_path}",
            "trainer.progress_bar=false",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "PYTHONSAFEPATH": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "total_steps             32" in proc.stdout
    assert (tmp_path / "checkpoints/last.ckpt").exists()


def test_lars_trains_through_the_engine(tmp_path):
    cfg = tiny(tmp_path, "optim.name=lars", "optim.blr=0.1", "trainer.max_steps=3",
               "ema.enabled=false", "trainer.ckpt_every_n_steps=0")  # fmt: skip
    trainer = fit(cfg)
    opt = trainer.optimizers[0]
    assert isinstance(opt, optim.LARS) and trainer.global_step == 3
    assert opt.param_groups[0]["initial_lr"] == pytest.approx(0.1 * 8 / 256)
    assert all(opt.state[p]["momentum_buffer"].abs().sum() > 0
               for g in opt.param_groups for p in g["params"] if p.grad is not None)  # fmt: skip


def test_training_steps_read_nothing_back_from_the_device(tmp_path, monkeypatch):
    """A training step (fused AdamW, EMA, progress bar, non-finite check) must not copy a
    value to the host: on a GPU each such read waits for all queued work, so the CPU cannot
    queue the next kernels ahead. Reads by the data pipeline (CPU tensors) do not count."""
    import traceback

    reads, counting = [], [False]
    for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
        orig = getattr(torch.Tensor, name)

        def spy(self, *a, _orig=orig, _name=name, **k):
            if counting[0]:
                stack = traceback.extract_stack(limit=14)[:-1]
                if not any("torch/utils/data" in f.filename for f in stack):
                    reads.append((_name, stack[-1].filename, stack[-1].lineno))
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)

    class Window(L.Callback):  # steps 2..9 (with every callback's end-of-step hook), away
        def on_train_batch_start(self, trainer, *_):  # from every logging cadence
            counting[0] = 2 <= trainer.global_step < 10

        def on_train_end(self, trainer, *_):
            counting[0] = False

    cfg = tiny(tmp_path, "trainer.progress_bar=true", "trainer.log_every_n_steps=50",
               "trainer.collapse_every_n_steps=0", "trainer.ckpt_every_n_steps=0",
               "data.train_samples=96", "ema.enabled=true")  # fmt: skip
    trainer = fit(cfg, callbacks=[Window()])
    assert trainer.global_step == 12
    assert reads == [], reads


def test_a_transient_non_finite_loss_is_skipped_on_the_device_then_reported(tmp_path):
    """Fused AdamW: the bad step is skipped without a host sync (weights, moments unchanged)
    and the run stops at the next check, naming that step; the last checkpoint is good."""
    seen = {}

    class NaNBatch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                batch[0].fill_(float("nan"))
                seen["before"] = _weights(trainer)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 4:
                seen["after"] = _weights(trainer)

    cfg = tiny(tmp_path, "trainer.log_every_n_steps=5", "trainer.ckpt_every_n_steps=2",
               "data.train_samples=64", "ema.enabled=false")  # fmt: skip
    with pytest.raises(
        NonFiniteLossError, match="optimizer step 3 .*no update from it was applied"
    ):
        fit(cfg, callbacks=[NaNBatch()])
    assert set(seen) == {"before", "after"}  # the run went on past the bad step
    for k, v in seen["before"].items():
        assert torch.equal(v, seen["after"][k]), k
    ck = read_checkpoint(tmp_path / "checkpoints/last.ckpt", require_training_state=True)
    assert ck["global_step"] == 2  # the save at step 4 ran the check first, and stopped


def test_ema_update_equals_torch_averaged_model():
    """The engine's sync-free EMA update gives exactly AveragedModel.update_parameters."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from unipred.train.callbacks import EMA

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    ref = AveragedModel(model, use_buffers=True, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    ema = EMA(decay=0.9)
    ema._average_model = AveragedModel(model, use_buffers=True,
                                       multi_avg_fn=get_ema_multi_avg_fn(0.9))  # fmt: skip
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(5, 4))  # moves the BatchNorm running statistics
        ref.update_parameters(model)
        ema._update(model)
    assert int(ema._average_model.n_averaged) == int(ref.n_averaged) == 4
    for a, b in zip(ema._average_model.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)
