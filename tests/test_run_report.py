"""What a run tells the person who started it, through the shipped command: the data it found,
progress with the step total and an ETA, one closing line of final metrics (percent) and
RUN_DIR/results.json, the total step count under --print-config, and one process per run
folder."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from unipred.train.run_lock import LOCK_NAME, RunDirBusy, RunLock

UNIPRED = str(Path(sys.executable).with_name("unipred"))
TINY = ["debug/image_nepa_tiny", "task=debug_image_classify", "data.train_samples=32", "trainer.global_batch=4",
        "data.val_samples=16", "trainer.loggers=[csv]", "trainer.threads=1"]  # fmt: skip


def _fit(args, cwd, timeout=600):
    return subprocess.run([UNIPRED, "fit", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONSAFEPATH": "1"})  # fmt: skip


def test_a_classification_run_says_what_the_data_gave_how_far_it_is_and_what_it_got(tmp_path):
    run = tmp_path / "run"
    p = _fit([*TINY, f"run_dir={run}", "trainer.max_steps=6", "trainer.log_every_n_steps=2",
              "data.labels_per_class=3"], tmp_path)  # fmt: skip
    out = p.stdout
    assert p.returncode == 0, p.stderr[-3000:]
    data = [ln for ln in out.splitlines() if "] data: " in ln]
    assert len(data) == 1, out[-3000:]
    assert "4 classes (data.num_classes: data source" in data[0]
    assert "train 32 samples, labelled subset 12 (3 per class" in data[0]
    assert "val 16 samples" in data[0]
    steps = re.findall(r"step (\d+)/(\d+) eta (\d+)s", out)
    assert (
        steps and {t for _, t, _ in steps} == {"6"} and ("2", "6") in {(s, t) for s, t, _ in steps}
    )
    assert re.search(r"validated: val/acc1 \d+\.\d\d %", out), out[-2000:]
    result = [ln for ln in out.splitlines() if ln.startswith("result: ")]
    assert len(result) == 1 and result == out.strip().splitlines()[-1:], out[-2000:]
    saved = json.loads((run / "results.json").read_text())
    acc = saved["metrics"]["val/acc1"]
    assert saved["units"]["val/acc1"] == "%" and 0 <= acc <= 100 and saved["steps"] == 6
    assert f"val/acc1 {acc:.2f} %" in result[0] and str(run / "results.json") in result[0]
    # the logged fraction and the reported percent are the same number
    rows = (run / "logs/version_0/metrics.csv").read_text().splitlines()
    head = rows[0].split(",")
    last = [r.split(",") for r in rows[1:] if r.split(",")[head.index("val/acc1")]][-1]
    assert abs(100 * float(last[head.index("val/acc1")]) - acc) < 1e-3
    assert not (run / LOCK_NAME).exists()  # released at the end
    # `unipred eval` of that checkpoint: no step count on its validation line (it trains no
    # steps), and its closing lines show the accuracies in percent, as the run's line above
    ev = subprocess.run([UNIPRED, "eval", *TINY, f"ckpt={run}/checkpoints/last.ckpt"],
                        cwd=tmp_path, capture_output=True, text=True, timeout=600,
                        env={**os.environ, "PYTHONSAFEPATH": "1"})  # fmt: skip
    assert ev.returncode == 0, ev.stderr[-3000:]
    line = [ln for ln in ev.stdout.splitlines() if "validated: " in ln]
    assert line and "step" not in line[0] and "epoch" not in line[0], ev.stdout[-2000:]
    assert re.search(r"^val/acc1: \d+\.\d\d %$", ev.stdout, re.M), ev.stdout[-2000:]
    assert re.search(r"^val/loss: \d", ev.stdout, re.M), ev.stdout[-2000:]
    # the data report lists the generic reasons and the image modality's, no other's
    keys = set(json.loads((run / "data_report.json").read_text())["total"])
    assert {"skipped/corrupt", "converted/cmyk", "skipped/total"} <= keys, keys
    assert not keys & {"converted/resampled", "skipped/invalid_utf8"}, keys


def test_without_a_progress_bar_the_run_still_ends_with_its_result(tmp_path):
    run = tmp_path / "run"
    p = _fit([*TINY, f"run_dir={run}", "trainer.max_steps=2", "trainer.progress_bar=false"],
             tmp_path)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert " step " not in p.stdout  # no progress lines asked for
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith("result: 2 steps") and "val/acc1" in last and " %" in last, last


def test_print_config_shows_the_total_step_count_and_the_class_count(tmp_path):
    p = _fit([*TINY, "trainer.max_steps=-1", "trainer.max_epochs=3", "trainer.global_batch=8",
              "--print-config"], tmp_path)  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    assert "#   total_steps: 12  (3 epochs x 4 steps (32 training samples" in p.stdout
    assert re.search(r"^  num_classes: 4  # data source", p.stdout, re.M), p.stdout[:3000]
    p = _fit([*TINY, "trainer.max_steps=150", "--print-config"], tmp_path)
    assert "#   total_steps: 150  (trainer.max_steps)" in p.stdout, p.stdout[-1500:]


def test_a_shape_mistake_is_refused_before_the_run_folder_exists(tmp_path):
    run = tmp_path / "run"
    p = _fit(["debug/image_nepa_tiny", "data.image_size=30", f"run_dir={run}"], tmp_path)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr[-2000:]
    assert "data.image_size=30" in lines[0] and "patch size 4" in lines[0]
    assert not run.exists()


# ------------------------------------------------------------------------------ the lock
def test_a_second_process_on_a_run_folder_in_use_is_refused_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        (run / LOCK_NAME).write_text(json.dumps({
            "pid": holder.pid, "host": socket.gethostname(), "started": "2026-12-06 10:00:00",
            "command": "unipred fit other.yaml"}))  # fmt: skip
        p = _fit([*TINY, f"run_dir={run}", "trainer.max_steps=2"], tmp_path)
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert p.returncode == 2 and len(lines) == 1, p.stderr[-2000:]
        assert f"is in use by pid {holder.pid} on host {socket.gethostname()}" in lines[0]
        assert not (run / "logs").exists() and not (run / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone now: its lock is taken over and the run goes on (a requeue)
    p = _fit([*TINY, f"run_dir={run}", "trainer.max_steps=2"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"took over the lock of {run}" in p.stdout
    assert (run / "results.json").exists() and not (run / LOCK_NAME).exists()


def test_reasons_belong_to_the_modality_that_registered_them():
    import unipred.tasks.audio.data  # noqa: F401  (registrations)
    import unipred.tasks.image.decode  # noqa: F401

    from unipred.data.accounting import modality_of, reasons_for

    assert modality_of("unipred.tasks.image.debug") == "unipred.tasks.image"
    assert modality_of("unipred.data.shards") == "unipred" and modality_of("toy.x") == "toy"
    image = reasons_for({"unipred.tasks.image.debug"})
    assert {"skipped/truncated", "converted/cmyk"} <= image
    assert "converted/resampled" not in image
    audio = reasons_for({"unipred.tasks.audio.events"})
    assert "converted/resampled" in audio and "converted/cmyk" not in audio


def test_lock_rules(tmp_path, monkeypatch):
    with RunLock(tmp_path) as lock:
        info = json.loads((tmp_path / LOCK_NAME).read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        with pytest.raises(RunDirBusy, match="already in use by this process"):
            RunLock(tmp_path).acquire()
        assert lock.held
    assert not (tmp_path / LOCK_NAME).exists()
    # another host's lock: alive while it is refreshed, taken over once it is stale
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere-node-7"}))
    with pytest.raises(RunDirBusy, match="pid 1 on host elsewhere-node-7"):
        RunLock(tmp_path).acquire()
    old = time.time() - 3600
    os.utime(tmp_path / LOCK_NAME, (old, old))
    with RunLock(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    # the other ranks of a distributed run share rank 0's lock
    monkeypatch.setenv("LOCAL_RANK", "1")
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": os.getpid(), "host": "x"}))
    with RunLock(tmp_path) as lock:
        assert not lock.held


def test_an_eval_protocol_writes_its_json_with_the_printed_percentages(tmp_path):
    out = tmp_path / "eval"
    p = subprocess.run(
        [UNIPRED, "eval", *TINY, "ckpt=random", f"out={out}", "protocol=knn", "baselines=false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONSAFEPATH": "1"},
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    saved = json.loads((out / "knn.json").read_text())
    row = saved["rows"][0]
    assert row["protocol"] == "knn" and saved["units"]["top1_pct"] == "%"
    assert "top1" not in row and "top5" not in row  # one unit: percent, named in the key
    assert 0.0 <= row["top1_pct"] <= row["top5_pct"] <= 100.0
    assert f"top-1 {row['top1_pct']:6.2f} %" in p.stdout, p.stdout[-2000:]
    assert f"wrote {out / 'knn.json'}" in p.stdout
