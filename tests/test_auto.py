"""model.objective.auto: the objective chosen from the data's sizes (unipred/task/auto.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from unipred.base.registry import TASKS
from unipred.task.auto import CHOSEN_KEYS, DataScale, choose, token_grid
from unipred.train.config import load_config


def _folder(root, size, classes=2, per_class=3):
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            a = rng.integers(0, 255, (size, size), dtype=np.uint8)
            Image.fromarray(a, mode="L").save(root / f"c{c}" / f"{i}.png")
    return root


def test_the_choice_follows_the_data_scale_and_keeps_explicit_keys():
    keys, line = choose(DataScale(5000, 25, batch=128), set())
    assert keys == {"target_norm": "instance", "head": "mlp", "horizon": 10,
                    "loss": "infonce_batch"}  # fmt: skip
    assert "5,000 training samples, 25 tokens per sample" in line and "small data" in line
    assert "(3200 tokens a batch)" in line
    assert choose(DataScale(5000, 9), set())[0]["horizon"] == 6  # two rows of a 3 x 3 grid
    assert choose(DataScale(5000, 64), set())[0]["horizon"] == 16  # capped
    assert choose(DataScale(5000, 2), set())[0]["horizon"] == 1  # no target two steps ahead
    # infonce_batch's (batch x tokens)^2 logits: above the bound (64 px, patch 4: 256 tokens x
    # 128), or with the batch unknown, the cosine stays, and the line says why
    keys, line = choose(DataScale(5000, 256, batch=128), set())
    assert "loss" not in keys
    assert "a batch of 32768 tokens is above the 8192" in line
    assert "loss" not in choose(DataScale(5000, 25), set())[0]
    assert "loss" not in choose(DataScale(5000, 25, batch=128), {"loss"})[0]
    keys, line = choose(DataScale(1_281_167, 256), set())
    assert keys == {} and "the release objective" in line
    assert choose(DataScale(None, 256), set())[0] == {}  # a streamed set counts as large
    keys, line = choose(DataScale(5000, 25), {"horizon"})
    assert "horizon" not in keys and "kept your horizon" in line


@pytest.mark.parametrize(
    "recipe, overrides, x, grid, horizon",
    [("small/pretrain", ["data.root={tmp}"], (1, 1, 20, 20), (5, 5), 10),  # 2 rows of 5
     ("video/demo_pretrain", [], (1, 3, 8, 32, 32), (4, 4, 4), 8),  # 2 rows of 4 (t, y, x)
     ("audio/digits_pretrain", [], (1, 16000), (12,), 3)],  # full-band tokens: time only
)  # fmt: skip
def test_the_horizon_is_read_from_each_builtin_tokenizers_token_grid(
    tmp_path, recipe, overrides, x, grid, horizon
):
    root = _folder(tmp_path / "d", size=20) if overrides else None  # the image recipe's folder
    cfg = load_config(recipe, [o.format(tmp=root) for o in overrides]
                      + ["model.objective.auto=false"])  # fmt: skip
    tok = TASKS.get(cfg.task)(cfg).build_model().tokenizer
    with torch.no_grad():
        out = tok(torch.zeros(x))
    assert token_grid(out.coords, out.valid) == grid
    n = out.tokens.shape[1]
    keys, line = choose(DataScale(2000, n, batch=16, grid=grid), set())
    assert keys["horizon"] == horizon
    assert ("one axis" in line) == (len(grid) == 1)


def test_token_grid_orders_the_fastest_axis_last_and_refuses_what_is_not_a_grid():
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, 3), torch.linspace(-1, 1, 7), indexing="ij")
    raster = torch.stack([ys.flatten(), xs.flatten()], 1)  # x changes fastest: rows of 7
    assert token_grid(raster) == (3, 7)
    column = torch.stack([ys.t().flatten(), xs.t().flatten()], 1)  # y fastest: rows of 3
    assert token_grid(column) == (7, 3)
    assert choose(DataScale(100, 21, grid=(7, 3)), set())[0]["horizon"] == 6
    assert token_grid(raster[:-1]) == ()  # a grid with a token missing
    assert token_grid(raster[None]) == (3, 7)  # (1, N, k) coordinates
    valid = torch.ones(1, 24, dtype=torch.bool)
    valid[0, 21:] = False  # padded tokens after the real ones are left out
    padded = torch.cat([raster, torch.zeros(3, 2)])
    assert token_grid(padded, valid) == (3, 7)
    assert token_grid(padded) == ()


def test_small_pretrain_reads_the_sizes_prints_one_line_and_records_the_choice(tmp_path, capsys):
    root = _folder(tmp_path / "d", size=20)  # 20 px, patch 4: 25 tokens
    cfg = load_config("small/pretrain", [f"data.root={root}", "model.objective.horizon=3"])
    model = TASKS.get(cfg.task)(cfg).build_model()
    o = model.cfg.objective
    assert (o.target_norm, o.head, o.horizon, o.auto) == ("instance", "mlp", 3, False)
    assert o.loss == "infonce_batch"  # the recipe's batch of 128 x 25 tokens
    out = capsys.readouterr().out
    assert out.count("model.objective.auto:") == 1
    assert "6 training samples, 25 tokens per sample" in out and "kept your horizon" in out
    # written into the run config: a rebuild (resume, export) needs no data and says nothing
    assert cfg.model.objective.auto is False and cfg.model.objective.target_norm == "instance"
    assert cfg.model.objective.loss == "infonce_batch"
    TASKS.get(cfg.task)(cfg).build_model()
    assert "model.objective.auto" not in capsys.readouterr().out


def test_discrete_tokens_choose_the_fixed_one_hot_target(capsys):
    keys, line = choose(DataScale(16000, 64, discrete=True), set())
    assert keys == {"target": "patch"} and "discrete tokens" in line
    assert choose(DataScale(None, 64, discrete=True), set())[0] == {"target": "patch"}
    assert choose(DataScale(16000, 64, discrete=True), {"target"})[0] == {}
    # batch negatives when the batch's tokens fit the bound (the text recipe's 64 x 64), and the
    # line says so; above the bound, or with the loss set explicitly, the target only
    keys, line = choose(DataScale(16000, 64, discrete=True, batch=64), set())
    assert keys == {"target": "patch", "loss": "infonce_batch"} and "4096 tokens a batch" in line
    assert choose(DataScale(16000, 64, discrete=True, batch=256), set())[0] == {"target": "patch"}
    assert choose(DataScale(16000, 64, discrete=True, batch=64), {"loss"})[0] == {"target": "patch"}
    # the text tokenizer says it is discrete; the choice reaches the built model and the config
    cfg = load_config("text/pretrain", ["data.corpus=''", "data.generated_per_class=4",
                                        "data.generated_val_per_class=2",
                                        "model.name=nepa_text_debug", "model.objective.auto=true",
                                        "model.objective.target=embedding"])  # fmt: skip
    cfg.model.objective.target = None  # as a config that leaves the target unset
    model = TASKS.get(cfg.task)(cfg).build_model()
    assert model.cfg.objective.target == "patch" and cfg.model.objective.target == "patch"
    out = capsys.readouterr().out
    assert "16 training samples" in out and "discrete tokens -> target=patch" in out


def test_every_key_the_choice_can_set_is_written_back_into_the_run_config():
    scales = [DataScale(5000, 25, batch=128), DataScale(5000, 256, batch=128),
              DataScale(1_281_167, 256), DataScale(16000, 64, discrete=True)]  # fmt: skip
    for scale in scales:
        assert set(choose(scale, set())[0]) <= set(CHOSEN_KEYS), scale
