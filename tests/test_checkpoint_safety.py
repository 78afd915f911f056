"""Checkpoint faults, one line each: unsafe vs damaged decided from the pickle's opcodes (not
torch's wording), resume=auto over damaged, planted, mismatched and special files, malformed
contents, a full disk (a real ENOSPC from /dev/full), NaN weights."""

from __future__ import annotations

import builtins
import os
import pickle
import random
import shutil
import signal
from pathlib import Path

import pytest
import torch

import unipred.train.checkpoint as ckpt_mod
from unipred.train.checkpoint import (
    CheckpointError,
    UnsafeCheckpointError,
    apply_init,
    atomic_torch_save,
    find_resume_checkpoint,
    read_checkpoint,
    safe_load,
)
from unipred.train.config import load_config
from unipred.train.engine import LitTask, fit

TINY = Path(__file__).resolve().parents[1] / "configs/debug/image_nepa_tiny.yaml"
BASE = ["trainer.progress_bar=false", "trainer.loggers=[]", "data.image_size=16",
        "data.train_samples=32", "data.val_samples=0", "trainer.global_batch=8",
        "model.predictor.rope_rescale=0", "trainer.collapse_every_n_steps=0",
        "trainer.ckpt_every_n_steps=2", "trainer.keep_ckpts=4"]  # fmt: skip


def tiny(run_dir, *over):
    return load_config(TINY, [*BASE, f"run_dir={run_dir}", *over])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished tiny pretraining run: step00000002/4.ckpt and last.ckpt (step 4)."""
    d = tmp_path_factory.mktemp("run")
    fit(tiny(d))
    return d


def copy_run(run, tmp_path) -> Path:
    d = tmp_path / "run"
    shutil.copytree(run, d)
    return d


class Payload:
    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (exec, (f"open({self.target!r}, 'w').write('owned')",))


def payload_files(tmp_path, target) -> list[Path]:
    """The payload in torch's zip and legacy formats and in bare pickles of protocols 0-5."""
    obj = {"state_dict": {"w": torch.ones(2)}, "x": Payload(target)}
    out = [tmp_path / "zip.ckpt", tmp_path / "legacy.ckpt"]
    torch.save(obj, out[0])
    torch.save(obj, out[1], _use_new_zipfile_serialization=False)
    for proto in range(6):
        p = tmp_path / f"proto{proto}.ckpt"
        p.write_bytes(pickle.dumps({"x": Payload(target)}, protocol=proto))
        out.append(p)
    return out


UNSAFE_WORDS = "holds Python objects that could run code; unipred loads tensors only"


@pytest.mark.parametrize("wording", ["torch", "changed"])
def test_unsafe_is_decided_from_the_opcodes_whatever_torch_says(tmp_path, monkeypatch, wording):
    """Payloads in every format are unsafe, garbage is damaged, whether torch's error reads as
    today or says something else entirely (as another release may)."""
    target = tmp_path / "owned.txt"
    if wording == "changed":

        def load(*a, **k):
            raise pickle.UnpicklingError("weights only load failed, some new wording")

        monkeypatch.setattr(ckpt_mod.torch, "load", load)
    for p in payload_files(tmp_path, target):
        with pytest.raises(UnsafeCheckpointError) as e:
            safe_load(p)
        msg = str(e.value)
        assert msg.startswith(f"{p}: refused: ") and UNSAFE_WORDS in msg and "exec" in msg, msg
        assert "weights_only" not in msg and "\n" not in msg
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, good)
    rng = random.Random(0)
    damaged = {"garbage": os.urandom(4000), "empty": b"", "truncated": good.read_bytes()[:300],
               "text": b"not a checkpoint at all\n",
               # random bytes that read as a STACK_GLOBAL / GLOBAL opcode (a random file of
               # the suite once did, and was called unsafe): damaged, not code
               "stack_global": b"\x93" + rng.randbytes(4000),
               "global_noise": b"c\xff\x00q\nz\x01\n" + rng.randbytes(400)}  # fmt: skip
    damaged.update({f"random{i}": rng.randbytes(4000) for i in range(200)})
    for name, data in damaged.items():
        p = tmp_path / f"{name}.ckpt"
        p.write_bytes(data)
        with pytest.raises(CheckpointError) as e:
            safe_load(p)
        assert not isinstance(e.value, UnsafeCheckpointError), name
        msg = str(e.value)
        assert msg.startswith(f"{p}: damaged") and "weights_only" not in msg, msg
    assert not target.exists()


