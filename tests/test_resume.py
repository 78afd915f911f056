"""Kill a run mid-epoch, resume=auto, and get exactly the uninterrupted run; atomic writes."""

import os
from pathlib import Path

import lightning as L
import pytest
import torch

import unipred.train.checkpoint as ckpt_mod
from unipred.train.checkpoint import atomic_torch_save, find_resume_checkpoint, read_checkpoint
from unipred.train.config import load_config
from unipred.train.engine import fit

TINY = Path(__file__).resolve().parents[1] / "configs/debug/image_nepa_tiny.yaml"


def cfg_for(run_dir, *over):
    # rope rescale and drop path stay on: the resumed run must also restore the RNG state
    base = [
        f"run_dir={run_dir}",
        "trainer.progress_bar=false",
        "trainer.loggers=[]",
        "data.image_size=16",
        "data.train_samples=48",
        "data.val_samples=8",
        "trainer.global_batch=8",
        "trainer.max_epochs=2",
        "trainer.ckpt_every_n_steps=2",
        "model.predictor.drop_path=0.1",
        "ema.decay=0.9",
    ]
    return load_config(TINY, base + list(over))


class Record(L.Callback):
    def __init__(self):
        self.losses = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = outputs["loss"].item()


class Kill(L.Callback):
    def __init__(self, at_step):
        self.at = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            raise RuntimeError("killed")  # stands in for a killed job


def _final(run_dir):
    ck = read_checkpoint(Path(run_dir) / "checkpoints/last.ckpt", require_training_state=True)
    return ck["global_step"], ck["state_dict"], ck["ema_state_dict"]


@pytest.mark.parametrize("kill_at", [9])  # epoch 2 of 2, one step after the step-8 checkpoint
def test_kill_and_resume_equals_uninterrupted(tmp_path, kill_at):
    full = Record()
    fit(cfg_for(tmp_path / "full"), callbacks=[full])
    assert sorted(full.losses) == list(range(1, 13))

    first = Record()
    with pytest.raises(RuntimeError, match="killed"):
        fit(cfg_for(tmp_path / "cut"), callbacks=[first, Kill(kill_at)])
    assert find_resume_checkpoint(tmp_path / "cut").name in ("last.ckpt", "step00000008.ckpt")
    second = Record()
    fit(cfg_for(tmp_path / "cut", "resume=auto"), callbacks=[second])
    assert sorted(second.losses) == list(range(9, 13))  # resumed after step 8

    merged = {**{k: v for k, v in first.losses.items() if k <= 8}, **second.losses}
    assert merged == full.losses  # exactly, not approximately
    step_a, sd_a, ema_a = _final(tmp_path / "full")
    step_b, sd_b, ema_b = _final(tmp_path / "cut")
    assert step_a == step_b == 12
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k
    for k in ema_a:
        assert torch.equal(ema_a[k], ema_b[k]), k


