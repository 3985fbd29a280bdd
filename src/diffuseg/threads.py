"""How many CPU threads torch uses in a ``diffuseg`` command.

torch starts one OpenMP thread per core in every process. Several processes on the same
cores (``accelerate launch`` on CPU, or other jobs on a shared machine) then spin-wait for
each other: on a busy 2-core machine one ShapesWorld image took 128 s with 2 threads and
5.4 s with 1. The default here is therefore the cores this process may use, divided by the
local processes of the launch, and no more than the cores the load average leaves idle;
never fewer than 1. An explicit ``--threads`` or ``OMP_NUM_THREADS`` wins.

This module imports nothing heavy: ``--help`` computes the choice without torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

ENV_PROCESSES = ("LOCAL_WORLD_SIZE", "ACCELERATE_NUM_PROCESSES")
"""Environment variables that give the number of processes a launcher started on this machine
(torchrun and ``accelerate launch`` set ``LOCAL_WORLD_SIZE``)."""


@dataclass(frozen=True)
class ThreadChoice:
    """A thread count and why it was chosen (printed by every command)."""

    threads: int
    reason: str

    def describe(self) -> str:
        return f"diffuseg: torch uses {self.threads} CPU thread(s) ({self.reason}); change with --threads N"


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, else ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def local_processes() -> int:
    """Processes started on this machine by the launcher (1 without a launcher)."""
    for name in ENV_PROCESSES:
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def idle_cores(cores: int) -> int | None:
    """Cores the 1-minute load average leaves idle (None where there is no load average)."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    return max(0, cores - int(load))


def choose_threads(requested: int | None = None) -> ThreadChoice:
    """The thread count for this process: ``requested``, else ``OMP_NUM_THREADS``, else the safe default.

    Raises:
        ValueError: ``requested`` (or ``OMP_NUM_THREADS``) is not a positive integer.
    """
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be at least 1, got {requested}")
        return ThreadChoice(requested, "--threads")
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"OMP_NUM_THREADS must be a positive integer, got {env!r}")
        return ThreadChoice(int(env), "OMP_NUM_THREADS")
    cores, processes = usable_cores(), local_processes()
    share = max(1, cores // processes)
    reason = f"{cores} core(s) / {processes} local process(es)"
    idle = idle_cores(cores)
    if idle is not None and idle < share:
        share = max(1, idle)
        reason += f", {idle} idle by the load average"
    return ThreadChoice(share, reason)


def apply_threads(requested: int | None = None, announce: bool = True) -> ThreadChoice:
    """Choose (see :func:`choose_threads`) and set torch's intra-op thread count; print the choice to stderr."""
    import sys

    import torch

    choice = choose_threads(requested)
    torch.set_num_threads(choice.threads)
    if announce:
        print(choice.describe(), file=sys.stderr)
    return choice


def help_text() -> str:
    """What ``--threads`` does and what it would choose now, for ``--help``."""
    try:
        choice = choose_threads()
    except ValueError as error:
        return f"torch CPU threads per process ({error})"
    return (
        f"torch CPU threads per process (default: OMP_NUM_THREADS if set, else cores // local processes, "
        f"at most the idle cores, at least 1; here now: {choice.threads}, from {choice.reason})"
    )
