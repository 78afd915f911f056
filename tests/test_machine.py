"""A recipe's device layout fits the machine (unipred/machine.py), the class count has one
source (unipred/classes.py), and ``--print-config`` says where every value came from
(unipred/provenance.py)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from unipred.train.config import ConfigError, batch_plan, load_config
from unipred.train.machine import CPU_PER_DEVICE, fit_to_machine
from unipred.train.provenance import source_of
from unipred.train.trainer import TrainerConfig


def test_a_cpu_machine_runs_one_process_with_accumulation():
    t = TrainerConfig(global_batch=4096, per_device_batch=256, devices=8)
    new, line = fit_to_machine(t, gpus=0)
    assert (new.devices, new.per_device_batch) == (1, CPU_PER_DEVICE)
    assert "devices 8 -> 1 (one process)" in line and "accumulation 128" in line
    assert t.devices == 8  # the recipe object itself is not changed
    small, line = fit_to_machine(TrainerConfig(global_batch=8, per_device_batch=256, devices=8), 0)
    assert (small.devices, small.per_device_batch) == (1, 8) and "accumulation 1" in line
    odd, _ = fit_to_machine(TrainerConfig(global_batch=48, per_device_batch=256, devices=8), 0)
    assert odd.per_device_batch == 24  # the largest divisor of 48 under the CPU cap


def test_fewer_gpus_keep_the_per_device_batch():
    new, line = fit_to_machine(TrainerConfig(global_batch=1024, per_device_batch=128, devices=8), 2)
    assert (new.devices, new.per_device_batch) == (2, 128) and "accumulation 4" in line
    assert fit_to_machine(TrainerConfig(devices=8), 8)[1] is None  # enough GPUs: as written


def test_layouts_that_are_left_alone():
    for t in (TrainerConfig(devices=1), TrainerConfig(devices=2, accelerator="cpu"),
              TrainerConfig(devices=8, num_nodes=4)):  # fmt: skip
        assert fit_to_machine(t, gpus=0) == (t, None)


def test_the_fitted_layout_realises_the_recipe():
    cfg = load_config("image/nepa_vit_b14_pretrain", check_paths=False)
    before = batch_plan(cfg)
    cfg.trainer, _ = fit_to_machine(cfg.trainer, gpus=0)
    after = batch_plan(cfg)
    assert after.global_batch == before.global_batch == 4096 and after.lr == before.lr
    assert after.world_size * after.per_device_batch * after.accumulate_grad_batches == 4096


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")
def test_print_config_shows_the_machine_line_and_every_source(tmp_path):
    cmd = [sys.executable, "-m", "unipred.cli", "fit", "image/nepa_vit_b14_pretrain",
           "trainer.global_batch=64", "--print-config"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={"PYTHONSAFEPATH": "1", "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    err = [ln for ln in proc.stderr.splitlines() if "no GPU here" in ln]
    assert len(err) == 1 and "devices 8 -> 1 (one process)" in err[0]
    out = proc.stdout
    assert "global_batch: 64  # command line" in out
    assert "per_device_batch: 32  # this machine" in out and "devices: 1  # this machine" in out
    assert "blr: 0.0003  # recipe image/nepa_vit_b14_pretrain.yaml" in out
    assert "seed: 1337  # recipe image/nepa_vit_b14_pretrain.yaml" in out
    assert "keep_ckpts: 2  # default" in out
    assert (
        "_base_"
        in subprocess.run(
            [*cmd[:4], "image/small_pretrain", "--print-config"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=120,
            env={"PYTHONSAFEPATH": "1", "PATH": "/usr/bin:/bin"},
        ).stdout
    )  # small_pretrain is one _base_ line: its values come from the base file


# ---------------------------------------------------------------------------- class count
def _folder(root, classes, n=2):
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((28, 28, 3), 40 * c, np.uint8)).save(root / f"c{c}/{i}.png")
    return root


def test_the_head_follows_the_data_and_conflicts_are_one_line(tmp_path):
    root, val = _folder(tmp_path / "train", 4), _folder(tmp_path / "val", 4)
    base = ["image/vit_b14_finetune", f"data.root={root}", f"data.val_root={val}"]
    cfg = load_config(base[0], base[1:])
    assert cfg.data.num_classes == 4 and source_of(cfg, "data.num_classes") == "from data.root"
    with pytest.raises(ConfigError, match=r"data.num_classes=10 \(command line\) but data.root "
                                          r"holds 4 classes"):  # fmt: skip
        load_config(base[0], [*base[1:], "data.num_classes=10"])
    with pytest.raises(ConfigError, match=r"data.num_classes=-2 must be >= 0"):
        load_config(base[0], [*base[1:], "data.num_classes=-2"])
    with pytest.raises(ConfigError, match="drop model.num_classes"):
        load_config(base[0], [*base[1:], "data.num_classes=4", "model.num_classes=1000"])


def test_a_checkpoint_classifier_is_a_source_and_a_conflict(tmp_path):
    from unipred.train.checkpoint import atomic_torch_save

    ck = tmp_path / "ft.ckpt"
    atomic_torch_save({"state_dict": {"model.head.classifier.weight": torch.zeros(7, 768)}}, ck)
    val = _folder(tmp_path / "val", 5)
    cfg = load_config("image/vit_b14_eval", [f"data.val_root={val}", f"ckpt={ck}"])
    assert cfg.data.num_classes == 7  # the eval recipe reads it from the checkpoint
    assert source_of(cfg, "data.num_classes") == f"from the classifier of ckpt={ck}"
    with pytest.raises(ConfigError, match=rf"ckpt={ck} has 7 rows"):
        load_config("image/vit_b14_eval", [f"data.val_root={val}", f"ckpt={ck}",
                                           "data.num_classes=5"])  # fmt: skip
    # a pretraining checkpoint has no classifier: a new head of the data's size
    root = _folder(tmp_path / "train", 3)
    pre = tmp_path / "pre.ckpt"
    atomic_torch_save({"state_dict": {"model.cls_token": torch.zeros(1, 1, 768)}}, pre)
    cfg = load_config("image/vit_b14_finetune", [f"data.root={root}", f"data.val_root={root}",
                                                 f"model.init=pretrain:{pre}"])  # fmt: skip
    assert cfg.data.num_classes == 3


def test_apply_to_run_also_fits_the_loader_workers(monkeypatch, capsys):
    from unipred.train import machine

    monkeypatch.setattr(machine, "_gpus", lambda: 0)
    monkeypatch.setattr(machine.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(machine, "cpu_bf16_is_slow", lambda: False)  # the workers' line only
    cfg = load_config("image/nepa_vit_b14_pretrain", check_paths=False)
    assert cfg.data.num_workers == 10  # sized for one process per GPU of an 8-GPU node
    line = machine.apply_to_run(cfg)
    assert cfg.data.num_workers == 2 and "data.num_workers 10 -> 2" in line
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0] == f"[unipred] {line}"
    assert source_of(cfg, "data.num_workers").startswith("this machine")
    assert machine.apply_to_run(cfg) is None  # fitted once: nothing more to say


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_setaffinity"), reason="Linux affinity")
def test_a_default_worker_count_fits_the_cores_but_a_written_one_is_kept(tmp_path, monkeypatch):
    """A data section's default of 4 loader workers on a 1-core share becomes 1 (with one
    line), through the shipped CLI; a count the user wrote is theirs."""
    import os

    from unipred.train import machine

    cmd = [sys.executable, "-m", "unipred.cli", "fit", "task=audio_pretrain",
           "model.name=nepa_audio_debug", "--print-config"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={"PYTHONSAFEPATH": "1", "PATH": "/usr/bin:/bin"},
                          preexec_fn=lambda: os.sched_setaffinity(0, {0}))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    said = [ln for ln in proc.stderr.splitlines() if "num_workers" in ln]
    assert len(said) == 1 and "data.num_workers 4 (the data section's default) -> 1" in said[0]
    assert "num_workers: 1  # this machine" in proc.stdout
    monkeypatch.setattr(machine, "usable_cpus", lambda: 1)
    for extra, want in (([], 1), (["data.num_workers=3"], 3)):
        cfg = load_config(None, ["task=audio_pretrain", "model.name=nepa_audio_debug", *extra])
        machine.apply_to_run(cfg, announce=False)
        assert cfg.data.num_workers == want


# ------------------------------------------------------------------- bf16 on a slow-bf16 CPU
SMALL = ["data.root=/nowhere", "data.aug.img_size=20", "model.tokenizer_args.in_chans=1"]


def test_a_cpu_without_native_bf16_is_slow_even_where_onednn_emulates_it(monkeypatch):
    """AVX2 only (oneDNN has no bf16): slow. AVX-512 without AVX512-BF16 or AMX (oneDNN converts
    around each product; 3.6x slower per matmul measured): slow. AVX512-BF16 or AMX: fast."""
    import torch

    from unipred.train import machine

    def case(onednn, avx512, bf16, amx):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn)
        monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: avx512)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        return machine.cpu_bf16_is_slow.__wrapped__()

    assert case(False, False, False, False) is True  # AVX2-only EPYC
    assert case(True, True, False, False) is True  # AVX-512 Xeon without bf16 instructions
    assert case(True, True, True, False) is False  # AVX512-BF16
    assert case(True, True, False, True) is False  # AMX
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")  # a torch that cannot say
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert machine.cpu_bf16_is_slow.__wrapped__() is False


def test_bf16_runs_as_fp32_on_a_cpu_without_fast_bf16(monkeypatch, capsys):
    """On an AVX2-only CPU oneDNN has no bf16 kernels and a bf16 matmul measured 25x slower than
    fp32: a bf16 recipe run there becomes 32-true with one line; a GPU run, a fast-bf16 CPU,
    ``trainer.cpu_bf16=keep`` and an fp32 recipe are left as written."""
    from unipred.train import machine

    t = TrainerConfig(precision="bf16-mixed", accelerator="auto")
    new, line = machine.cpu_precision(t, gpus=0, slow=True)
    assert new.precision == "32-true" and t.precision == "bf16-mixed"
    assert "bf16-mixed -> 32-true" in line and "trainer.cpu_bf16=keep" in line
    assert machine.cpu_precision(t, gpus=1, slow=True) == (t, None)  # the GPU takes the run
    cpu = TrainerConfig(precision="bf16-true", accelerator="cpu")
    assert machine.cpu_precision(cpu, gpus=1, slow=True)[0].precision == "32-true"
    assert machine.cpu_precision(t, gpus=0, slow=False) == (t, None)
    keep = TrainerConfig(precision="bf16-mixed", cpu_bf16="keep")
    assert machine.cpu_precision(keep, gpus=0, slow=True) == (keep, None)
    fp32 = TrainerConfig(precision="32-true")
    assert machine.cpu_precision(fp32, gpus=0, slow=True) == (fp32, None)

    # the path every run takes (engine._threads -> apply_to_run) and the frozen protocols'
    monkeypatch.setattr(machine, "_gpus", lambda: 0)
    monkeypatch.setattr(machine, "cpu_bf16_is_slow", lambda: True)
    cfg = load_config("small/pretrain", SMALL, check_paths=False)
    assert cfg.trainer.precision == "bf16-mixed"
    from unipred.protocols.suite import _autocast

    assert _autocast(cfg) is None  # features computed in fp32 here too
    line = machine.apply_to_run(cfg)
    assert cfg.trainer.precision == "32-true" and "bf16-mixed -> 32-true" in line
    assert source_of(cfg, "trainer.precision").startswith("this machine")
    err = [x for x in capsys.readouterr().err.splitlines() if "32-true" in x]
    assert len(err) == 1 and err[0].startswith("[unipred] trainer.precision")
    kept = load_config("small/pretrain", [*SMALL, "trainer.cpu_bf16=keep"],
                       check_paths=False)  # fmt: skip
    machine.apply_to_run(kept)
    assert kept.trainer.precision == "bf16-mixed" and _autocast(kept) == torch.bfloat16
    monkeypatch.setattr(machine, "cpu_bf16_is_slow", lambda: False)
    fast = load_config("small/pretrain", SMALL, check_paths=False)
    machine.apply_to_run(fast)
    assert fast.trainer.precision == "bf16-mixed"  # a CPU with bf16 kernels keeps the recipe's


def test_a_bad_cpu_bf16_value_is_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "unipred.cli", "fit", "small/pretrain", "data.root=/nowhere",
         "trainer.cpu_bf16=never", "--print-config"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "trainer.cpu_bf16='never' is not one of the choices" in proc.stderr
    assert "auto, keep" in proc.stderr
