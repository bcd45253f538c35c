"""`ldm-deploy`: a thin layer over the library. Each subcommand lives in ldm_deploy/commands/.

Conventions every subcommand gets from here:
  * `--help` ends with an example; `-q/--quiet` and `-v/--verbose` work before or after the subcommand;
  * exit 0 on success, 1 on a failure (LdmError, or any other error), 2 on a usage error (argparse or
    UsageError), 130 on Ctrl-C; errors are one line on stderr, tracebacks only with --verbose;
  * --quiet: log level WARNING, no tqdm bars (TQDM_DISABLE) and no library warnings (numpy, torch: Python
    `warnings`), so a failing run's stderr is its one error line; --verbose: DEBUG;
  * a closed stdout (`ldm-deploy inspect --json | head`) ends the command quietly with exit 141 (128 + SIGPIPE).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
import warnings

from ldm_deploy import __version__
from ldm_deploy.commands import COMMANDS
from ldm_deploy.errors import LdmError

log = logging.getLogger("ldm_deploy")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors: one line, exit 2
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _add_verbosity(p: argparse.ArgumentParser, dest_prefix: str = "") -> None:
    g = p.add_mutually_exclusive_group()
    # Subparser defaults overwrite the parent's values, so the top-level flags use their own dests.
    g.add_argument("-q", "--quiet", dest=f"{dest_prefix}quiet", action="store_true",
                   help="print only warnings and errors; no progress bars")
    g.add_argument("-v", "--verbose", dest=f"{dest_prefix}verbose", action="store_true",
                   help="print debug output, and tracebacks on errors")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ldm-deploy", description="Export, build and run latent diffusion models.",
                     epilog="example:\n  ldm-deploy demo\n\n`ldm-deploy COMMAND --help` shows each command's "
                            "flags and an example.", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"ldm-deploy {__version__}")
    _add_verbosity(parser, dest_prefix="global_")
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
        _add_verbosity(p)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace | int:
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help / --version (0) or a usage error (2): return, don't raise, for callers of main()
        return e.code if isinstance(e.code, int) else 2
    args.quiet = getattr(args, "quiet", False) or args.global_quiet
    args.verbose = getattr(args, "verbose", False) or args.global_verbose
    if args.quiet and args.verbose:
        print(f"{parser.prog}: error: --quiet and --verbose exclude each other (see --help)", file=sys.stderr)
        return 2
    return args


def configure_output(quiet: bool, verbose: bool) -> None:
    """Log level for the `ldm_deploy` and `training` loggers; --quiet also turns tqdm bars off."""
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(message)s")
    for name in ("ldm_deploy", "training"):
        logging.getLogger(name).setLevel(level)
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"  # every tqdm bar, ours and libraries', reads this (tqdm >= 4.66)
        warnings.simplefilter("ignore")   # numpy / torch / onnx warnings; ours are log records (still shown)


@contextlib.contextmanager
def output_settings(quiet: bool, verbose: bool):
    """`configure_output` for one command; afterwards the warning filters, TQDM_DISABLE and our loggers'
    levels are as they were (main() may run in-process: tests, notebooks)."""
    tqdm_env, saved_filters = os.environ.get("TQDM_DISABLE"), warnings.filters[:]
    levels = {name: logging.getLogger(name).level for name in ("ldm_deploy", "training")}
    configure_output(quiet, verbose)
    try:
        yield
    finally:
        warnings.filters[:] = saved_filters
        if tqdm_env is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = tqdm_env
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def stdout_closed() -> int:
    """The reader of our stdout went away (`| head`): point stdout at /dev/null so the interpreter's final
    flush does not raise again, and exit as a SIGPIPE-killed tool would."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 141


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = _parse(parser, argv)
    if isinstance(args, int):
        return args
    if not getattr(args, "_run", None):
        parser.print_help(sys.stderr)
        return 2
    with output_settings(args.quiet, args.verbose):
        return _run(args)


def _run(args) -> int:
    try:
        code = int(args._run(args) or 0)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        return stdout_closed()
    except LdmError as e:
        if args.verbose:
            raise
        print(f"ldm-deploy: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("ldm-deploy: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug or an environment problem we did not foresee: still one line
        if args.verbose:
            raise
        what = " ".join(str(e).split()) or "no message"
        print(f"ldm-deploy: error: {type(e).__name__}: {what} (rerun with --verbose for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
