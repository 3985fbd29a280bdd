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
    """The parser with the full options of ``commands`` (default: every command).

    Commands not named get their one-line help only (the module's ``HELP``): their options
    may import torch, and ``diffuseg --help`` should not.
    """
    parser = argparse.ArgumentParser(
        prog="diffuseg",
        description="Segmentation data and training-free segmentation from text-to-image diffusion models.",
        epilog="Every command takes --threads N (torch CPU threads per process; see `diffuseg COMMAND --help`).",
    )
    from diffuseg import __version__
    from diffuseg.threads import help_text

    parser.add_argument("--version", action="version", version=f"diffuseg {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(f"diffuseg.commands.{module_name}")
        except ModuleNotFoundError as error:
            if error.name != f"diffuseg.commands.{module_name}":
                raise
            continue  # command not shipped in this build
        if commands is not None and name not in commands:
            subparsers.add_parser(name, help=module.HELP)
            continue
        module.add_parser(subparsers)
        subparsers.choices[name].add_argument("--threads", type=int, metavar="N", help=help_text())
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Build only the requested command's options when one is named: its imports can be heavy.
    named = [argv[0]] if argv and argv[0] in COMMANDS else []
    parser = build_parser(named)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        from diffuseg.threads import apply_threads

        apply_threads(args.threads)
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
