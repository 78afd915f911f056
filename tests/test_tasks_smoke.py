"""Every registered task trains for two batches and validates for one, on CPU, through the
engine, with the overrides of its ``smoke_config()`` (see unipred/task.py). A new task gets
this test for free; it must work without any dataset on disk (generated data)."""

import math

import pytest

from unipred.base.registry import TASKS
from unipred.train.config import load_config
from unipred.train.engine import LitTask, fit

ENGINE_SMOKE = {
    "trainer.accelerator": "cpu",
    "trainer.devices": 1,
    "trainer.num_nodes": 1,
    "trainer.strategy": "auto",
    "trainer.precision": "32-true",
    "trainer.fast_dev_run": 2,
    "trainer.per_device_batch": None,
    "trainer.progress_bar": False,
    "trainer.loggers": [],
    "trainer.compile": False,
    "trainer.max_steps": -1,
    "trainer.max_epochs": 1,
    "data.num_workers": 0,
    "data.root": "",
    "data.val_root": "",
    "ema.enabled": True,
    "model.init": "",
    "resume": "",
}


def _dotlist(d: dict) -> list[str]:
    def fmt(v):
        if v is None:
            return "null"
        if v == "":
            return "''"
        if isinstance(v, list):
            return "[" + ",".join(map(str, v)) + "]"
        return str(v)

    return [f"{k}={fmt(v)}" for k, v in d.items()]


@pytest.mark.parametrize("name", TASKS.names())
def test_task_smoke(name, tmp_path):
    task_cls = TASKS.get(name)
    over = {**ENGINE_SMOKE, **task_cls.smoke_config(), "task": name, "run_dir": str(tmp_path)}
    cfg = load_config(None, _dotlist(over))
    losses = []

    import lightning as L

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = fit(cfg, callbacks=[Record()])
    assert trainer.global_step >= 1
    assert losses and all(math.isfinite(v) for v in losses), losses
    assert isinstance(trainer.lightning_module, LitTask)
