"""What a fresh install promises: the lock matches pyproject, the image path needs no audio or
video library, a broken plugin breaks nothing else, and the built wheel works from any folder."""

import importlib.util
import os
import re
import subprocess
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _lock_module():
    spec = importlib.util.spec_from_file_location("lockfile", ROOT / ".ci" / "lock.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_lock_agrees_with_pyproject_and_catches_drift(tmp_path, monkeypatch, capsys):
    lock = _lock_module()
    assert lock.check() == 0
    pins = lock.pins()
    for name in ("torch", "torchvision", "torchaudio", "torchcodec", "lightning", "ruff", "pip"):
        assert name in pins, f"{name} is not pinned in requirements.lock"
    # a lock whose torch falls outside pyproject's range, or that lacks a package, must fail
    text = (ROOT / "requirements.lock").read_text()
    bad = tmp_path / "requirements.lock"
    bad.write_text(text.replace(f"torch=={pins['torch']}", "torch==2.0.0"))
    monkeypatch.setattr(lock, "LOCK", bad)
    assert lock.check() == 1
    assert "torch==2.0.0" in capsys.readouterr().err
    bad.write_text(text.replace(f"einops=={pins['einops']}", "xeinops==0.1"))
    assert lock.check() == 1
    assert "einops: required by pyproject.toml but not in" in capsys.readouterr().err


def test_lock_install_takes_the_heavy_wheels_one_at_a_time_and_refuses_a_full_disk(
    monkeypatch, capsys
):
    """`make` installs through `.ci/lock.py install`: torch's CUDA wheels each in its own pip call
    (no cache, hashes checked, every package of the lock covered), then the whole lock; a disk
    that cannot hold the environment gets one clear line before pip starts."""
    import shutil
    import subprocess as sp

    lock = _lock_module()
    calls = []

    def fake_run(cmd, **kw):
        req = Path(cmd[cmd.index("-r") + 1])
        calls.append((cmd, req.read_text()))
        return sp.CompletedProcess(cmd, 0)

    monkeypatch.setattr(lock.subprocess, "run", fake_run)
    usage = shutil.disk_usage(ROOT)
    monkeypatch.setattr(lock.shutil, "disk_usage", lambda p: usage._replace(free=int(50e9)))
    assert lock.install() == 0
    names = [lock.canonicalize_name(text.split("==")[0]) for _, text in calls[:-1]]
    assert "torch" in names and "nvidia-cudnn-cu13" in names and "triton" in names
    assert "einops" not in names
    for cmd, _ in calls:
        assert "--no-cache-dir" in cmd and "--require-hashes" in cmd
    for cmd, text in calls[:-1]:
        assert "--no-deps" in cmd and text.count("==") == 1 and "--hash=sha256:" in text
    assert calls[-1][0][-1] == str(lock.LOCK)  # the whole lock last
    assert set(names) | {n for n in lock.pins() if not lock.HEAVY.match(n)} == set(lock.pins())
    # a disk with 2 GB free: refused, nothing run
    calls.clear()
    monkeypatch.setattr(lock.shutil, "disk_usage", lambda p: usage._replace(free=int(2e9)))
    assert lock.install() == 1
    assert calls == []
    assert "not enough disk for the environment: 2.0 GB free" in capsys.readouterr().err


# what an image user's environment lacks: the audio, video and plot extras
EXTRA_FILES = ("torchaudio", "torchcodec", "matplotlib", "mpl_toolkits", "pylab", "skvideo",
               "scikit_video")  # fmt: skip


def env_without_extras(tmp_path: Path, throwaway_env) -> Path:
    """A fresh interpreter whose packages are this environment's minus the optional extras (as
    if installed without them), unipred included as installed here. Returns its python."""
    filtered = tmp_path / "site"
    filtered.mkdir()
    for entry in throwaway_env.site_packages.iterdir():
        if not entry.name.startswith(EXTRA_FILES):
            (filtered / entry.name).symlink_to(entry)
    # addsitedir runs the folder's own .pth files (the editable install's finder among them)
    return throwaway_env(f"import site; site.addsitedir({str(filtered)!r})")


def test_image_path_works_without_audio_video_or_plot_libraries(tmp_path, throwaway_env):
    py = env_without_extras(tmp_path, throwaway_env)
    code = f"""
    import sys
    import unipred, unipred.weights.hub
    from unipred import NEPA
    from unipred.cli import main
    NEPA.from_name("nepa_debug")
    rc = main(["fit", "debug/image_nepa_tiny", "trainer.fast_dev_run=2", "run_dir={tmp_path}/r",
               "trainer.loggers=[]", "trainer.progress_bar=false"])
    assert rc == 0, rc
    assert "image" in unipred.TOKENIZERS.names() and "audio" in unipred.TOKENIZERS.names()
    loaded = sorted(m for m in sys.modules if m.startswith({EXTRA_FILES!r}))
    assert not loaded, loaded
    # using the audio modality now fails in one line that names the extra
    from unipred.base.extras import MissingExtra
    try:
        unipred.TOKENIZERS.get("audio")(dim=32)
    except MissingExtra as e:
        msg = str(e)
        assert "pip install 'unipred[audio]'" in msg and "torchaudio" in msg and "\\n" not in msg
        print("OK", msg)
    """
    r = subprocess.run(
        [str(py), "-c", textwrap.dedent(code)], cwd=tmp_path, capture_output=True, text=True,
        timeout=300, env={**os.environ, "PYTHONSAFEPATH": "1"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "OK the audio tokenizer needs torchaudio" in r.stdout, r.stdout[-2000:]


def test_a_broken_plugin_leaves_the_registry_consistent(monkeypatch):
    from unipred.base import registry

    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setattr(registry, "PLUGIN_ERRORS", {})
    real = registry.plugin_modules
    monkeypatch.setattr(registry, "plugin_modules", lambda: ["unipred_no_such_plugin.mod", *real()])
    assert "image" in registry.TOKENIZERS.names()  # the others still loaded
    with pytest.raises(KeyError) as e:
        registry.TASKS.get("task_of_the_missing_plugin")  # a name nobody registers
    assert "unipred_no_such_plugin.mod failed to load: ModuleNotFoundError" in str(e.value)
    assert "image_pretrain" in registry.TASKS.names()


def test_packaged_recipes_are_found_by_name_from_any_folder(tmp_path, monkeypatch):
    from unipred.train.config import ConfigError, find_config, load_config

    monkeypatch.chdir(tmp_path)
    for name in ("demo/fmnist_pretrain", "demo/fmnist_pretrain.yaml",
                 "configs/image/nepa_vit_b14_pretrain.yaml"):  # fmt: skip
        assert find_config(name).is_file()
    cfg = load_config("debug/image_nepa_tiny", [], check_paths=False)
    assert cfg.task == "debug_image_pretrain"
    with pytest.raises(ConfigError, match="did you mean 'demo/fmnist_pretrain'"):
        find_config("demo/fmnist_pretrian")


def test_the_built_wheel_holds_the_recipes_and_the_manifest_and_no_source_folders(
    installed_wheel,
):
    import zipfile

    names = zipfile.ZipFile(installed_wheel[1]).namelist()
    assert "unipred/configs/demo/fmnist_pretrain.yaml" in names
    assert "unipred/py.typed" in names and any(n.endswith("licenses/LICENSE") for n in names)
    assert "unipred/builtin_plugins.json" in names  # unipred list without importing them
    assert "unipred/tasks/image/demo.py" in names and "unipred/tokenizers/image.py" in names
    assert not any(n.startswith(("tokenizers/", "tasks/", "configs/")) for n in names)


def _installed(installed_wheel, tmp_path):
    """(python, unipred script, environment, an empty working folder) of the installed wheel."""
    py = installed_wheel[0]
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", MANIFEST_ENV)}
    return py, str(py.parent / "unipred"), env, work


MANIFEST_ENV = "UNIPRED_PLUGIN_MANIFEST"


def test_built_wheel_installs_and_runs_from_an_unrelated_folder(installed_wheel, tmp_path):
    """The installed wheel (not editable), run as a newcomer runs it from an empty folder: it
    is the one imported, lists its plugins cold without importing torch, and runs the whole
    image demo (five engine runs, table, plots) on generated data with a tiny plan."""
    py, unipred, env, work = _installed(installed_wheel, tmp_path)
    env_dir = py.parent.parent
    where = subprocess.run(
        [str(py), "-c", "import unipred; print(unipred.__file__, unipred.__version__)"],
        cwd=work, env=env, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    assert str(env_dir) in where and str(ROOT) not in where, where
    cold = {**env, "UNIPRED_CACHE": str(tmp_path / "empty-cache")}
    out = subprocess.run([str(py), "-X", "importtime", "-m", "unipred", "list"], cwd=work,
                         env=cold, capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0 and "image_pretrain" in out.stdout, out.stderr[-2000:]
    # an installed release lists its own plugins from builtin_plugins.json: no torch import
    assert not re.search(r"\|\s+torch$", out.stderr, re.M), "a cold list imported torch"
    tiny = ["--data", "generated", "--pretrain-steps", "2", "--train-images", "1024",
            "--test-images", "64", "--labels-per-class", "5", "--finetune-steps", "1",
            "--probe-epochs", "1", "--threads", "1"]  # fmt: skip
    demo = subprocess.run(
        [unipred, "demo", "image", "--quick", "--out", str(work / "demo"), *tiny],
        cwd=work, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert demo.returncode == 0, (demo.stdout + demo.stderr)[-3000:]
    assert (work / "demo" / "results.md").is_file()
    assert (work / "demo" / "plots" / "accuracy.png").is_file()


@pytest.mark.slow  # the real quick plan on Fashion-MNIST: about a minute more than the above
def test_built_wheel_runs_the_quick_image_demo_on_fashion_mnist(installed_wheel, tmp_path):
    _, unipred, env, work = _installed(installed_wheel, tmp_path)
    demo = subprocess.run(
        [unipred, "demo", "image", "--quick", "--out", str(work / "demo")],
        cwd=work, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    if "Fashion-MNIST not found" in demo.stdout + demo.stderr:
        pytest.skip("Debian's dataset-fashion-mnist is not installed (make test installs it)")
    assert demo.returncode == 0, (demo.stdout + demo.stderr)[-3000:]
    assert (work / "demo" / "results.md").is_file()


def test_every_recipe_folder_ships_in_the_wheel():
    import tomllib

    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]
    folders = sorted(
        p.name for p in (ROOT / "configs").iterdir() if p.is_dir() and p.name[0] != "_"
    )
    missing = [f for f in folders if f"unipred.configs.{f}" not in packages]
    assert not missing, f"add unipred.configs.<folder> to pyproject's packages: {missing}"
