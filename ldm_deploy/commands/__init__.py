"""One module per `ldm-deploy` subcommand.

Each module defines:
    NAME: str                      # the subcommand
    HELP: str                      # one line for `ldm-deploy --help`
    EXAMPLE: str                   # shown at the end of `ldm-deploy NAME --help`
    def add_arguments(parser): ... # argparse flags
    def run(args) -> int: ...      # parse flags into a config, call ONE public API function

Subcommands are short: logic lives in the library, so every command has a Python twin.
"""
COMMANDS = ["export", "import_", "validate", "build", "generate", "bench", "inspect", "convert", "demo",
            "debug_precision", "triton_repo", "serve", "client"]