MALFORMED = {
    "a list": ([1, 2], "not a checkpoint dict (got list)"),
    "a bare tensor": (torch.ones(3), "not a checkpoint dict (got Tensor)"),
    "no optimizer state": ("drop:optimizer_states", "missing key 'optimizer_states'"),
    "an int in the state dict": ("sd:7", "key 'state_dict' -> 'model.x' holds int, not a tensor"),
    "global_step None": ("step:None", "key 'global_step' holds None"),
    "global_step a string": ("step:'12'", "key 'global_step' holds '12'"),
    "optimizer_states a dict": ("opt:{}", "key 'optimizer_states' holds dict, not a list"),
}


def malformed(good: dict, how):
    if not isinstance(how, str):
        return how
    kind, _, val = how.partition(":")
    bad = dict(good)
    if kind == "drop":
        del bad[val]
    elif kind == "sd":
        bad["state_dict"] = {**good["state_dict"], "model.x": int(val)}
    elif kind == "step":
        bad["global_step"] = eval(val)  # noqa: S307 - a literal of this table
    elif kind == "opt":
        bad["optimizer_states"] = {}
    return bad


def test_malformed_contents_name_the_file_and_the_key(run, tmp_path):
    good = read_checkpoint(run / "checkpoints/last.ckpt", require_training_state=True)
    for name, (how, words) in MALFORMED.items():
        p = tmp_path / "bad.ckpt"
        torch.save(malformed(good, how), p)
        with pytest.raises(CheckpointError) as e:
            read_checkpoint(p, require_training_state=True)
        assert str(e.value).startswith(f"{p}: ") and words in str(e.value), (name, str(e.value))


def test_resume_auto_falls_back_over_malformed_newest_checkpoints(run, tmp_path):
    good = read_checkpoint(run / "checkpoints/last.ckpt", require_training_state=True)
    model = LitTask(tiny(tmp_path)).state_dict()
    for i, (name, (how, _)) in enumerate(MALFORMED.items()):
        d = copy_run(run, tmp_path / str(i))
        last = d / "checkpoints/last.ckpt"
        torch.save(malformed(good, how), last)
        os.utime(last, (2e9, 2e9))  # the newest file
        evidence = last.read_bytes()
        with pytest.warns(UserWarning, match="resume=auto skips"):
            got = find_resume_checkpoint(d, model)
        assert got == d / "checkpoints/step00000004.ckpt", name
        assert (d / "checkpoints/last.ckpt.damaged").read_bytes() == evidence


def test_resume_auto_takes_the_newest_that_matches_the_model(run, tmp_path):
    """A newer checkpoint of another model (a changed width) beside good ones: the newest
    good one is taken, and the run says which; the other is set aside, not overwritten."""
    d = copy_run(run, tmp_path)
    ck = read_checkpoint(d / "checkpoints/last.ckpt", require_training_state=True)
    k = next(k for k in ck["state_dict"] if k.endswith("weight"))
    ck["state_dict"][k] = torch.zeros(3, 3)
    ck["global_step"] = 6
    atomic_torch_save(ck, d / "checkpoints/step00000006.ckpt")
    model = LitTask(tiny(tmp_path)).state_dict()
    with pytest.warns(UserWarning) as warned:
        got = find_resume_checkpoint(d, model)
    said = " | ".join(str(w.message) for w in warned)
    assert got.name in ("last.ckpt", "step00000004.ckpt")  # both step 4
    assert f"key '{k}' has shape (3, 3)" in said and "kept as step00000006.ckpt.mismatched" in said
    assert f"resuming from {got} (step 4)" in said


