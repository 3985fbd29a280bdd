"""Subcommands of the ``diffuseg`` command line (see :mod:`diffuseg.cli`)."""

import argparse


def comma_separated_ints(value: str) -> tuple[int, ...]:
    """argparse type of options such as ``--resolutions 16,32,64``."""
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 16,32,64, got {value!r}") from None
