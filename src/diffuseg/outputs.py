"""Output folders shared with the user: diffuseg overwrites only files it wrote itself.

A folder diffuseg writes into keeps a manifest (``.diffuseg-files.json``) of the names it
created there. A later run may replace those; any other existing file in its way (a user's
``README.md`` or ``ok.png``) is refused before any work, with its name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

MANIFEST = ".diffuseg-files.json"


def owned_names(folder: str | os.PathLike) -> set[str]:
    """Names diffuseg recorded as its own in ``folder`` (empty when it has no manifest)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return set()
    try:
        return set(json.loads(path.read_text(encoding="utf-8"))["files"])
    except (ValueError, KeyError, TypeError):
        return set()  # an unreadable manifest owns nothing: nothing gets overwritten


def check_writable(folder: str | os.PathLike, names: Iterable[str] | None, option: str) -> None:
    """Refuse when writing ``names`` into ``folder`` would replace files diffuseg did not write.

    Args:
        folder: the output folder (need not exist).
        names: top-level names the command will write; ``None``: the command owns the whole
            folder, which must then be new, empty, or written by diffuseg before.
        option: the command-line option naming the folder, for the message.

    Raises:
        FileExistsError: naming the files in the way.
    """
    folder = Path(folder)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise FileExistsError(f"{option} {folder} exists and is not a folder")
    present = {entry.name for entry in folder.iterdir()} - {MANIFEST}
    wanted = present if names is None else present & set(names)
    foreign = sorted(wanted - owned_names(folder))
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise FileExistsError(
            f"{option} {folder} already holds {shown}, which diffuseg did not write and would overwrite; "
            "choose a new or empty folder, or move those files away"
        )


def record_written(folder: str | os.PathLike, names: Iterable[str]) -> None:
    """Add ``names`` to the manifest of ``folder`` (created if needed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = sorted(owned_names(folder) | set(names))
    tmp = folder / f"{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"files": files}, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, folder / MANIFEST)
