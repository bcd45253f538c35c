"""`ldm-deploy`: a thin layer over the library. Each subcommand lives in ldm_deploy/commands/."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ldm_deploy import __version__
from ldm_deploy.commands import COMMANDS
from ldm_deploy.errors import LdmError

log = logging.getLogger("ldm_deploy")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors: one line, exit 2
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ldm-deploy", description="Export, build and run latent diffusion models.")
    parser.add_argument("--version", action="version", version=f"ldm-deploy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"ldm_deploy.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"ldm_deploy.commands.{name}":
                continue  # subcommand not written yet
            raise
        p = sub.add_parser(
            mod.NAME, help=mod.HELP, description=mod.HELP,
            epilog=f"example:\n  {mod.EXAMPLE}", formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        g = p.add_mutually_exclusive_group()
        g.add_argument("-q", "--quiet", action="store_true", help="print only errors")
        g.add_argument("-v", "--verbose", action="store_true", help="print debug output and tracebacks")
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(message)s")
    try:
        return int(args._run(args) or 0)
    except LdmError as e:
        if args.verbose:
            raise
        print(f"ldm-deploy: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("ldm-deploy: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
