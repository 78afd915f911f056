"""The ``unipred`` command as a person meets it: help and usage, every subcommand's flags, and
one line with exit code 2 for every mistake, run through the shipped entry point."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNIPRED = str(Path(sys.executable).with_name("unipred"))


@pytest.fixture(scope="module", autouse=True)
def _shared_cache(tmp_path_factory):
    """One listing cache for this file's commands (a test that needs its own sets it)."""
    global CACHE
    CACHE = str(tmp_path_factory.mktemp("cache"))


CACHE = ""


def _env(tmp_path: Path, **extra) -> dict:
    env = {**os.environ, "PYTHONSAFEPATH": "1", "UNIPRED_CACHE": CACHE}
    env.update(extra)
    return env


def _run(args, tmp_path, timeout=300, **env):
    return subprocess.run(args, cwd=tmp_path, env=_env(tmp_path, **env), capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


# one process runs the shipped main() on many command lines (each would otherwise pay the
# torch/Lightning import again): {"rc", "out", "err"} per command line
DRIVER = r"""
import contextlib, io, json, sys
from unipred.cli import main
results = []
for argv in json.loads(sys.stdin.read()):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, int) and e.code is not None:
                err.write(str(e.code))
        except BaseException as e:
            import traceback
            traceback.print_exc(file=err)
            rc = "raised"
    results.append({"rc": rc, "out": out.getvalue(), "err": err.getvalue()})
print("@@RESULTS@@" + json.dumps(results))
"""


def _drive(argvs: list[list[str]], tmp_path: Path, timeout=600) -> list[dict]:
    p = subprocess.run([sys.executable, "-c", DRIVER], input=json.dumps(argvs), cwd=tmp_path,
                       env=_env(tmp_path), capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert "@@RESULTS@@" in p.stdout, p.stderr[-3000:]
    return json.loads(p.stdout.split("@@RESULTS@@", 1)[1])


# ------------------------------------------------------------------------- entry points
def test_python_m_unipred_is_the_command(tmp_path):
    p = _run([sys.executable, "-m", "unipred", "--help"], tmp_path)
    assert p.returncode == 0 and p.stdout.startswith("usage: unipred COMMAND"), p.stderr
    p = _run([sys.executable, "-m", "unipred", "list"], tmp_path)
    assert p.returncode == 0 and "tokenizers:" in p.stdout and "image" in p.stdout, p.stderr


def test_a_reader_that_stops_early_gets_no_traceback(tmp_path):
    """`unipred list | head -3`: the reader closes the pipe before the listing is written."""
    p = subprocess.Popen([UNIPRED, "list"], cwd=tmp_path, env=_env(tmp_path),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=600) == 0 and err == "", err[-2000:]


def _imports_torch(args, tmp_path, **env) -> tuple[bool, str]:
    """Run ``python -X importtime -m unipred ARGS``: (whether torch was imported, stdout)."""
    p = _run([sys.executable, "-X", "importtime", "-m", "unipred", *args], tmp_path, **env)
    assert p.returncode == 0, p.stderr[-2000:]
    return bool(re.search(r"\|\s+torch$", p.stderr, re.M)), p.stdout


def test_help_and_a_cached_list_load_no_torch(tmp_path):
    """What makes them instant: ``--help`` never imports torch; ``list`` imports the plugins
    once (here told to: without that a current builtin_plugins.json spares even that, see
    tests/test_listing.py), then reads its cache until something it depends on changes (here:
    a new folder on the path with a new file in it, as a package install does)."""
    for args in (["--help"], ["fit", "--help"], ["list", "--help"], ["demo", "--help"]):
        assert not _imports_torch(args, tmp_path)[0], args
    own = {"UNIPRED_CACHE": str(tmp_path / "own-cache"), "UNIPRED_PLUGIN_MANIFEST": "0"}
    torch_first, first = _imports_torch(["list"], tmp_path, **own)
    assert torch_first and "tokenizers:" in first  # computed
    torch_again, again = _imports_torch(["list"], tmp_path, **own)
    assert not torch_again and again == first  # from the cache, the same listing
    extra = tmp_path / "site"
    extra.mkdir()
    (extra / "newpkg.py").write_text("")
    moved, _ = _imports_torch(["list"], tmp_path, PYTHONPATH=str(extra), **own)
    assert moved  # the path changed: computed again


def test_import_unipred_outside_the_command_is_complete(tmp_path):
    """Only the command's start-up is lazy: a program importing unipred gets every name and
    every registration at once."""
    code = ("import sys, unipred\nfrom unipred.nn.saving import WEIGHTS_IO\n"
            "print('torch' in sys.modules, sorted(WEIGHTS_IO), unipred.NEPA.__name__)")  # fmt: skip
    p = _run([sys.executable, "-c", code], tmp_path)
    assert p.stdout.split() == ["True", "['load',", "'push',", "'save']", "NEPA"], p.stderr


def test_bare_commands_print_their_usage_and_train_nothing(tmp_path):
    for cmd in ("fit", "eval", "evaluate-suite", "demo"):
        p = _run([UNIPRED, cmd], tmp_path)
        assert p.returncode == 2, (cmd, p.stdout, p.stderr)
        assert p.stderr.startswith(f"usage: unipred {cmd}"), (cmd, p.stderr)
    p = _run([UNIPRED], tmp_path)
    assert p.returncode == 2 and p.stderr.startswith("usage: unipred COMMAND")
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow  # every modality's help, 12 s; test_fit_task_help_lists_that_tasks_keys stays
def test_fit_task_help_lists_the_keys_of_every_modalitys_tasks(tmp_path):
    """docs/first-hour.md: `unipred fit task=NAME --help` lists a task's keys without a YAML.
    The default model (nepa_debug, an image size) does not fit text, audio or video tasks, which
    a run refuses; the listing of the keys must not."""
    tasks = ["text_pretrain", "audio_classify", "video_classify", "fmnist_pretrain"]
    results = _drive([["fit", f"task={t}", "--help"] for t in tasks], tmp_path)
    for task, r in zip(tasks, results, strict=True):
        assert r["rc"] == 0, (task, r["err"][-500:])
        assert r["out"].startswith(f"keys of task {task}"), (task, r["out"][:300])
        assert re.search(r"^  data\.root ", r["out"], re.M), task
    # the run itself still checks the model against the task, in one line with a/an right
    (r,) = _drive([["fit", "task=text_pretrain", "--print-config"]], tmp_path)
    assert r["rc"] == 2 and "pick a text model" in r["err"], r["err"][-500:]


def test_fit_task_help_lists_that_tasks_keys(tmp_path):
    p = _run([UNIPRED, "fit", "task=debug_image_classify", "--help"], tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("keys of task debug_image_classify"), p.stdout[:300]
    for key in ("data.labels_per_class", "trainer.max_steps", "model.name"):
        assert re.search(rf"^  {re.escape(key)} ", p.stdout, re.M), key


# ------------------------------------------------------------------ --help of every command
def _flags(help_text: str) -> list[str]:
    """The long options a help text documents."""
    return sorted(set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", help_text)) - {"--help"})


def _subcommands() -> list[list[str]]:
    from unipred.listing import listing

    cmds = [["fit"], ["eval"], ["evaluate-suite"], ["list"], ["export"], ["convert"], ["data"],
            ["demo"], ["visualize"], ["compare"]]  # fmt: skip
    for name, _ in listing()["commands"]:
        if name.split()[0] in ("data", "demo"):
            cmds.append(name.split())
    return cmds


def test_every_subcommand_help_works_and_names_only_flags_that_exist(tmp_path):
    cmds = _subcommands()
    assert ["data", "pack-images"] in cmds and ["demo", "image"] in cmds, cmds
    # the shipped script once, then every help text through one process running its main()
    p = _run([UNIPRED, "demo", "image", "--help"], tmp_path)
    assert p.returncode == 0 and p.stdout.startswith("usage: unipred demo image"), p.stderr
    argvs, expect = [], []
    for cmd, r in zip(cmds, _drive([[*c, "--help"] for c in cmds], tmp_path), strict=True):
        assert r["rc"] == 0, (cmd, r)
        assert r["out"].startswith(f"usage: unipred {' '.join(cmd)}"), (cmd, r["out"][:200])
        assert "Traceback" not in r["out"] + r["err"], (cmd, r)
        listed = re.findall(r"^  (\S+)$", r["out"], re.M)
        if cmd in (["data"], ["demo"]):  # the subcommands it lists are the registered ones
            assert sorted(listed) == sorted(c[1] for c in cmds if c[0] == cmd[0] and len(c) > 1)
        for flag in _flags(r["out"]):
            if cmd[0] in ("fit", "eval", "evaluate-suite"):  # ours: run the flag for real
                config = (
                    ["task=debug_image_pretrain"] if cmd[0] == "fit" else ["debug/image_nepa_tiny"]
                )
                argvs.append([*cmd, *config, flag])
                expect.append((cmd, flag, "real"))
            else:  # argparse's: the flag parses; only the junk option after it is refused
                argvs.append([*cmd, "x", "y", flag, "--zz-no-such-flag"])
                expect.append((cmd, flag, "parse"))
    assert len(argvs) > 40, argvs  # every demo and packer documents its options
    for (cmd, flag, how), r in zip(expect, _drive(argvs, tmp_path), strict=True):
        text = r["out"] + r["err"]
        assert "Traceback" not in text, (cmd, flag, text[-2000:])
        if how == "real":
            assert r["rc"] == 0 and "task:" in r["out"], (cmd, flag, text[-1000:])
            continue
        assert r["rc"] == 2, (cmd, flag, r)
        unknown = re.findall(r"unrecognized arguments: (.*)", r["err"])
        assert flag not in " ".join(unknown).split(), (cmd, flag, r["err"])
        assert unknown or f"argument {flag}" in r["err"], (cmd, flag, r["err"])


# ------------------------------------------------------------ mistakes: one line, exit 2
CHOICES = {  # key -> (extra overrides, a valid value the fuzz mutates)
    "model.name": ([], "nepa_debug"),
    "model.tokenizer": ([], "image"),
    "task": ([], "debug_image_pretrain"),
    "data.decoder": (["task=debug_image_segment"], "linear"),
    "trainer.accelerator": ([], "cpu"),
    "trainer.precision": ([], "bf16-mixed"),
    "trainer.loggers": ([], "tensorboard"),
}


def _typos(word: str, rng: random.Random, n: int) -> list[str]:
    out = {"", "none", word.upper() + "x", word + " " + word, "ü" + word, "x" * 70}
    while len(out) < n + 6:
        i = rng.randrange(len(word))
        kind = rng.randrange(3)
        w = (word[:i] + word[i + 1 :] if kind == 0 else word[:i] + rng.choice("aqz_9") + word[i:]
             if kind == 1 else word[:i] + word[i + 1 :i + 2] + word[i] + word[i + 2 :])  # fmt: skip
        if w != word:
            out.add(w)
    return sorted(out)


def test_a_wrong_value_for_every_registry_key_is_one_line_naming_key_and_choices(tmp_path):
    rng = random.Random(29)
    argvs, cases = [], []
    for key, (extra, good) in CHOICES.items():
        for bad in _typos(good, rng, 4):
            if key == "trainer.loggers" and (" " in bad or not bad):
                continue  # not a list element a shell user could type
            value = f"[csv,{bad}]" if key == "trainer.loggers" else bad
            value = f"'{value}'" if " " in value or value == "" else value
            for cmd in (["fit", "debug/image_nepa_tiny"], ["eval", "debug/image_nepa_tiny"],
                        ["evaluate-suite", "debug/image_nepa_tiny"]):  # fmt: skip
                argvs.append([*cmd, *extra, f"{key}={value}", "ckpt=random",
                              f"run_dir={tmp_path / 'never'}"])  # fmt: skip
                cases.append((key, bad))
    results = _drive(argvs, tmp_path)
    for (key, _bad), argv, r in zip(cases, argvs, results, strict=True):
        lines = [ln for ln in r["err"].splitlines() if ln.strip()]
        assert r["rc"] == 2 and len(lines) == 1, (argv, r)
        assert key in lines[0] and "choices" in lines[0], (argv, lines[0])
        assert CHOICES[key][1] in lines[0], (argv, lines[0])  # the valid names are listed
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_shipped_command_refuses_each_registry_key_in_one_line(tmp_path):
    """The same through the real console script, one wrong value per key."""
    for key, (extra, good) in CHOICES.items():
        value = "[csv,tensorbord]" if key == "trainer.loggers" else good[:-1] + "q"
        p = _run([UNIPRED, "fit", "debug/image_nepa_tiny", *extra, f"{key}={value}"], tmp_path)
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert p.returncode == 2 and len(lines) == 1, (key, p.stderr[-2000:])
        assert lines[0].startswith(f"unipred fit: error: {key}="), lines[0]


@pytest.mark.skipif(
    subprocess.run(
        [sys.executable, "-c", "import torch; assert torch.cuda.is_available()"],
        capture_output=True,
    ).returncode
    == 0,  # fmt: skip
    reason="this machine has a GPU",
)
def test_gpu_asked_on_a_machine_without_one_is_one_line_before_any_folder(tmp_path):
    run = tmp_path / "run"
    p = _run([UNIPRED, "fit", "debug/image_nepa_tiny", "trainer.accelerator=gpu",
              f"run_dir={run}"], tmp_path)  # fmt: skip
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr[-2000:]
    assert "trainer.accelerator=gpu" in lines[0] and "no GPU" in lines[0]
    assert not run.exists()


def test_a_typo_says_where_it_was_made(tmp_path):
    p = _run([UNIPRED, "fit", "debug/image_nepa_tiny", "trainer.max_stpes=3"], tmp_path)
    assert p.returncode == 2 and "on the command line" in p.stderr, p.stderr
    assert "debug/image_nepa_tiny" not in p.stderr and ".yaml" not in p.stderr


def test_unknown_option_command_and_yaml_typo_are_one_line_and_exit_2(tmp_path):
    cfg = tmp_path / "mine.yaml"
    cfg.write_text("_base_: " + str(ROOT / "configs/debug/image_nepa_tiny.yaml") +
                   "\ntrainer:\n  max_stpes: 3\n")  # fmt: skip
    results = _drive([["fit", "task=debug_image_pretrain", "--print-confg"], ["list", "extra"],
                      ["eval", "debug/image_nepa_tiny"], ["frobnicate"], ["fit", str(cfg)]],
                     tmp_path)  # fmt: skip
    for r in results:
        lines = [ln for ln in r["err"].splitlines() if ln.strip()]
        assert r["rc"] == 2 and "Traceback" not in r["err"], r
    assert "unknown option --print-confg" in results[0]["err"]
    assert "give ckpt=PATH" in results[2]["err"]
    assert len(lines) == 1 and f"in {cfg}" in lines[0], lines  # the YAML's typo names the file
    assert "on the command line" not in lines[0]


def test_unipreds_own_warnings_name_no_file(tmp_path):
    """A warning raised from inside a Lightning hook (the collapse monitor's) is printed as
    unipred's, not attributed to Lightning's file that called the hook."""
    code = ("import warnings\nfrom unipred.base.warn import warn\n"
            "def hook():\n    warn('step 50: embeddings may be collapsing')\nhook()\n"
            "warnings.warn('a third-party warning')\n")  # fmt: skip
    p = _run([sys.executable, "-c", code], tmp_path)
    lines = p.stderr.splitlines()
    assert lines[0] == "[unipred] warning: step 50: embeddings may be collapsing", p.stderr
    assert "UserWarning: a third-party warning" in p.stderr  # others keep their format
