"""What a run prints to a log file: the recipe once, plain progress lines, no escape codes, no
third-party tips or deprecation noise."""

import os
import subprocess
import sys


def test_a_run_logged_to_a_file_is_plain_and_quiet(tmp_path):
    log = tmp_path / "run.log"
    with open(log, "w") as f:
        r = subprocess.run(
            [sys.executable, "-m", "unipred.cli", "fit", "debug/image_nepa_tiny",
             f"run_dir={tmp_path / 'run'}", "trainer.max_steps=6", "data.train_samples=32",
             "data.val_samples=16", "trainer.log_every_n_steps=2", "trainer.loggers=[csv]"],
            stdout=f, stderr=subprocess.STDOUT, cwd=tmp_path, timeout=300,
            env={**os.environ, "PYTHONSAFEPATH": "1"},
        )  # fmt: skip
    text = log.read_text()
    assert r.returncode == 0, text[-3000:]
    assert "\x1b[" not in text and "\r" not in text, "escape codes in a log file"
    for noise in ("💡 Tip", "LeafSpec", "GPU available", "smaller than the logging interval"):
        assert noise not in text, noise
    assert text.count("effective recipe:") == 1
    steps = [ln for ln in text.splitlines() if " step " in ln and ln.startswith("[")]
    assert any("step 6/6" in ln for ln in steps) and any(
        "validated: val/loss" in ln for ln in steps
    )


def test_lightning_lines_about_its_own_steps_are_dropped():
    """Lightning's "Loading `train_dataloader` to estimate..." (an epoch-based fine-tune prints
    it) says nothing about the user's run; the filter drops it and keeps other info lines.
    Own handler on Lightning's logger: earlier tests may have changed its level or handlers."""
    import logging

    from unipred.base.quiet import quiet_third_party

    quiet_third_party()
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    said: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            said.append(record.getMessage())

    keep, level, disabled = Keep(logging.INFO), log.level, log.disabled
    log.addHandler(keep)
    log.setLevel(logging.INFO)
    log.disabled = False
    try:
        log.info("Loading `train_dataloader` to estimate number of stepping batches.")
        log.info("a line about the run")
    finally:
        log.removeHandler(keep)
        log.setLevel(level)
        log.disabled = disabled
    assert "a line about the run" in said and not any("train_dataloader" in s for s in said)


def test_ddp_stride_note_is_filtered_but_user_warnings_are_not():
    """The image demo's DDP pretraining printed torch's "Grad strides do not match bucket view
    strides" note once per rank (a one-channel patch embedding); the noise list drops it."""
    import re

    from unipred.base.quiet import _NOISE_WARNINGS

    note = ("Grad strides do not match bucket view strides. This may indicate grad was not "
            "created according to the gradient layout contract")  # fmt: skip
    assert any(re.match(p, note) for p in _NOISE_WARNINGS)
    assert not any(re.match(p, "data.root has 3 unreadable images") for p in _NOISE_WARNINGS)
