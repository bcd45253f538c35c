"""The two exceptions the CLI turns into one clear line and an exit code.

Raise `LdmError` for anything that goes wrong with a user's files, models or environment; its
message is one line that names the problem and the fix. Raise `UsageError` for bad arguments.
The CLI prints `ldm-deploy: error: <message>` and exits 1 (LdmError) or 2 (UsageError); no traceback
unless --verbose.
"""


class LdmError(Exception):
    """A failure the user can act on. `str(err)` is one line: what is wrong, then how to fix it."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        message = " ".join(str(message).split())  # keep it on one line
        if hint:
            message = f"{message} ({' '.join(hint.split())})"
        super().__init__(message)


class UsageError(LdmError):
    """Bad command-line or API arguments (exit code 2)."""

    exit_code = 2


def script_exit(main, name: str, argv=None) -> int:
    """Run a script's `main(argv)` as the CLI runs a command: an LdmError becomes `<name>: error: <message>` on
    stderr and its exit code, no traceback. For `sys.exit(script_exit(main, "name"))` in scripts/."""
    import sys

    try:
        return main(argv)
    except LdmError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return e.exit_code