def test_crash_mid_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"state_dict": {"w": torch.ones(3)}}, path)

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", broken_save)
    with pytest.raises(OSError):
        atomic_torch_save({"state_dict": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(read_checkpoint(path)["state_dict"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["last.ckpt"]  # no temporary file left behind


def test_resume_auto_skips_a_corrupt_newest_checkpoint(tmp_path):
    folder = tmp_path / "checkpoints"
    good = {"state_dict": {}, "global_step": 4, "loops": {}, "optimizer_states": []}
    atomic_torch_save(good, folder / "step00000004.ckpt")
    (folder / "last.ckpt").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="last.ckpt"):
        assert find_resume_checkpoint(tmp_path) == folder / "step00000004.ckpt"
    assert find_resume_checkpoint(tmp_path / "empty") is None


# streaming resume with the project's shard readers: tests/test_stream_resume.py


def test_resume_on_another_world_size_skips_the_same_samples():
    from unipred.data.loader import build_loader

    data = list(range(96))
    # 1 rank x batch 8, stopped after 5 global batches (40 samples) ...
    one = build_loader(data, 8, 1, 0, 1, seed=3, train=True, num_workers=0)
    one.sampler.set_epoch(2)
    for _ in range(5):
        one.mark_consumed(2)
    state = one.state_dict()
    seen = [i for _, i in one.sampler][:40]  # the sampler yields (epoch, index) keys
    # ... resumed on 4 ranks x batch 2: the rest of the epoch, no sample repeated or lost
    rest = []
    for r in range(4):
        ld = build_loader(data, 2, 4, r, 1, seed=3, train=True, num_workers=0)
        ld.load_state_dict(state)
        ld.sampler.set_epoch(2)
        rest += [i for _, i in ld.sampler]
    assert sorted(seen + rest) == data


def test_resume_refuses_a_changed_recipe_and_never_overwrites_the_original(tmp_path):
    import json

    from unipred.train.config import RecipeError

    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="killed"):
        fit(cfg_for(run, "trainer.max_epochs=1"), callbacks=[Kill(3)])
    original = (run / "config.yaml").read_text()
    with pytest.raises(RecipeError) as e:
        fit(cfg_for(run, "trainer.max_epochs=2", "optim.blr=0.1", "resume=auto"))
    msg = str(e.value)
    assert "trainer.max_epochs: 1 -> 2" in msg and "optim.blr: 0.03 -> 0.1" in msg
    assert "resume_allow_changes=true" in msg and "\n" not in msg
    # hardware and logging may change freely; a recipe change only when allowed
    fit(cfg_for(run, "trainer.max_epochs=2", "resume=auto", "resume_allow_changes=true",
                "data.num_workers=0", "trainer.log_every_n_steps=3"))  # fmt: skip
    assert (run / "config.yaml").read_text() == original
    records = [json.loads(line) for line in (run / "resumes.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["recipe_changes"] == ["trainer.max_epochs: 1 -> 2"]
    assert records[0]["resumed_from"].endswith(".ckpt")


def test_eval_writes_beside_the_checkpoint_not_into_the_yaml_run_dir(tmp_path, capsys):
    from unipred.cli import main

    run = tmp_path / "train"
    fit(cfg_for(run, "trainer.max_epochs=1"))
    ckpt = run / "checkpoints" / "last.ckpt"
    other = tmp_path / "someone_elses_run"
    args = [f"run_dir={other}", "data.image_size=16", "data.val_samples=8",
            "trainer.loggers=[csv]", "trainer.progress_bar=false"]  # fmt: skip
    assert main(["eval", str(TINY), f"ckpt={ckpt}", *args]) == 0
    out = capsys.readouterr().out
    assert f"logs in {run / 'eval'}" in out and "val/loss:" in out
    assert not other.exists() and (run / "eval").is_dir()


def test_collapse_metrics_are_logged_at_their_own_period_once_each(tmp_path):
    import csv

    # 6 steps per epoch, logging every 25 steps, collapse statistics every 4
    run = tmp_path / "run"
    fit(cfg_for(run, "trainer.loggers=[csv]", "trainer.log_every_n_steps=25",
                "trainer.collapse_every_n_steps=4"))  # fmt: skip
    rows = list(csv.DictReader(open(next(run.glob("logs/version_*/metrics.csv")))))
    steps = [int(r["step"]) for r in rows if r.get("train/collapse/erank")]
    assert steps == [0, 4, 8], steps  # 12 optimizer steps: checked at 0, 4, 8, each once


def test_a_fresh_run_in_a_used_folder_sets_the_earlier_checkpoints_aside(tmp_path):
    """Running the same command again without resume= starts afresh. It overwrote last.ckpt
    but left the earlier run's step checkpoints, and resume=auto then continued the earlier
    run's newest step, not this run. They are moved to earlier-1/ (nothing deleted), in one
    warning line."""
    run = tmp_path / "run"
    fit(cfg_for(run))  # 12 steps: step00000010/12 + last
    old = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt"))
    with pytest.warns(UserWarning, match=r"held an earlier run's checkpoints.*earlier-1"):
        fit(cfg_for(run, "trainer.max_epochs=1"))  # 6 steps
    assert sorted(p.name for p in (run / "earlier-1/checkpoints").glob("*.ckpt")) == old
    assert max(int(p.stem[4:]) for p in (run / "checkpoints").glob("step*.ckpt")) == 6
    found = find_resume_checkpoint(run)
    assert read_checkpoint(found, require_training_state=True)["global_step"] == 6
    # resuming sets nothing aside
    fit(cfg_for(run, "trainer.max_epochs=1", "resume=auto"))
    assert not (run / "earlier-2").exists()
