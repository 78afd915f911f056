"""What unipred writes for others to read follows the user's umask (0644 under 022, 0640
under 027), as any new file would, while staying atomic: save_pretrained, unipred export,
the official layout, the timm export and training checkpoints."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from unipred.base.atomic import atomic_write
from unipred.nn.model import NEPA
from unipred.train.checkpoint import atomic_torch_save
from unipred.weights.hub import export_timm, save_official_nepa


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def modes(folder: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir() if p.is_file()}


def test_exports_follow_the_umask(tmp_path, umask):
    want = 0o666 & ~umask
    m = NEPA.from_name("nepa_debug", causal=False, head="mean", num_classes=3)
    written = {
        "save_pretrained": m.save_pretrained(tmp_path / "ours"),
        "save_official_nepa": save_official_nepa(m, tmp_path / "official", image_size=32),
    }
    if _has_timm():  # the vision extra
        written["export_timm"] = export_timm(m, tmp_path / "timm", image_size=32)
    atomic_torch_save({"w": torch.zeros(2)}, tmp_path / "ckpt" / "last.ckpt")
    written["atomic_torch_save"] = tmp_path / "ckpt"
    for what, folder in written.items():
        got = modes(folder)
        assert got and all(v == want for v in got.values()), (
            what,
            {k: oct(v) for k, v in got.items()},
        )
        assert not [p for p in folder.iterdir() if p.name.startswith(".")], what  # no temporaries


def test_unipred_export_command_follows_the_umask(tmp_path, umask):
    from unipred.train.config import load_config
    from unipred.train.engine import fit
    from unipred.weights.pretrained import main as export_main

    run = tmp_path / "run"
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs/debug/image_nepa_tiny.yaml", [
        f"run_dir={run}", "trainer.max_steps=1", "trainer.progress_bar=false",
        "trainer.loggers=[]", "data.train_samples=16", "data.val_samples=0",
        "trainer.collapse_every_n_steps=0"])  # fmt: skip
    fit(cfg)
    assert stat.S_IMODE((run / "checkpoints/last.ckpt").stat().st_mode) == 0o666 & ~umask
    assert export_main([str(run / "checkpoints/last.ckpt"), str(tmp_path / "exp")]) == 0
    got = modes(tmp_path / "exp")
    assert got and set(got.values()) == {0o666 & ~umask}, {k: oct(v) for k, v in got.items()}


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    dest = tmp_path / "config.json"
    dest.write_text("old")

    def boom(path):
        Path(path).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(dest, boom)
    assert dest.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["config.json"]


def _has_timm() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True
