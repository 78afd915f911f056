"""The README's quick start runs as written: its code blocks are read from README.md itself
(so the README cannot drift from what works) and run with the shipped ``unipred`` command, in
a folder holding the ``my_images/`` tree the commands name, with only the size-of-run
overrides the README itself shows. The CPU-sized part is in the default suite; the ViT-B/14
recipes (minutes on 2 CPU cores) are ``slow``.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"


def quick_start() -> str:
    text = README.read_text()
    start = text.index("## Quick start")
    return text[start : text.index("\n## ", start + 1)]


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", quick_start(), re.S)


def commands() -> list[list[str]]:
    """Every shell command of the quick start: continuation lines joined, comments dropped."""
    out = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            if line:
                out.append(shlex.split(line))
    return out


def size_of_run() -> list[str]:
    """The overrides the README says to add to each ``fit`` for a quick run."""
    m = re.search(
        r"add the size of the run to each `fit`: `([^`]+)`", " ".join(quick_start().split())
    )
    assert m, "the README no longer shows the size-of-run overrides"
    return m.group(1).split()


def make_images(root: Path, classes: int = 3, train: int = 20, val: int = 2) -> None:
    """my_images/{train,val}/<class>/*.jpg: small colour JPEGs whose colour says the class
    (20 per class: small/finetune keeps 20 labels per class)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            d = root / "my_images" / split / f"class_{c}"
            d.mkdir(parents=True)
            for i in range(n):
                px = rng.normal(60 + 60 * c, 30, (32, 32, 3)).clip(0, 255).astype(np.uint8)
                Image.fromarray(px).save(d / f"{i}.jpg", quality=90)


def unipred_command() -> list[str]:
    script = Path(sys.executable).with_name("unipred")  # the console script pip installed
    return [str(script)] if script.exists() else [sys.executable, "-m", "unipred.cli"]


def run(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    assert cmd[0] == "unipred", cmd
    args = cmd[1:]
    if args[0] == "fit" and "--print-config" not in args:
        args = [*args, *size_of_run()]
    env = {**os.environ, "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*unipred_command(), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


def is_big(cmd: list[str]) -> bool:
    return any("vit_b14" in a for a in cmd)


def test_the_quick_start_names_what_it_runs():
    cmds = commands()
    assert [c[:3] for c in cmds if c[0] == "unipred"] and all(c[0] == "unipred" for c in cmds)
    big = [c for c in cmds if is_big(c)]
    assert len(big) == 3 and len(cmds) - len(big) >= 6
    assert "8 GPUs" in quick_start() and "One machine" in quick_start()


def test_python_block_runs_as_written(tmp_path):
    (code,) = blocks("python")
    env = {**os.environ, "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_cpu_commands_run_as_written(tmp_path):
    make_images(tmp_path)
    for cmd in commands():
        if is_big(cmd):
            continue
        proc = run(cmd, tmp_path)
        if "--print-config" in cmd:
            assert "# command line" not in proc.stdout  # nothing was given on the command line
            assert re.search(r"global_batch: 16  # .*image_nepa_tiny\.yaml", proc.stdout)
    ft = tmp_path / "runs/mine_ft"
    assert (ft / "checkpoints/last.ckpt").is_file() and (ft / "config.yaml").is_file()
    assert "num_classes: 3" in (ft / "config.yaml").read_text()  # read from the class folders


def test_the_one_machine_line_is_what_a_cpu_run_prints():
    from unipred.train.config import load_config
    from unipred.train.machine import fit_to_machine

    cfg = load_config("image/nepa_vit_b14_pretrain", check_paths=False)
    _, line = fit_to_machine(cfg.trainer, gpus=0)
    quoted = re.search(r"e\.g\. `(no GPU here:[^`]+)`", " ".join(quick_start().split()))
    assert quoted and line.startswith(quoted.group(1)), (line, quoted)


@pytest.mark.slow  # ViT-B/14 at 224 px on the CPU: ~6 min on 2 busy cores
def test_vit_b14_commands_run_as_written_on_a_cpu(tmp_path):
    make_images(tmp_path)
    for cmd in commands():
        if is_big(cmd):
            proc = run(cmd, tmp_path)
            if cmd[1] == "fit":  # one process, accumulation: never 8 CPU processes
                assert "no GPU here: trainer.devices 8 -> 1 (one process)" in proc.stderr
            else:
                assert "val/acc1" in proc.stdout
