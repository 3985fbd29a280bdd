"""Subcommands of the ``diffuseg`` command line (see :mod:`diffuseg.cli`)."""
