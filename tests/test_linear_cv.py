"""The linear probe's lr chosen by cross-validation on the training labels (``linear.lr_grid``):
folds are stratified, the validation set plays no part in the choice, every row (backbone,
random init, raw input) gets its own, and the settings are checked in one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from unipred.protocols import ProtocolError
from unipred.protocols.features import Features
from unipred.protocols.linear import cross_validate_lr, run_linear, stratified_folds
from unipred.protocols.report import format_row, row_details
from unipred.protocols.settings import ProbeSettings, parse_eval_settings

# eval_defaults.features.block=null: the recipe reads block 3 of the demo model's 6; this model has 2
TINY = ["model.predictor.dim=32", "model.predictor.depth=2", "model.predictor.heads=2", "eval_defaults.features.block=null",
        "data.root=''", "data.generated_samples=48", "trainer.progress_bar=false",
        "trainer.precision=32-true", "trainer.accelerator=cpu"]  # fmt: skip


def _blobs(n_per_class: int, seed: int, classes: int = 4, dim: int = 16) -> Features:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)) * 2
    y = torch.arange(classes).repeat_interleave(n_per_class)
    return Features(centres[y] + torch.randn(len(y), dim, generator=g), y)


def test_folds_are_stratified_balanced_and_seeded():
    y = torch.tensor([0] * 7 + [1] * 3 + [2] * 10)
    f = stratified_folds(y, 5, seed=0)
    sizes = torch.bincount(f, minlength=5)
    assert int(sizes.max() - sizes.min()) <= 1 and int(sizes.sum()) == 20
    for c in (0, 1, 2):  # each class dealt round the folds: at most one apart
        per = torch.bincount(f[y == c], minlength=5)
        assert int(per.max() - per.min()) <= 1
    assert torch.equal(f, stratified_folds(y, 5, seed=0))
    assert not torch.equal(f, stratified_folds(y, 5, seed=1))


def test_the_lr_is_chosen_on_training_folds_only_and_a_useless_lr_loses():
    train, val = _blobs(10, 0), _blobs(25, 1)
    s = ProbeSettings(lr_grid=[1e-9, 1e-2], epochs=30)
    lr, acc = cross_validate_lr(train, 4, s)
    assert lr == 1e-2 and acc[1e-2] > acc[1e-9] + 0.3  # lr 1e-9 leaves the N(0, 0.01) init
    r = run_linear(train, val, 4, s)
    assert r["lr"] == 1e-2 and r["folds"] == 5 and set(r["lr_cv"]) == {"1e-09", "0.01"}
    # the validation set plays no part: the same choice and fold scores with its labels scrambled
    junk = Features(torch.randn_like(val.pooled), val.labels.flip(0))
    r2 = run_linear(train, junk, 4, s)
    assert r2["lr"] == r["lr"] and r2["lr_cv"] == r["lr_cv"]
    row = {"protocol": "linear", "weights": "raw", "seconds": 0.1, **r}
    assert "(5-fold CV of 2)" in row_details(row) and "5-fold CV" in format_row(row)
    # without a grid: the fixed lr, no CV keys
    plain = run_linear(train, val, 4, ProbeSettings(epochs=30))
    assert plain["lr"] == 1e-2 and "lr_cv" not in plain


def test_bad_grids_are_one_line():
    assert parse_eval_settings(["linear.lr_grid=1e-3,1e-2"]).linear.lr_grid == [1e-3, 1e-2]
    for args, msg in (
        (["linear.lr_grid=[0.0,1e-2]"], "every lr must be > 0"),
        (["linear.lr_grid=[1e-3]", "linear.folds=1"], "folds >= 2"),
        (["linear.lr_grid=[1e-3]", "linear.augment=true"], "not cross-validated"),
        (["layers.lr_grid=[1e-3]"], "train together at one lr"),
    ):
        with pytest.raises(ProtocolError, match=msg):
            parse_eval_settings(args)


def test_eval_cross_validates_every_row_through_the_cli(tmp_path):
    """The shipped `unipred evaluate-suite`: each row (random init, raw input) reports the lr its
    own training folds chose; `trainer.threads` sets the threads."""
    cmd = [sys.executable, "-m", "unipred.cli", "evaluate-suite", "configs/demo/fmnist_probe.yaml",
           "ckpt=random", "protocols=linear", "linear.epochs=5", "linear.lr_grid=1e-9,1e-2",
           "linear.folds=3", f"out={tmp_path}", "trainer.threads=1", *TINY]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [r for r in json.loads((tmp_path / "results.json").read_text())["rows"]
            if r["protocol"] == "linear"]  # fmt: skip
    assert [r["weights"] for r in rows] == ["random", "input", "input_flat"]
    for r in rows:
        assert r["folds"] == 3 and set(r["lr_cv"]) == {"1e-09", "0.01"}
        best = max(r["lr_cv"], key=lambda k: r["lr_cv"][k])
        assert r["lr"] == float(best) and r["lr"] in (1e-9, 1e-2)
    # trainer.threads reaches the frozen protocols too (torch's default of a thread per core made
    # the probes' small ops crawl on a busy machine), said once
    assert out.stdout.count("[unipred] 1 torch thread(s)") == 1, out.stdout
    assert "3-fold CV" in out.stdout and "(3-fold CV of 2)" in (tmp_path / "results.md").read_text()
