"""`unipred data SUBCOMMAND ...`: data preparation tools (shard packers, checks).

Each subcommand is a module with two functions::

    def add_arguments(parser: argparse.ArgumentParser) -> None: ...
    def run(args: argparse.Namespace) -> int: ...

and the module docstring's first line as its one-line help. A modality adds one with
``COMMANDS.add("data NAME", "its.module")`` (see ``unipred.tasks.image``). Modules are imported
only when their subcommand runs, so a broken or heavy packer never slows down or breaks the
others.
"""

from __future__ import annotations

import argparse
import importlib
import sys


def subcommands() -> dict[str, str]:
    """name -> module path, from every modality's registrations."""
    from unipred.base.registry import COMMANDS

    names = [n for n in COMMANDS.names() if n.startswith("data ")]
    return {n.split(" ", 1)[1]: COMMANDS.get(n) for n in names}


def _usage() -> str:
    lines = ["usage: unipred data SUBCOMMAND [options]", "", "subcommands:"]
    lines += [f"  {name}" for name in sorted(subcommands())]
    lines.append("\n`unipred data SUBCOMMAND --help` describes one.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``argv[0]`` to its subcommand module; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    known = subcommands()
    if name not in known:
        print(f"unknown data subcommand {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    mod = importlib.import_module(known[name])
    doc = (mod.__doc__ or "").strip().splitlines()
    parser = argparse.ArgumentParser(
        prog=f"unipred data {name}", description=doc[0] if doc else None
    )
    mod.add_arguments(parser)
    args = parser.parse_args(rest)
    return int(mod.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
