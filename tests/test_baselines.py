"""Baselines beside every evaluation: random-init backbone, raw input, the source's own."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from unipred.protocols.baselines import flatten_patches, raw_features
from unipred.task import DataSource


def test_a_data_source_has_no_modality_baselines_by_default():
    src = DataSource(cfg=None, objective="classify")
    assert src.baseline_scores([(0, 1)], [(0, 1)]) == {}


# eval_defaults.features.block=null: the recipe reads block 3 of the demo model's 6; this model has 2
TINY = ["model.predictor.dim=32", "model.predictor.depth=2", "model.predictor.heads=2", "eval_defaults.features.block=null",
        "data.root=''", "data.generated_samples=48", "trainer.progress_bar=false",
        "trainer.precision=32-true", "trainer.accelerator=cpu"]  # fmt: skip


def test_raw_patches_flatten_and_shrink_above_the_budget():
    p = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(2, 4, 6)
    assert torch.equal(flatten_patches(p, 0), p.reshape(2, 24))
    assert torch.equal(flatten_patches(p, 24), p.reshape(2, 24))
    small = flatten_patches(p, 12)  # 4 tokens x 3 values: each patch averaged in pairs
    assert small.shape == (2, 12)
    assert torch.allclose(small[0, :3], torch.tensor([0.5, 2.5, 4.5]))


def test_raw_features_pad_shorter_samples_and_name_a_tokenizer_without_patches():
    from unipred.protocols import ProtocolError

    class Toy:
        def eval(self):
            return self

        def patches(self, x):
            return x  # the batch already is (B, N, P)

    batches = [(torch.ones(2, 3, 2), torch.tensor([0, 1])), (torch.ones(1, 1, 2), [1])]
    f = raw_features(Toy(), batches, inputs=lambda b: b[0])
    assert f.pooled.shape == (3, 6) and f.labels.tolist() == [0, 1, 1]
    assert f.pooled[2].tolist() == [1, 1, 0, 0, 0, 0]  # zero-padded to the longest

    class NoPatches(Toy):
        patches = None

    with pytest.raises(ProtocolError, match="NoPatches has no patches"):
        raw_features(NoPatches(), batches, inputs=lambda b: b[0])


def test_eval_prints_random_init_and_raw_input_rows_beside_the_backbone(tmp_path):
    """The shipped CLI as a user runs it: `unipred eval protocol=knn` on a random backbone
    (the fastest checkpoint there is) prints the raw-input rows; evaluate-suite writes them."""
    cmd = [
        sys.executable,
        "-m",
        "unipred.cli",
        "evaluate-suite",
        "configs/demo/fmnist_probe.yaml",
        "ckpt=random",
        "protocols=knn,linear",
        "linear.epochs=2",
        f"out={tmp_path}",
        *TINY,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "baselines (baselines=false skips them)" in out.stdout
    res = json.loads((tmp_path / "results.json").read_text())
    got = [(r["protocol"], r["weights"]) for r in res["rows"]]
    # ckpt=random is itself the random-init baseline: not repeated
    assert got == [("knn", "random"), ("linear", "random"), ("knn", "input"), ("linear", "input"),
                   ("knn", "input_flat"), ("linear", "input_flat")]  # fmt: skip
    raw, flat = res["rows"][2], res["rows"][4]
    # the raw patches through the backbone's read-out (the recipe's eval_defaults: a 4 x 4 grid,
    # every 7 x 7 pixel patch in place), and flattened (Fashion-MNIST's 28 x 28 pixels)
    assert raw["dim"] == 16 * 7 * 7 and flat["dim"] == 28 * 28
    assert 0.0 <= raw["top1_pct"] <= 100.0
    assert res["units"] == {"top1_pct": "%", "top5_pct": "%"} and "top1" not in raw
    assert "| linear | input |" in (tmp_path / "results.md").read_text()
    off = subprocess.run([*cmd, "baselines=false"], capture_output=True, text=True, timeout=300)
    assert off.returncode == 0 and "baselines" not in off.stdout


def test_a_data_sources_own_baselines_are_rows_with_the_label_budget(monkeypatch):
    """DataSource.baseline_scores gets the protocols' items (training list cut to the budget)
    and each name becomes a row; a value outside [0, 1] is one clear error."""
    from unipred.base.registry import TASKS
    from unipred.protocols import EvalSettings, ProtocolError
    from unipred.protocols.baselines import run_source
    from unipred.train.config import load_config

    cfg = load_config("configs/demo/fmnist_probe.yaml", [*TINY, "data.labels_per_class=2"])
    source = TASKS.get(cfg.task).data_class
    seen = {}

    def scores(self, train, test):
        seen.update(train=len(train), test=len(test), label=type(train[0][1]))
        return {"majority": 0.25, "bad": seen.get("bad", 0.5)}

    monkeypatch.setattr(source, "baseline_scores", scores, raising=False)
    rows = run_source(cfg, EvalSettings(), log=lambda *_: None)
    assert [(r["protocol"], r["weights"], r["top1"]) for r in rows] == [
        ("majority", "data", 0.25), ("bad", "data", 0.5)]  # fmt: skip
    assert seen["train"] == 2 * 10 and seen["label"] is int
    seen["bad"] = 25.0  # a percentage where a fraction is due
    with pytest.raises(ProtocolError, match=r"\['bad'\] = 25.0"):
        run_source(cfg, EvalSettings(), log=lambda *_: None)


@pytest.mark.slow  # five unipred subprocesses (~1 min on 2 shared cores)
def test_compare_writes_one_table_of_every_system(tmp_path):
    """`unipred compare` as a user runs it, on the generated Fashion-MNIST stand-in: one
    pretraining, NEPA and scratch fine-tunes, the frozen protocols with their baselines."""
    small = ["trainer.global_batch=8", "data.repeat=1"]  # 1 epoch of 30 images, then validated
    cmd = [sys.executable, "-m", "unipred.cli", "compare", *TINY, "--labels", "3",
           "--seeds", "0", "--out", str(tmp_path),
           "--pretrain-config", "configs/demo/fmnist_pretrain.yaml",
           "--finetune-config", "configs/demo/fmnist_finetune.yaml",
           "--probe-config", "configs/demo/fmnist_probe.yaml", "--set-probe", "linear.epochs=2",
           "--set-pretrain=trainer.max_steps=2", *(f"--set-pretrain={o}" for o in small), *(f"--set-finetune={o}" for o in small)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    res = json.loads((tmp_path / "results.json").read_text())
    row = res["rows"]["3"]
    want = {"ft_nepa", "ft_scratch", "knn_raw", "knn_random", "knn_input", "linear_raw",
            "linear_random", "linear_input", "knn_input_flat", "linear_input_flat"}  # fmt: skip
    assert set(row) == want and res["units"] == "percent top-1"
    assert all(0 <= c["mean"] <= 100 and len(c["seeds"]) == 1 for c in row.values())
    md = (tmp_path / "results.md").read_text()
    assert "| NEPA fine-tune | scratch fine-tune | NEPA k-NN | random-init k-NN |" in md
    # a second call reuses every finished run
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "done (0 s)" in again.stdout
    bad = subprocess.run([*cmd[:4], "data.root"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "'data.root' is not key=value" in bad.stderr


def test_compare_reads_every_row_of_a_suite_and_tabulates_percentages(tmp_path):
    from unipred.protocols.compare import _cell, frozen_scores, table

    rows = [{"protocol": "knn", "weights": "raw", "top1": 0.5},
            {"protocol": "knn", "weights": "random", "top1": 0.25},
            {"protocol": "linear", "weights": "input", "top1": 0.75},
            {"protocol": "char-nb", "weights": "data", "top1": 0.8, "top5": None}]  # fmt: skip
    (tmp_path / "results.json").write_text(json.dumps({"rows": rows}))  # an earlier release's
    got = frozen_scores(tmp_path)
    assert got == {"knn_raw": 0.5, "knn_random": 0.25, "linear_input": 0.75, "char-nb": 0.8}
    from unipred.protocols.report import with_percent

    (tmp_path / "results.json").write_text(json.dumps(with_percent({"rows": rows})))  # percent
    assert frozen_scores(tmp_path) == got
    cell = _cell([0.5, 0.6, 0.7])
    assert cell == {"mean": 60.0, "min": 50.0, "max": 70.0, "seeds": [50.0, 60.0, 70.0]}
    md = table({10: {"knn_raw": cell}}, [("knn_raw", "NEPA k-NN"), ("ft_nepa", "NEPA ft")])
    assert "| 10 | 60.0 % (50.0-70.0) | - |" in md


def test_train_and_val_of_different_lengths_flatten_to_one_width():
    """Variable-length samples (audio): both splits are padded to the longest of either, so a
    k-NN can compare them (a split padded alone had another width)."""
    from unipred.protocols.baselines import flatten_chunks

    train = [torch.ones(2, 5, 3)]
    val = [torch.ones(2, 7, 3)]
    y = torch.tensor([0, 1])
    a, b = flatten_chunks(train, y, 7, 0), flatten_chunks(val, y, 7, 0)
    assert a.pooled.shape == b.pooled.shape == (2, 21)
    assert flatten_chunks(val, y, 7, 14).pooled.shape == (2, 14)  # 7 tokens x 2 values


def test_the_raw_row_reads_the_patches_through_the_backbones_read_out():
    """Raw patches pooled as the backbone's tokens are: a word said later in a clip (the same
    patches shifted in time) gives the same mean and the same grid cells of its own span, while
    the flattened view, position by position, does not; padded patches enter no cell."""
    from unipred.protocols.baselines import pooled_chunks

    word = torch.randn(1, 4, 3)
    early = torch.cat([word, torch.zeros(1, 2, 3)], 1)  # the word, then 2 padded steps
    late = torch.cat([torch.full((1, 2, 3), -5.0), word], 1)  # 2 steps of silence first
    valid = torch.tensor([[True] * 4 + [False] * 2, [False] * 2 + [True] * 4])
    coords = torch.linspace(-1, 1, 6)[:, None]  # one time axis
    # the late clip's real tokens are its last 4: its own span is cut into cells
    rows, views, y = [torch.cat([early, late])], [(valid, coords)], torch.tensor([0, 0])
    for pool, cells, width in (("mean", 1, 3), ("grid", 2, 6), ("last", 2, 3)):
        f = pooled_chunks(rows, views, y, pool, cells, "none", 0).pooled
        assert f.shape == (2, width) and torch.allclose(f[0], f[1], atol=1e-6), pool
    assert torch.allclose(f[0], word[0, -1])
    both = pooled_chunks(rows, views, y, "mean+last", 1, "none", 0).pooled  # side by side
    mean_then_last = torch.cat([word[0].mean(0), word[0, -1]])
    assert both.shape == (2, 6) and torch.allclose(both[0], mean_then_last)
    flat = flatten_patches(rows[0], 0)
    assert not torch.allclose(flat[0], flat[1])
    # above raw.max_dim each cell is averaged down, as the flattened patches are
    assert pooled_chunks(rows, views, y, "grid", 2, "none", 4).pooled.shape == (2, 4)


def test_per_sample_standardisation_cancels_a_samples_own_offset_and_uses_no_other_sample():
    from unipred.protocols.features import normalise_tokens

    torch.manual_seed(0)
    x = torch.randn(3, 5, 4)
    valid = torch.ones(3, 5, dtype=torch.bool)
    valid[1, 3:] = False
    level = x + 7.0  # a louder clip: every value shifted alike
    spectrum = x + torch.tensor([1.0, -2.0, 3.0, 0.5])  # a voice: each feature shifted
    for norm, shifted, kept in (("sample", level, spectrum), ("feature", spectrum, None)):
        a, b = normalise_tokens(x, valid, norm), normalise_tokens(shifted, valid, norm)
        assert torch.allclose(a[valid], b[valid], atol=1e-5), norm
        if kept is not None:  # a per-feature offset survives the per-sample level
            assert not torch.allclose(a[valid], normalise_tokens(kept, valid, norm)[valid])
    # padded tokens enter no statistic: the real tokens alone give the same result
    f = normalise_tokens(x, valid, "feature")
    alone = normalise_tokens(x[1:2, :3], None, "feature")
    assert torch.allclose(f[1, :3], alone[0], atol=1e-5)
    assert torch.allclose(f[1, :3].mean(0), torch.zeros(4), atol=1e-5)
    # a sample's result does not depend on the other samples of its batch
    assert torch.allclose(normalise_tokens(x[:1], valid[:1], "sample"),
                          normalise_tokens(x, valid, "sample")[:1])  # fmt: skip
    assert torch.equal(normalise_tokens(x, valid, "none"), x)


def test_eval_norm_and_pool_reach_the_raw_row_and_bad_combinations_are_one_line():
    from unipred.protocols import ProtocolError
    from unipred.protocols.baselines import run_raw
    from unipred.protocols.settings import parse_eval_settings
    from unipred.train.config import load_config

    cfg = load_config("configs/demo/fmnist_probe.yaml", [*TINY, "data.labels_per_class=2"])
    s = parse_eval_settings(["features.pool=grid", "features.grid=2", "features.norm=feature",
                             "raw.flat=false", "linear.epochs=2"])  # fmt: skip
    rows = run_raw(cfg, s, log=lambda *_: None)
    assert [(r["protocol"], r["weights"], r["dim"]) for r in rows] == [
        ("knn", "input", 4 * 49),
        ("linear", "input", 4 * 49),
    ]  # 2 x 2 cells of 7 x 7 pixels
    with pytest.raises(ProtocolError, match="features.norm=feature with features.pool=mean"):
        parse_eval_settings(["features.norm=feature"])
    with pytest.raises(ProtocolError, match="features.norm='cmvn'"):
        parse_eval_settings(["features.norm=cmvn"])
