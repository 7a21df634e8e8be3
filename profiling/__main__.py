"""``python -m profiling SUBCOMMAND ...``: every module ``profiling/cmd_<name>.py`` is a subcommand ``<name>`` (with
``-`` for ``_``). A module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m profiling", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for info in sorted(pkgutil.iter_modules([str(Path(__file__).parent)]), key=lambda i: i.name):
        if not info.name.startswith("cmd_"):
            continue
        name = info.name[4:].replace("_", "-")
        try:
            module = importlib.import_module(f"profiling.{info.name}")
        except ModuleNotFoundError as error:
            # A GPU box may lack plotly or gradio: the subcommands that do not need them (bench-kernels,
            # kernels-compile) must still run there, and the others say what to install.
            package = (error.name or str(error)).split(".")[0]
            sub = subparsers.add_parser(name, help=f"unavailable: needs {package}", add_help=False)
            sub.set_defaults(handler=missing_module(name, package), unavailable=True)
            continue
        sub = subparsers.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(handler=module.run)
    return parser


def missing_module(command: str, module: str):
    def handler(args) -> int:
        print(f"python -m profiling {command} needs the package {module!r}, which is not installed: "
              f"pip install -r requirements.txt", file=sys.stderr)
        return 2

    return handler


def main(argv=None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "unavailable", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args.handler(args) or 0


if __name__ == "__main__":
    sys.exit(main())
