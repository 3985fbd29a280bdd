"""The ``diffuseg`` command line: one subcommand per module of :mod:`diffuseg.commands`.

Each command module defines ``add_parser(subparsers)`` (which registers its own
``--help``) and ``run(args) -> int``. The same entry point works under
``accelerate launch -m diffuseg <command> ...``.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys
from collections.abc import Sequence

# Command name -> module under diffuseg.commands. Modules are imported lazily so that
# `diffuseg --help` stays fast and one command's heavy imports do not slow another.
COMMANDS: dict[str, str] = {
    "generate": "generate",
    "push": "push",
    "segment": "segment",
    "train": "train",
    "evaluate": "evaluate",
}


STORAGE_ERRORS = {
    errno.EACCES: "cannot write there (permission denied)",
    errno.EPERM: "cannot write there (not permitted)",
    errno.EROFS: "cannot write there (read-only file system)",
    errno.ENOSPC: "out of disk space",
    errno.EDQUOT: "out of disk quota",
    errno.EFBIG: "file size limit reached",
}
"""errno -> what it means for the user, for OS errors reported in one line."""


def build_parser(commands: Sequence[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffuseg",
        description="Segmentation data and training-free segmentation from text-to-image diffusion models.",
    )
    from diffuseg import __version__

    parser.add_argument("--version", action="version", version=f"diffuseg {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in commands if commands is not None else COMMANDS:
        try:
            module = importlib.import_module(f"diffuseg.commands.{COMMANDS[name]}")
        except ModuleNotFoundError as error:
            if error.name != f"diffuseg.commands.{COMMANDS[name]}":
                raise
            continue  # command not shipped in this build
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Build only the requested command's parser when one is named: its imports can be heavy.
    named = [argv[0]] if argv and argv[0] in COMMANDS else None
    parser = build_parser(named)
    args = parser.parse_args(argv)
    if args.command is None:
        build_parser().print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        # Bad input: one readable line, no traceback. Bugs still raise.
        print(f"diffuseg {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        # Where the machine says no (permissions, a full disk): one line naming the file; other OS errors raise.
        if error.errno not in STORAGE_ERRORS:
            raise
        where = f" ({error.filename})" if error.filename else ""
        print(f"diffuseg {args.command}: error: {STORAGE_ERRORS[error.errno]}{where}: {error.strerror}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
