"""Typed config: YAML + overrides, strict errors that name the key, early path checks,
recipe invariance (global batch -> accumulation, lr rule), and every YAML in configs/ loads."""

from pathlib import Path

import pytest

from unipred.cli import main
from unipred.train.config import ConfigError, RecipeError, build_model_config, load_config
from unipred.train.engine import batch_plan

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/debug/image_nepa_tiny.yaml"
ALL_YAMLS = sorted((ROOT / "configs").rglob("*.yaml")) + sorted((ROOT / "configs").rglob("*.yml"))


def _bases() -> set[Path]:
    """YAMLs that other YAMLs include via ``_base_``: fragments, tested through their users."""
    from omegaconf import OmegaConf

    out = set()
    for p in ALL_YAMLS:
        b = OmegaConf.load(p).get("_base_")
        for ref in [b] if isinstance(b, str) else list(b or []):
            out.add((p.parent / ref).resolve())
    return out


BASES = _bases()


@pytest.mark.parametrize("path", ALL_YAMLS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_in_configs_loads(path):
    if path.resolve() in BASES and "task" not in path.read_text():
        pytest.skip("a _base_ fragment without a task; loaded through the files that include it")
    cfg = load_config(path, check_paths=False)
    assert cfg.task
    build_model_config(cfg.model)  # the model section names a real size and valid fields
    batch_plan(cfg)  # and the batch arithmetic works at its own device count


def test_there_are_yamls():
    assert TINY in ALL_YAMLS


def test_overrides_and_types():
    cfg = load_config(
        TINY,
        [
            "optim.blr=1e-3",
            "trainer.global_batch=32",
            "model.predictor.depth=3",
            "optim.betas=[0.9,0.999]",
        ],
    )
    assert cfg.optim.blr == 1e-3 and cfg.trainer.global_batch == 32
    assert cfg.optim.betas == [0.9, 0.999]
    mc = build_model_config(cfg.model)
    assert mc.predictor.depth == 3 and mc.predictor.dim == 64 and mc.head is None
    assert type(cfg.data).__name__ == "DebugImageData" and cfg.data.image_size == 32


@pytest.mark.parametrize(
    "override, needle",
    [
        ("optim.lrr=1", "did you mean 'optim.lr'"),
        ("trainr.devices=2", "did you mean 'trainer'"),
        ("model.predictor.dept=3", "did you mean 'model.predictor.depth'"),
        ("data.image_sise=3", "did you mean 'data.image_size'"),
    ],
)
def test_unknown_key_names_the_closest(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(TINY, [override])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="trainer.global_batch"):
        load_config(TINY, ["trainer.global_batch=many"])


def test_unknown_task_is_named():
    with pytest.raises(ConfigError, match="debug_image_pretrain"):
        load_config(TINY, ["task=debug_image_pretrian"])


def test_missing_data_path_fails_early(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=f"data.root: path does not exist: {missing}"):
        load_config(TINY, [f"data.root={missing}"])
    # remote and brace patterns are not checked on disk
    load_config(TINY, ["data.root=/x/train-{000000..000009}.tar"])
    load_config(TINY, ["data.root=pipe:curl -s http://host/a.tar"])


def test_base_includes(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text(f"_base_: {TINY}\ntrainer:\n  global_batch: 8\n")
    cfg = load_config(child)
    assert cfg.trainer.global_batch == 8 and cfg.task == "debug_image_pretrain"


def test_a_base_may_name_a_packaged_recipe(tmp_path):
    """Your own YAML that starts from a shipped recipe, from any folder: `_base_: small/pretrain`
    was "config file not found: small/pretrain" (only paths beside the file were read)."""
    mine = tmp_path / "mine.yaml"
    mine.write_text("_base_: small/pretrain\ntrainer:\n  global_batch: 8\n")
    cfg = load_config(mine, check_paths=False)
    assert cfg.task == "image_pretrain" and cfg.trainer.global_batch == 8
    assert cfg.model.objective.auto  # the recipe's own value, through its base.yaml
    (tmp_path / "small").mkdir()  # a file beside it wins over the packaged recipe
    (tmp_path / "small" / "pretrain.yaml").write_text("task: debug_image_pretrain\n")
    mine.write_text("_base_: small/pretrain.yaml\n")
    assert load_config(mine, check_paths=False).task == "debug_image_pretrain"
    bad = tmp_path / "bad.yaml"
    bad.write_text("_base_: small/pretrian\n")
    with pytest.raises(
        ConfigError, match=r"bad.yaml: _base_: small/pretrian: no file .* no packaged"
    ):
        load_config(bad, check_paths=False)


def test_cli_exits_nonzero_with_the_key(capsys):
    assert main(["fit", str(TINY), "optim.weight_decy=0.1"]) == 2
    err = capsys.readouterr().err
    assert "optim.weight_decy" in err and "optim.weight_decay" in err
    assert main(["fit", str(TINY), "--print-config"]) == 0
    assert "global_batch: 16" in capsys.readouterr().out


def test_recipe_invariance():
    cfg = load_config(
        TINY,
        [
            "trainer.global_batch=4096",
            "trainer.per_device_batch=256",
            "trainer.devices=8",
            "trainer.num_nodes=1",
            "optim.blr=3e-4",
        ],
    )
    plan = batch_plan(cfg)
    assert plan["accumulate_grad_batches"] == 2 and plan["lr"] == pytest.approx(4.8e-3)
    cfg.trainer.devices, cfg.trainer.num_nodes = 8, 2
    assert batch_plan(cfg)["accumulate_grad_batches"] == 1
    cfg.trainer.per_device_batch = None  # no per-device batch: no accumulation
    cfg.trainer.devices, cfg.trainer.num_nodes = 4, 1
    assert batch_plan(cfg)["per_device_batch"] == 1024
    cfg.trainer.per_device_batch, cfg.trainer.devices = 256, 3
    with pytest.raises(RecipeError, match="not a multiple"):
        batch_plan(cfg)
    cfg = load_config(TINY, ["optim.lr=0.01"])
    assert batch_plan(cfg)["lr"] == 0.01  # an absolute lr overrides the scaling rule


def test_model_section_overrides():
    cfg = load_config(
        TINY,
        [
            "model.head=mean",
            "model.num_classes=7",
            "model.predictor.layerscale=0",
            "model.tokenizer_args={patch_size: 8}",
        ],
    )
    mc = build_model_config(cfg.model)
    assert mc.head == "mean" and mc.num_classes == 7 and mc.predictor.layerscale is None
    assert mc.tokenizer_args["patch_size"] == 8


def test_choice_options_fail_at_load_time():
    with pytest.raises(ConfigError, match="optim.name: 'lamb' is not one of adamw, lars"):
        load_config(TINY, ["optim.name=lamb"])
    with pytest.raises(ConfigError, match="optim.schedule"):
        load_config(TINY, ["optim.schedule=linear"])
    assert load_config(TINY, ["optim.name=lars"]).optim.name == "lars"
