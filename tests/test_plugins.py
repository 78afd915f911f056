"""External plugins: a package that declares a ``unipred.plugins`` entry point is found by
``unipred list`` and trained by ``unipred fit``; a plugin that fails to import breaks nothing
until it is used, and then fails in one line naming it.

The toy plugin package (tests/plugin_pkg: a tokenizer, a task and a model size, plus a second
entry point to a module that raises on import) is pip-installed into a throwaway environment
that reuses this environment's packages, so this environment is never changed."""

import csv
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = Path(__file__).resolve().parent / "plugin_pkg"


def plugin_env(tmp_path: Path, throwaway_env) -> Path:
    """A fresh venv seeing this environment's packages (unipred included, editable or not),
    with the toy plugin installed into it alone. Returns its python."""
    py = throwaway_env(f"import site; site.addsitedir({str(throwaway_env.site_packages)!r})")
    src = tmp_path / "plugin_src"  # a copy: the build must not litter tests/ with build files
    shutil.copytree(PKG, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    r = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation",
         str(src)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return py


def _unipred(py: Path, args: list[str], cwd: Path, **extra: str):
    code = "import sys; from unipred.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | extra
    return subprocess.run(
        [str(py), "-c", code, *args], cwd=cwd, env={**env, "PYTHONSAFEPATH": "1"},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def _fit_logged(py: Path, config: str, work: Path, key: str):
    """`unipred fit` of the plugin's configs/CONFIG.yaml -> (process, logged values of key)."""
    run = work / config
    fit = _unipred(py, ["fit", str(PKG / "configs" / f"{config}.yaml"), f"run_dir={run}",
                        "seed=3"], work)  # fmt: skip
    assert fit.returncode == 0, (fit.stdout + fit.stderr)[-3000:]
    rows = list(csv.DictReader(open(next(run.glob("logs/version_*/metrics.csv")))))
    return fit, [float(r[key]) for r in rows if r.get(key)]


def test_an_installed_plugin_is_listed_and_trained_and_a_broken_one_fails_only_when_used(
    tmp_path, throwaway_env
):
    py = plugin_env(tmp_path, throwaway_env)
    work = tmp_path / "work"  # an unrelated folder: nothing is found through the cwd
    work.mkdir()

    # 1. `unipred list` shows the plugin's registrations next to the built-in ones, and names
    #    the broken plugin without failing; the same listing whether the built-in plugins come
    #    from their manifest (an installed release: only the entry points are imported) or are
    #    imported, each from an empty cache
    fresh = {"UNIPRED_PLUGIN_MANIFEST": "0", "UNIPRED_CACHE": str(tmp_path / "c0")}
    out = _unipred(py, ["list"], work, **fresh)
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("toy_wave", "toy_pretrain", "toy_classify", "toy_segment", "nepa_toy",
                 "image_pretrain", "nepa_debug"):  # fmt: skip
        assert f"  {name} " in out.stdout, (name, out.stdout)
    assert "unipred_toy.broken" in out.stdout and "RuntimeError" in out.stdout, out.stdout
    fresh = {"UNIPRED_PLUGIN_MANIFEST": "1", "UNIPRED_CACHE": str(tmp_path / "c1")}
    manifest = _unipred(py, ["list"], work, **fresh)
    assert manifest.returncode == 0 and manifest.stdout == out.stdout

    # 2. `unipred fit` trains it end to end from its own config: 4 optimizer steps + validation
    run = work / "run"
    cfg = PKG / "configs" / "toy_pretrain.yaml"
    fit = _unipred(py, ["fit", str(cfg), f"run_dir={run}", "seed=3"], work)
    assert fit.returncode == 0, (fit.stdout + fit.stderr)[-3000:]
    assert (run / "checkpoints" / "last.ckpt").is_file()
    rows = list(csv.DictReader(open(next(run.glob("logs/version_*/metrics.csv")))))
    train = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert len(train) == 4 and val and all(math.isfinite(x) for x in train + val), rows

    # 3. what only the broken plugin could provide fails in one line that names it
    bad = _unipred(py, ["fit", str(cfg), "task=toy_broken_task", f"run_dir={work / 'bad'}"], work)
    assert bad.returncode == 2, bad.stderr[-3000:]
    lines = [ln for ln in bad.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in bad.stderr, bad.stderr[-3000:]
    assert "task='toy_broken_task' is not one of the choices" in lines[0]
    assert (
        "plugin unipred_toy.broken failed to load: RuntimeError: the toy broken plugin"
        in (lines[0])
    )


# two more engine runs; every generic objective is run on every built-in modality by the
# default suite (tests/test_generic_objectives.py, tests/test_segment.py)
@pytest.mark.slow
def test_the_generic_probe_and_segmentation_objectives_run_on_a_plugins_data(
    tmp_path, throwaway_env
):
    py = plugin_env(tmp_path, throwaway_env)
    work = tmp_path / "work"
    work.mkdir()
    # the generic classification objective on the plugin's data source (the plugin has no task
    # code): a linear probe, only the probe head trains
    fit, acc = _fit_logged(py, "toy_probe", work, "val/acc1")
    assert len(acc) == 2 and all(0 <= a <= 1 for a in acc), acc
    frozen = [ln.split()[-1] for ln in fit.stdout.splitlines() if ln.split()[:1] == ["frozen"]]
    assert frozen and int(frozen[0]) > 0, fit.stdout[-3000:]  # the backbone's tensors
    # the generic segmentation objective on the plugin's 1-D tokenizer: per-sample labels
    _, miou = _fit_logged(py, "toy_segment", work, "val/mIoU")
    assert len(miou) == 2 and all(0 <= m <= 1 for m in miou), miou


def test_a_size_used_with_another_tokenizer_takes_that_tokenizers_coord_dims_and_no_args():
    """``nepa_debug`` (an image size, patch_size 4) with a 1-D tokenizer: the printed config
    says coord_dims 1 and passes none of the image tokenizer's arguments to the new one."""
    from unipred.train.config import build_model_config, explain, load_config

    cfg = load_config(None, ["task=debug_image_pretrain", "model.tokenizer=audio_frames"])
    mc = build_model_config(cfg.model)
    assert mc.tokenizer == "audio_frames" and mc.tokenizer_args == {}
    assert mc.predictor.coord_dims == 1
    assert "#   coord_dims: 1" in explain(cfg)
    # the size's own tokenizer keeps its arguments
    mc = build_model_config(load_config(None, []).model)
    assert mc.tokenizer_args == {"patch_size": 4} and mc.predictor.coord_dims == 2


def test_tokenizer_contract_errors_are_one_line():
    from unipred.nn.model import build_tokenizer

    with pytest.raises(TypeError, match=r"tokenizer 'image' with model.tokenizer_args=\{'n_mels'"):
        build_tokenizer("image", 32, {"n_mels": 64})


def test_a_classify_task_without_a_class_count_fails_naming_the_key():
    from unipred import ClassifyTask
    from unipred.train.config import ConfigError, load_config

    cfg = load_config(None, ["task=debug_image_classify", "data.num_classes=0"])
    cfg.data.num_classes = 0  # load_config fills it from the data; a plugin may not have any

    class NoCount(ClassifyTask):  # the shipped base class, as a plugin would subclass it
        pass

    with pytest.raises(ConfigError, match="set data.num_classes"):
        NoCount(cfg).num_classes()
    cfg.data.num_classes = 7
    assert NoCount(cfg).num_classes() == 7