def test_discovery_opens_regular_files_only(run, tmp_path):
    """A FIFO named zz.ckpt (opening it would block forever), a directory named x.ckpt and a
    dangling link are skipped with a warning; the good checkpoint is found at once."""
    d = copy_run(run, tmp_path)
    folder = d / "checkpoints"
    os.mkfifo(folder / "zz.ckpt")
    (folder / "x.ckpt").mkdir()
    (folder / "gone.ckpt").symlink_to(tmp_path / "nowhere")
    signal.signal(signal.SIGALRM, lambda *a: pytest.fail("resume=auto waited on a FIFO"))
    signal.alarm(60)
    try:
        with pytest.warns(UserWarning) as warned:
            got = find_resume_checkpoint(d, LitTask(tiny(tmp_path)).state_dict())
    finally:
        signal.alarm(0)
    said = " | ".join(str(w.message) for w in warned)
    assert got.name in ("last.ckpt", "step00000004.ckpt")
    assert "zz.ckpt: not a regular file (a FIFO)" in said
    assert "x.ckpt: not a regular file (a directory)" in said
    assert "gone.ckpt: no such checkpoint file" in said
    assert (folder / "zz.ckpt").exists()  # special files are left where they are
    with pytest.raises(CheckpointError, match="not a regular file"):
        apply_init(LitTask(tiny(tmp_path)).model, f"ckpt:{folder / 'zz.ckpt'}")


def test_a_real_enospc_is_one_line_and_the_previous_checkpoint_is_intact(
    run, tmp_path, monkeypatch, capsys
):
    """The step-4 checkpoint is written into /dev/full (a real ENOSPC inside torch's zip
    writer): `unipred fit` ends with one line, exit 1; last.ckpt (step 2) is intact."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    from unipred.cli import main

    real_open, opened = builtins.open, []

    def full_open(path, mode="r", *a, **k):
        if "w" in mode and ".tmp-" in str(path):
            opened.append(path)
            if len(opened) == 3:  # step 2: step file + last.ckpt; step 4: the step file
                return real_open("/dev/full", mode, *a, **k)
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(ckpt_mod, "open", full_open, raising=False)
    d = tmp_path / "full"
    assert main(["fit", str(TINY), *BASE, f"run_dir={d}"]) == 1
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    want = (f"unipred fit: stopped: no space left on device at {d}/checkpoints/"
            "step00000004.ckpt; the previous checkpoint last.ckpt (step 2) is intact")  # fmt: skip
    assert err[-1] == want, err[-5:]
    assert not any("Traceback" in x for x in err)
    monkeypatch.undo()
    assert read_checkpoint(d / "checkpoints/last.ckpt")["global_step"] == 2
    assert not [p for p in os.listdir(d / "checkpoints") if p.startswith(".")]


def test_nan_weights_warn_at_export_and_are_refused_at_init(run, tmp_path, capsys):
    from unipred.cli import main

    ck = read_checkpoint(run / "checkpoints/last.ckpt", require_training_state=True)
    k = next(k for k, v in ck["state_dict"].items() if v.is_floating_point() and v.numel() > 1)
    ck["state_dict"][k] = ck["state_dict"][k].clone()
    ck["state_dict"][k][0] = float("nan")
    bad = tmp_path / "nan.ckpt"
    torch.save(ck, bad)
    assert main(["export", str(bad), str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"key '{k[len('model.') :]}' holds NaN or infinite" in err[0], err
    for init in (f"ckpt:{bad}", f"pretrain:{bad}"):
        cfg = [*BASE, f"run_dir={tmp_path / 'x'}", f"model.init={init}", "trainer.max_steps=1"]
        if init.startswith("pretrain"):
            cfg.append("task=debug_image_classify")
        assert main(["fit", str(TINY), *cfg]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "holds NaN or infinite values" in err[0], err
        assert k[len("model.") :] in err[0]
