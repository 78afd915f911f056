"""How long the ``unipred`` command takes before a person sees anything.

    python benchmarks/cli_speed.py                  # 5 rounds
    python benchmarks/cli_speed.py --rounds 9 --json /tmp/cli.json

Times, each in a fresh process and interleaved round by round (a busy phase of a shared
machine hits every command alike): ``unipred --help``, ``unipred fit --help``, ``unipred list``
from its cache (warm), ``unipred list`` with an empty cache (cold) reading the built-in
plugins from ``unipred/builtin_plugins.json`` as an installed release does, cold importing every plugin,
and cold as this install decides by itself (a source checkout: the manifest while it is
current for the checkout's files, else imports), and two references: ``python -c pass`` (the interpreter alone) and ``python -c "import torch"``
(what every command paid before the imports were made lazy). Prints the median and the
minimum of each, and the 1-minute load average before and after (the targets, < 0.5 s for
``--help`` and < 2 s for ``list``, are for an idle machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).with_name("unipred")


def _time(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {p.stderr.decode()[-500:]}")
    return dt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None, help="also write the figures here")
    a = ap.parse_args(argv)
    warm = tempfile.mkdtemp(prefix="unipred-cache-")
    env = {**os.environ, "PYTHONSAFEPATH": "1", "UNIPRED_CACHE": warm}
    subprocess.run([str(BIN), "list"], env=env, stdout=subprocess.DEVNULL, check=True)
    cases = {
        "unipred --help": [str(BIN), "--help"],
        "unipred fit --help": [str(BIN), "fit", "--help"],
        "unipred list (cached)": [str(BIN), "list"],
        "unipred list (cold, manifest)": [str(BIN), "list"],
        "unipred list (cold, imports)": [str(BIN), "list"],
        "unipred list (cold, default)": [str(BIN), "list"],
        "python -c pass": [sys.executable, "-c", "pass"],
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    load0 = os.getloadavg()[0]
    for _ in range(a.rounds):
        for name, cmd in cases.items():
            e = env
            if "cold" in name:  # an empty cache; the built-in plugins from their manifest (as
                # an installed release reads them), imported, or as this install decides
                choice = {"manifest": "1", "imports": "0", "default": ""}[name[20:-1]]
                e = {**env, "UNIPRED_CACHE": tempfile.mkdtemp(prefix="unipred-cold-"),
                     "UNIPRED_PLUGIN_MANIFEST": choice}  # fmt: skip
            times[name].append(_time(cmd, e))
    load1 = os.getloadavg()[0]
    print(f"{'command':<30} {'median s':>9} {'min s':>7}   ({a.rounds} rounds; "
          f"load average {load0:.2f} -> {load1:.2f}, {os.cpu_count()} cores)")  # fmt: skip
    for name, ts in times.items():
        print(f"{name:<30} {statistics.median(ts):9.3f} {min(ts):7.3f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"load": [load0, load1], "seconds": times}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
