"""Streaming, resumable writer of segmentation datasets in the Hugging Face Hub layout.

A dataset folder written here loads with ``datasets.load_dataset(folder)`` and pushes to
the Hub as is::

    folder/
      data/train-00000-of-00002.parquet     # Image() columns stored as PNG bytes
      data/train-00001-of-00002.parquet
      id2label.json                         # {"0": "background", "1": "dog", ...}
      README.md                             # card: YAML configs + dataset_info match the files
      .diffuseg/                            # writer state: fingerprint, staged shards (not data)

Columns (see DESIGN.md): ``image`` and ``label`` (PNG, mode L: 0 background, 1..C class
ids, 255 ignore), ``classes`` (list of ClassLabel whose names are
``["background", *class_names]``, so ids equal label pixel values), ``prompt``, ``seed``,
``pipeline``, ``model``; optional extra image columns (``negative_image``) and extra scalar
columns (per-sample filter records).

Resumability. Sample ``i`` belongs to shard block ``i // samples_per_shard``. A block is
written once all of its samples have been added (or explicitly skipped, e.g. rejected by a
filter), atomically (temporary file + ``os.replace``) into ``.diffuseg/staging/``; each
shard records in its Parquet metadata which sample indices it covers. ``completed_indices``
is therefore derived from the files on disk alone: after ``kill -9`` a rerun skips exactly
the finished samples, no shard is ever half written, and since a block's content does not
depend on when or by which process it was produced, the result equals an uninterrupted
run. ``finalize`` moves the staged shards to ``data/<split>-NNNNN-of-NNNNN.parquet`` and
(re)writes ``id2label.json`` and the card for every split in the folder.

Several processes may write the same split at once (``accelerate launch``), as long as
each block is produced by one process: each writes its own shards, then one process calls
:meth:`DatasetWriter.finalize` after the others have flushed. Two *runs* may not: the
main writer holds an OS lock on the folder (:class:`FolderLock`), so a second run is
refused instead of writing the same blocks again, and :func:`check_dataset_folder` (run
by ``diffuseg push``) refuses a folder whose shards disagree with their ledgers.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

IGNORE_INDEX = 255
"""Label value of pixels that carry no class (uncertain); 0 is background, 1..C classes."""

BACKGROUND = "background"
STANDARD_COLUMNS = ("image", "label", "classes", "prompt", "seed", "pipeline", "model")
STATE_DIR = ".diffuseg"
"""Writer state inside a dataset folder: fingerprints, per-split descriptions, staged shards."""

_LEDGER_KEY = b"diffuseg"
_SHARD_NAME = re.compile(r"^(?P<split>[\w.]+?)-(?P<index>\d{5})-of-(?P<total>\d{5})\.parquet$")
_STAGED_NAME = re.compile(r"^(?P<split>[\w.]+?)-b(?P<block>\d+)-i(?P<first>\d+)\.parquet$")
_SPLIT_NAME = re.compile(r"^\w+$")
_ROW_GROUP_SIZE = 64  # rows per Parquet row group: images are large, readers stream groups


def stored_fingerprint(folder: str | os.PathLike, split: str = "train") -> dict | None:
    """The settings a :class:`DatasetWriter` stored for ``split`` of ``folder`` (None: nothing stored yet)."""
    path = Path(folder) / STATE_DIR / f"{split}.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("fingerprint")


class DatasetMismatchError(ValueError):
    """The folder already holds a different dataset (fingerprint or classes differ)."""


class FolderLockedError(DatasetMismatchError):
    """Another process is writing to the dataset folder."""


class FolderLock:
    """An exclusive lock on a dataset folder (``.diffuseg/lock``), held while a run writes it.

    ``fcntl.flock`` belongs to the open file: the kernel drops it when the process ends,
    however it ends, so a ``kill -9`` leaves no stale lock and a rerun resumes at once.
    The file holds the owner's process id, for the refusal message only.

    Raises:
        FolderLockedError: another process holds the lock.
    """

    NAME = "lock"

    def __init__(self, folder: str | os.PathLike) -> None:
        import fcntl

        state_dir = Path(folder) / STATE_DIR
        state_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(state_dir / self.NAME, "a+", encoding="utf-8")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            owner = self._file.read().strip() or "?"
            self._file.close()
            raise FolderLockedError(
                f"{folder} is being written by another diffuseg run (process {owner}); wait for it to finish "
                "(rerun then to resume), or choose another output folder"
            ) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"{os.getpid()}\n")
        self._file.flush()

    def release(self) -> None:
        """Drop the lock (closing the file releases it); idempotent."""
        self._file.close()

    @staticmethod
    def is_held(folder: str | os.PathLike) -> bool:
        """Whether some process (this one included, through another writer) holds the folder's lock."""
        import fcntl

        path = Path(folder) / STATE_DIR / FolderLock.NAME
        if not path.is_file():
            return False
        with open(path, encoding="utf-8") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
        return False


def class_label_names(class_names: Sequence[str]) -> list[str]:
    """ClassLabel names for ``class_names``: ``["background", *class_names]`` (id = pixel value)."""
    names = [str(name) for name in class_names]
    if not names:
        raise ValueError("class_names is empty: a segmentation dataset needs at least one class")
    if BACKGROUND in names:
        raise ValueError(f"{BACKGROUND!r} is implicit (label 0); do not list it in class_names")
    if len(set(names)) != len(names):
        duplicates = sorted({name for name in names if names.count(name) > 1})
        raise ValueError(f"duplicate class names: {duplicates}")
    if len(names) >= IGNORE_INDEX:
        raise ValueError(f"at most {IGNORE_INDEX - 1} classes fit a mode-L label (255 is 'ignore'), got {len(names)}")
    return [BACKGROUND, *names]


def dataset_features(
    class_names: Sequence[str],
    extra_image_columns: Sequence[str] = (),
    extra_columns: Mapping[str, str] | None = None,
):
    """The ``datasets.Features`` of a diffuseg dataset.

    Args:
        class_names: foreground class names (label ids 1..C).
        extra_image_columns: further ``Image()`` columns, e.g. ``("negative_image",)``.
        extra_columns: further scalar columns, name -> ``Value`` dtype (``"float64"``, ...).
    """
    from datasets import ClassLabel, Features, Image as ImageFeature, Value

    try:
        from datasets import List as ListFeature  # datasets >= 4
    except ImportError:  # pragma: no cover - older datasets
        from datasets import Sequence as ListFeature

    columns: dict[str, Any] = {
        "image": ImageFeature(),
        "label": ImageFeature(),
        "classes": ListFeature(ClassLabel(names=class_label_names(class_names))),
        "prompt": Value("string"),
        "seed": Value("int64"),
        "pipeline": Value("string"),
        "model": Value("string"),
    }
    for name in extra_image_columns:
        columns[name] = ImageFeature()
    for name, dtype in (extra_columns or {}).items():
        columns[name] = Value(dtype)
    return Features(columns)


def encode_png(image: Image.Image | np.ndarray | bytes, mode: str) -> bytes:
    """PNG bytes of ``image`` in PIL ``mode`` (``"RGB"`` or ``"L"``); PNG bytes pass through.

    Arrays must be ``uint8`` (H, W, 3) for RGB or (H, W) for L: no silent rescaling, so a
    float image or an int64 label is an error rather than a wrong dataset.
    """
    if isinstance(image, bytes):
        if not image.startswith(b"\x89PNG\r\n\x1a\n"):
            raise ValueError("image bytes must be PNG (masks are never JPEG)")
        return image
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"image arrays must be uint8, got {image.dtype} (scale [0, 1] floats by 255 first)")
        expected_ndim = 2 if mode == "L" else 3
        if image.ndim != expected_ndim or (mode == "RGB" and image.shape[-1] != 3):
            shape = "(H, W)" if mode == "L" else "(H, W, 3)"
            raise ValueError(f"a {mode} image array must have shape {shape}, got {image.shape}")
        image = Image.fromarray(image, mode=None)
    elif isinstance(image, Image.Image):
        if mode == "L" and image.mode not in ("L", "P"):
            raise ValueError(f"label images must be mode 'L' (or 'P' of class ids), got {image.mode!r}")
        if image.mode != mode:
            # P -> L must keep the palette indices (class ids), not their colours.
            image = Image.fromarray(np.asarray(image, dtype=np.uint8)) if image.mode == "P" else image.convert(mode)
    else:
        raise TypeError(f"expected a PIL image, a uint8 array or PNG bytes, got {type(image).__name__}")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG header, without decoding the pixels."""
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _scalar_dtype(name: str, value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "bool"
    if isinstance(value, (int, np.integer)):
        return "int64"
    if isinstance(value, (float, np.floating)):
        return "float64"
    if isinstance(value, str):
        return "string"
    raise TypeError(f"extra column {name!r} must hold bool, int, float or str values, got {type(value).__name__}")


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _atomic_write_json(path: Path, obj: Any) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode())


def _read_ledger(path: Path) -> dict:
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (pa.ArrowException, OSError) as error:
        # Shards are written atomically, so a broken one was damaged afterwards: its block can be redone.
        raise DatasetMismatchError(
            f"{path} is not a readable Parquet shard ({str(error).splitlines()[0]}); delete it and rerun: "
            "its samples are generated again"
        ) from None
    if _LEDGER_KEY not in metadata:
        raise DatasetMismatchError(f"{path} was not written by diffuseg (no sample ledger in its metadata)")
    return json.loads(metadata[_LEDGER_KEY])


def _differences(old: Mapping, new: Mapping) -> str:
    keys = sorted(set(old) | set(new), key=str)
    parts = [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in keys if old.get(key) != new.get(key)]
    return "; ".join(parts[:6]) + ("; ..." if len(parts) > 6 else "")


class DatasetWriter:
    """Stream samples into Parquet shards of one split of a dataset folder.

    >>> with DatasetWriter("out", class_names=["dog", "cat"], fingerprint={"seed": 0}) as w:
    ...     w.add({"image": rgb, "label": mask, "classes": [1], "prompt": "a dog",
    ...            "seed": 7, "pipeline": "diffumask", "model": "shapesworld"})

    Args:
        folder: the dataset folder (created if needed).
        class_names: foreground classes; label id ``k`` is ``class_names[k - 1]``. Every split
            of a folder shares them.
        split: split name (``train``, ``validation``, ...). Other splits already in the folder
            are kept; the card and ``id2label.json`` cover all of them.
        fingerprint: what defines this split (model, pipeline, classes, seed, settings; any
            JSON-serialisable dict). Stored on first use; a later writer with a different
            fingerprint for the same split raises :class:`DatasetMismatchError`.
        samples_per_shard: samples per shard block (rows per shard before filtering).
        extra_image_columns: names of further ``Image()`` columns (e.g. ``negative_image``);
            every sample must provide them.
        lock: hold the folder's :class:`FolderLock` until :meth:`close` / :meth:`unlock`, so
            that a second run into the same folder is refused. The processes of one
            distributed run pass ``True`` in the main process only.

    Raises:
        DatasetMismatchError: the folder holds another dataset (different fingerprint,
            classes or shard size), or unrelated files.
        FolderLockedError: another process is writing to the folder.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        class_names: Sequence[str],
        split: str = "train",
        fingerprint: Mapping[str, Any] | None = None,
        samples_per_shard: int = 256,
        extra_image_columns: Sequence[str] = (),
        lock: bool = True,
    ) -> None:
        if not _SPLIT_NAME.match(split):
            raise ValueError(f"split names are letters, digits and underscores, got {split!r}")
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be positive, got {samples_per_shard}")
        self.folder = Path(folder)
        self.class_names = list(class_names)
        self.label_names = class_label_names(self.class_names)
        self.split = split
        self.samples_per_shard = int(samples_per_shard)
        self.extra_image_columns = tuple(extra_image_columns)
        clash = set(self.extra_image_columns) & set(STANDARD_COLUMNS)
        if clash:
            raise ValueError(f"extra image columns may not reuse standard column names: {sorted(clash)}")
        self.fingerprint = json.loads(json.dumps(dict(fingerprint), sort_keys=True)) if fingerprint is not None else None
        self.state_dir = self.folder / STATE_DIR
        self.staging_dir = self.state_dir / "staging"
        self.data_dir = self.folder / "data"
        self._check_folder()
        self._lock = FolderLock(self.folder) if lock else None
        try:
            self._claim_split()
            for directory in (self.data_dir, self.staging_dir):
                directory.mkdir(parents=True, exist_ok=True)
            self._completed = self._scan_completed()
            self._extra_types: dict[str, str] | None = self._stored_extra_types()
        except BaseException:
            self.unlock()  # a refused folder is not kept locked by the half-made writer
            raise
        self._next_index = max(self._completed, default=-1) + 1
        # block -> {sample index: row dict (encoded) or None when skipped}; skip records by index.
        self._blocks: dict[int, dict[int, dict | None]] = {}
        self._block_done_before: dict[int, int] = {}  # samples of the block already on disk
        self._skip_records: dict[int, dict] = {}
        self._closed = False

    # ----------------------------------------------------------------- folder state
    def _check_folder(self) -> None:
        if not self.folder.exists():
            return
        if not self.folder.is_dir():
            raise DatasetMismatchError(f"{self.folder} exists and is not a folder")
        # The state folder alone is not foreign: another process may be creating it right now
        # (it writes dataset.json before anything else).
        entries = {p.name for p in self.folder.iterdir()} - {STATE_DIR, ".cache", ".gitattributes", ".git"}
        if entries and not (self.state_dir / "dataset.json").is_file():
            raise DatasetMismatchError(
                f"{self.folder} is not empty and was not written by diffuseg (found {sorted(entries)[:5]}); "
                "choose a new or empty output folder"
            )
        info_path = self.state_dir / "dataset.json"
        if info_path.is_file():
            stored = json.loads(info_path.read_text())
            if stored["class_names"] != self.class_names:
                raise DatasetMismatchError(
                    f"{self.folder} holds a dataset with classes {stored['class_names']}, not {self.class_names}; "
                    "choose another output folder (or delete this one to start over)"
                )

    def _claim_split(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        info_path = self.state_dir / "dataset.json"
        if not info_path.is_file():
            _atomic_write_json(info_path, {"class_names": self.class_names})
        split_path = self.state_dir / f"{self.split}.json"
        state = {"fingerprint": self.fingerprint, "samples_per_shard": self.samples_per_shard}
        if split_path.is_file():
            stored = json.loads(split_path.read_text())
            if self.fingerprint is not None and stored.get("fingerprint") not in (None, self.fingerprint):
                raise DatasetMismatchError(
                    f"{self.folder} already holds a different {self.split!r} split "
                    f"({_differences(stored['fingerprint'], self.fingerprint)}); rerun with the original settings "
                    "to resume it, or choose another output folder"
                )
            if stored.get("samples_per_shard") != self.samples_per_shard:
                raise DatasetMismatchError(
                    f"the {self.split!r} split in {self.folder} was written with samples_per_shard="
                    f"{stored.get('samples_per_shard')}, not {self.samples_per_shard}; resume with the same value"
                )
            if stored.get("fingerprint") is None and self.fingerprint is not None:
                _atomic_write_json(split_path, state)
        else:
            _atomic_write_json(split_path, state)

    def shard_files(self) -> list[Path]:
        """This split's shard files, staged and published (complete files only; some may hold no rows)."""
        staged = [p for p in self.staging_dir.glob(f"{self.split}-b*.parquet") if _STAGED_NAME.match(p.name)]
        published = [
            p for p in self.data_dir.glob(f"{self.split}-*.parquet")
            if (m := _SHARD_NAME.match(p.name)) and m["split"] == self.split
        ]
        return sorted(staged) + sorted(published)

    def _scan_completed(self) -> set[int]:
        completed: set[int] = set()
        for path in self.shard_files():
            ledger = _read_ledger(path)
            completed.update(ledger["indices"])
            completed.update(int(i) for i in ledger["skipped"])
        return completed

    def _stored_extra_types(self) -> dict[str, str] | None:
        for path in self.shard_files():
            if pq.read_metadata(path).num_rows:
                ledger = _read_ledger(path)
                return dict(ledger["extra_columns"])
        return None

    def skip_records(self) -> dict[int, dict]:
        """``{index: record}`` of every skipped sample on disk (see :meth:`skip`)."""
        records: dict[int, dict] = {}
        for path in self.shard_files():
            records.update({int(i): r for i, r in _read_ledger(path)["skipped"].items()})
        return records

    @property
    def completed_indices(self) -> set[int]:
        """Sample indices already written or skipped (on disk or buffered in this writer)."""
        buffered = {i for block in self._blocks.values() for i in block}
        return self._completed | buffered

    # ----------------------------------------------------------------- writing
    def add(self, sample: Mapping[str, Any], index: int | None = None) -> None:
        """Buffer one sample; its block's shard is written once the block is complete.

        Args:
            sample: ``image`` (PIL or uint8 HxWx3), ``label`` (PIL L or uint8 HxW), ``classes``
                (label ids present), ``prompt``, ``seed``, ``pipeline``, ``model``, each extra
                image column, and optionally extra scalar columns (bool/int/float/str; the
                same names in every sample).
            index: the sample's index in the split (default: the next one). Samples may
                arrive in any order; an index already written is an error.
        """
        index = self._next_index if index is None else int(index)
        missing = [key for key in (*STANDARD_COLUMNS, *self.extra_image_columns) if key not in sample]
        if missing:
            raise ValueError(f"sample {index} lacks {missing}")
        row = self._encode(sample, index)
        self._put(index, row)

    def skip(self, index: int, record: Mapping[str, Any] | None = None) -> None:
        """Mark sample ``index`` as done without a row (e.g. rejected by a filter).

        ``record`` (JSON-serialisable, e.g. the filter's measurements) is kept in the shard
        metadata, so the reason is on disk and resuming does not redo the sample.
        """
        index = int(index)
        self._skip_records[index] = json.loads(json.dumps(dict(record or {})))
        self._put(index, None)

    def _put(self, index: int, row: dict | None) -> None:
        if self._closed:
            raise RuntimeError("this DatasetWriter is closed")
        if index < 0:
            raise ValueError(f"sample indices are non-negative, got {index}")
        block_id = index // self.samples_per_shard
        if block_id not in self._blocks:
            first = block_id * self.samples_per_shard
            self._blocks[block_id] = {}
            self._block_done_before[block_id] = sum(
                1 for i in range(first, first + self.samples_per_shard) if i in self._completed
            )
        block = self._blocks[block_id]
        if index in self._completed or index in block:
            raise ValueError(f"sample {index} of split {self.split!r} was already written")
        block[index] = row
        self._next_index = max(self._next_index, index + 1)
        if len(block) + self._block_done_before[block_id] >= self.samples_per_shard:
            self._write_block(block_id)

    def _encode(self, sample: Mapping[str, Any], index: int) -> dict:
        image = encode_png(sample["image"], "RGB")
        label = encode_png(sample["label"], "L")
        if _png_size(image) != _png_size(label):
            raise ValueError(f"sample {index}: image is {_png_size(image)} but label is {_png_size(label)} (W, H)")
        num_classes = len(self.class_names)
        counts = np.bincount(np.asarray(Image.open(io.BytesIO(label))).ravel(), minlength=256)  # faster than unique
        foreign = [int(v) for v in np.flatnonzero(counts) if num_classes < v < IGNORE_INDEX]
        if foreign:
            raise ValueError(
                f"sample {index}: label values {foreign[:8]} are not class ids of this dataset "
                f"(0 background, 1..{num_classes} classes, {IGNORE_INDEX} ignore)"
            )
        classes = [int(c) for c in sample["classes"]]
        bad = [c for c in classes if not 0 <= c <= num_classes]
        if bad:
            raise ValueError(f"sample {index}: class ids {bad} are outside 0..{num_classes}")
        row: dict[str, Any] = {
            "image": {"bytes": image, "path": None},
            "label": {"bytes": label, "path": None},
            "classes": classes,
            "prompt": str(sample["prompt"]),
            "seed": int(sample["seed"]),
            "pipeline": str(sample["pipeline"]),
            "model": str(sample["model"]),
        }
        for name in self.extra_image_columns:
            row[name] = {"bytes": encode_png(sample[name], "RGB"), "path": None}
        extras = {k: _plain(v) for k, v in sample.items() if k not in row}
        types = {name: _scalar_dtype(name, value) for name, value in extras.items() if value is not None}
        if self._extra_types is None:
            if len(types) != len(extras):
                raise ValueError(f"sample {index}: the first value of an extra column may not be None")
            self._extra_types = dict(sorted(types.items()))
        if set(extras) != set(self._extra_types):
            raise ValueError(
                f"sample {index} has extra columns {sorted(extras)}, but this split has {sorted(self._extra_types)}"
            )
        for name, dtype in types.items():
            if dtype != self._extra_types[name] and not (dtype == "int64" and self._extra_types[name] == "float64"):
                raise ValueError(f"sample {index}: column {name!r} is {self._extra_types[name]}, got a {dtype} value")
        row.update(extras)
        return row

    def _write_block(self, block_id: int) -> None:
        block = self._blocks.pop(block_id)
        self._block_done_before.pop(block_id, None)
        indices = sorted(block)
        rows = [block[i] for i in indices if block[i] is not None]
        kept = [i for i in indices if block[i] is not None]
        skipped = {str(i): self._skip_records.pop(i) for i in indices if block[i] is None}
        features = dataset_features(self.class_names, self.extra_image_columns, self._extra_types or {})
        ledger = {
            "block": block_id,
            "indices": kept,
            "skipped": skipped,
            "extra_columns": self._extra_types or {},
            "pid": os.getpid(),  # which process wrote it (distributed runs)
        }
        schema = features.arrow_schema
        schema = schema.with_metadata({**(schema.metadata or {}), _LEDGER_KEY: json.dumps(ledger).encode()})
        table = pa.Table.from_pylist(rows, schema=schema)
        path = self.staging_dir / f"{self.split}-b{block_id:06d}-i{indices[0]:09d}.parquet"
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        try:
            pq.write_table(table, tmp, row_group_size=_ROW_GROUP_SIZE)
        except OSError as error:
            tmp.unlink(missing_ok=True)
            if error.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise
            # Finished shards stay on disk: the rerun resumes from them once there is room.
            raise OSError(
                error.errno,
                f"{os.strerror(error.errno)} while writing a shard of about {table.nbytes / 1e6:.1f} MB; the "
                f"{len(self._completed)} samples already written are kept: free space and rerun to resume",
                str(path),
            ) from None
        os.replace(tmp, path)  # atomic: a reader sees no shard or a whole one
        self._completed.update(indices)

    def flush(self) -> None:
        """Write every buffered sample now, including incomplete blocks (the end of the data)."""
        for block_id in sorted(self._blocks):
            if self._blocks[block_id]:
                self._write_block(block_id)
        self._blocks.clear()

    # ----------------------------------------------------------------- publishing
    def finalize(self, description: str | None = None) -> None:
        """Publish this split: staged shards -> ``data/``, then ``id2label.json`` and README.md.

        Call once every process has flushed. Idempotent, and safe to rerun after an
        interruption. Shards without rows (every sample skipped) stay staged: they only
        carry the resume ledger.

        Readers never see a part of the data as the whole: ``load_dataset`` follows the card
        (without one it reads whatever ``data/`` holds), so the card is first replaced by a
        placeholder whose config matches no file, and the real card, description included,
        is written last, in one atomic step, once every shard is in place. A run killed in
        between leaves a folder that does not load and that ``diffuseg push`` refuses.

        Args:
            description: markdown saying how this split was made; kept and shown in the card.
        """
        if description is not None:
            _atomic_write_bytes(self.state_dir / f"{self.split}.md", description.encode())
        shards = []
        for path in self.shard_files():
            ledger = _read_ledger(path)
            if ledger["indices"]:
                shards.append((ledger["block"], min(ledger["indices"]), path))
        shards.sort()
        total = len(shards)
        _atomic_write_bytes(self.folder / "README.md", _publishing_card(self.split).encode())
        for position, (_, _, path) in enumerate(shards):
            target = self.data_dir / f"{self.split}-{position:05d}-of-{total:05d}.parquet"
            if path != target:
                os.replace(path, target)
        for stale in self.data_dir.glob(f"{self.split}-*.parquet"):
            match = _SHARD_NAME.match(stale.name)
            if match and match["split"] == self.split and int(match["total"]) != total:
                raise RuntimeError(f"{stale} does not belong to the {total} shards of split {self.split!r}")
        for leftover in [*self.staging_dir.glob("*.tmp-*"), *self.data_dir.glob("*.tmp-*")]:
            leftover.unlink(missing_ok=True)  # partial writes of killed runs
        write_metadata(self.folder)

    def close(self, description: str | None = None, finalize: bool = True) -> None:
        """:meth:`flush`, then (unless ``finalize=False``) :meth:`finalize` and :meth:`unlock`.

        With ``finalize=False`` (non-main processes, or a caller that publishes later) the
        folder lock stays held until :meth:`unlock`.
        """
        if self._closed:
            return
        self.flush()
        self._closed = True
        if finalize:
            self.finalize(description)
            self.unlock()

    def unlock(self) -> None:
        """Release the folder lock (if this writer holds it): another run may write the folder now."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            # On error keep only complete blocks: an incomplete block written now would
            # split that block in two shards when the run resumes.
            self._closed = True
            self.unlock()


# --------------------------------------------------------------------- folder metadata
def split_files(folder: str | os.PathLike) -> dict[str, list[Path]]:
    """Published shards per split: ``{"train": [data/train-00000-of-00002.parquet, ...]}``."""
    splits: dict[str, list[Path]] = {}
    for path in sorted((Path(folder) / "data").glob("*.parquet")):
        match = _SHARD_NAME.match(path.name)
        if match:
            splits.setdefault(match["split"], []).append(path)
    return splits


def read_id2label(folder: str | os.PathLike) -> dict[int, str]:
    """``id2label.json`` of a dataset folder as ``{0: "background", 1: ...}``."""
    with open(Path(folder) / "id2label.json", encoding="utf-8") as f:
        return {int(k): v for k, v in json.load(f).items()}


_SPLIT_ORDER = {"train": 0, "validation": 1, "test": 2}
PUBLISHING_MARKER = "PUBLISHING-INTERRUPTED"
"""In the placeholder card (and its file pattern) while :meth:`DatasetWriter.finalize` moves shards."""


def _publishing_card(split: str) -> str:
    """A card whose config matches no file: ``load_dataset`` fails instead of reading part of the data."""
    return (
        "---\nconfigs:\n- config_name: default\n  data_files:\n"
        f"  - split: {split}\n    path: data/{PUBLISHING_MARKER}-rerun-diffuseg-generate-to-finish\n---\n\n"
        f"# {PUBLISHING_MARKER}\n\ndiffuseg was publishing this dataset and stopped before every shard was in "
        "place. Rerun the same `diffuseg generate` command (or `DatasetWriter.finalize`) to finish it.\n"
    )


def write_metadata(folder: str | os.PathLike) -> None:
    """(Re)write ``id2label.json`` and README.md from the shards and state of ``folder``."""
    from datasets import Features

    folder = Path(folder)
    state_dir = folder / STATE_DIR
    class_names = json.loads((state_dir / "dataset.json").read_text())["class_names"]
    names = class_label_names(class_names)
    _atomic_write_json(folder / "id2label.json", {str(i): name for i, name in enumerate(names)})

    splits = dict(sorted(split_files(folder).items(), key=lambda kv: (_SPLIT_ORDER.get(kv[0], 9), kv[0])))
    features = None
    split_info = []
    for split, paths in splits.items():
        split_features = Features.from_arrow_schema(pq.read_schema(paths[0]))
        if features is None:
            features = split_features
        elif split_features != features:
            raise ValueError(f"split {split!r} has columns {list(split_features)}, other splits {list(features)}")
        num_examples = num_bytes = download = 0
        for path in paths:
            meta = pq.read_metadata(path)
            num_examples += meta.num_rows
            num_bytes += sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
            download += path.stat().st_size
        split_info.append((split, num_examples, num_bytes, download))
    descriptions = {}
    for split in splits:
        path = state_dir / f"{split}.md"
        if path.is_file():
            descriptions[split] = path.read_text().strip()
    card = _card(folder.name, names, features, split_info, descriptions)
    _atomic_write_bytes(folder / "README.md", card.encode())


def _card(title: str, names: list[str], features, split_info, descriptions: dict[str, str]) -> str:
    from huggingface_hub import DatasetCardData

    data = DatasetCardData(
        task_categories=["image-segmentation"],
        tags=["synthetic", "diffuseg", "semantic-segmentation"],
        configs=[
            {
                "config_name": "default",
                "data_files": [{"split": split, "path": f"data/{split}-*"} for split, *_ in split_info],
            }
        ],
        dataset_info={
            "features": features._to_yaml_list() if features is not None else [],
            "splits": [
                {"name": split, "num_bytes": num_bytes, "num_examples": num_examples}
                for split, num_examples, num_bytes, _ in split_info
            ],
            "download_size": sum(info[3] for info in split_info),
            "dataset_size": sum(info[2] for info in split_info),
        },
    )
    lines = [
        "---",
        data.to_yaml().strip(),
        "---",
        "",
        f"# {title}",
        "",
        "A semantic-segmentation dataset written by [diffuseg](https://pypi.org/project/diffuseg/).",
        "",
        "```python",
        "from datasets import load_dataset",
        f'ds = load_dataset("path/to/{title}")  # a local copy, or the Hub id "owner/{title}"',
        "```",
        "",
        "## Splits",
        "",
        "| split | samples |",
        "|---|---|",
        *[f"| {split} | {n} |" for split, n, *_ in split_info],
        "",
        "## Columns",
        "",
        "| column | content |",
        "|---|---|",
        "| `image` | the image (PNG) |",
        "| `label` | PNG, mode L: 0 background, 1..C class ids (see `id2label.json`), 255 ignore |",
        "| `classes` | class ids present in the sample (ClassLabel: names = id2label) |",
        "| `prompt`, `seed`, `pipeline`, `model` | provenance: enough to regenerate the sample |",
    ]
    standard = set(STANDARD_COLUMNS)
    for name in features or {}:
        if name not in standard:
            kind = "image (PNG)" if type(features[name]).__name__ == "Image" else features[name].dtype
            lines.append(f"| `{name}` | {kind}: per-sample record (see how the data was made) |")
    lines += ["", "## Classes", "", "| id | name |", "|---|---|", *[f"| {i} | {n} |" for i, n in enumerate(names)]]
    lines.append("| 255 | ignore (uncertain pixels) |")
    for split, text in descriptions.items():
        heading = "## How it was made" if len(descriptions) == 1 else f"## How the `{split}` split was made"
        lines += ["", heading, "", text]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------- checking a folder
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_dataset_folder(folder: str | os.PathLike) -> dict[str, int]:
    """Check that ``folder`` is a complete, self-consistent dataset; return rows per split.

    Checked: every shard's footer is readable and shard names are ``NNNNN-of-NNNNN``
    complete; the card's ``configs`` globs match exactly the shards of each split; its
    ``dataset_info`` features and row counts match the files; ``id2label.json`` matches the
    ClassLabel names; image columns hold PNG; no generated shard is left unpublished.

    Raises:
        ValueError: listing every problem found.
        FileNotFoundError: ``folder`` does not exist.
    """
    import fnmatch

    import yaml
    from datasets import Features

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset folder {str(folder)!r} does not exist")
    problems: list[str] = []
    splits = split_files(folder)
    if not splits:
        problems.append("no data/<split>-NNNNN-of-NNNNN.parquet shards")
    staged = [p for p in (folder / STATE_DIR / "staging").glob("*.parquet") if pq.read_metadata(p).num_rows]
    if staged:
        problems.append(f"{len(staged)} generated shard(s) are not published yet: rerun the generate command to finish")
    rows: dict[str, int] = {}
    features = None
    for split, paths in splits.items():
        totals = {int(_SHARD_NAME.match(p.name)["total"]) for p in paths}
        numbers = sorted(int(_SHARD_NAME.match(p.name)["index"]) for p in paths)
        if len(totals) != 1 or numbers != list(range(len(paths))) or totals != {len(paths)}:
            problems.append(f"split {split!r}: shards {[p.name for p in paths]} are not a complete NNNNN-of-NNNNN set")
        rows[split] = 0
        for path in paths:
            try:
                meta = pq.read_metadata(path)
                schema = pq.read_schema(path)
            except Exception as error:  # any unreadable footer is a corrupt shard
                problems.append(f"{path.name} is not a readable Parquet file ({error})")
                continue
            rows[split] += meta.num_rows
            shard_features = Features.from_arrow_schema(schema)
            if features is None:
                features = shard_features
            elif shard_features != features:
                problems.append(f"{path.name} has columns {list(shard_features)}, other shards {list(features)}")
            image_columns = [n for n, f in shard_features.items() if type(f).__name__ == "Image"]
            if meta.num_rows and image_columns:
                first = next(pq.ParquetFile(path).iter_batches(batch_size=1, columns=image_columns)).to_pylist()[0]
                for name in image_columns:
                    if not (first[name] or {}).get("bytes", b"").startswith(_PNG_MAGIC):
                        problems.append(f"{path.name}: column {name!r} is not stored as PNG bytes")

    try:
        id2label = read_id2label(folder)
        if id2label.get(0) != BACKGROUND or sorted(id2label) != list(range(len(id2label))):
            problems.append("id2label.json must map '0' to 'background' and number classes 1..C without gaps")
        if features is not None and "classes" in features:
            names = features["classes"].feature.names
            if names != [id2label[i] for i in sorted(id2label)]:
                problems.append(f"id2label.json {id2label} does not match the ClassLabel names {names}")
    except FileNotFoundError:
        problems.append("id2label.json is missing")

    card_path = folder / "README.md"
    if not card_path.is_file():
        problems.append("README.md (the dataset card) is missing")
    elif PUBLISHING_MARKER in (text := card_path.read_text(encoding="utf-8")):
        problems.append("publishing was interrupted (README.md is a placeholder): rerun the generate command to finish")
    else:
        parts = text.split("---\n", 2)
        meta = yaml.safe_load(parts[1]) if text.startswith("---\n") and len(parts) == 3 else None
        if not isinstance(meta, dict):
            problems.append("README.md has no YAML metadata block")
            meta = {}
        data_files: dict[str, list[str]] = {}
        for config in meta.get("configs", []):
            for entry in config.get("data_files", []):
                patterns = entry["path"] if isinstance(entry["path"], list) else [entry["path"]]
                data_files.setdefault(entry["split"], []).extend(patterns)
        all_files = sorted(
            str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and STATE_DIR not in p.parts
        )
        for split in sorted(set(data_files) | set(splits)):
            matched = sorted({f for pattern in data_files.get(split, []) for f in all_files if fnmatch.fnmatch(f, pattern)})
            expected = sorted(str(p.relative_to(folder)) for p in splits.get(split, []))
            if matched != expected:
                problems.append(f"card configs for split {split!r} match {matched}, but its shards are {expected}")
        info = meta.get("dataset_info", {}) or {}
        counted = {s["name"]: s.get("num_examples") for s in info.get("splits", [])}
        if counted != rows:
            problems.append(f"card dataset_info counts {counted}, the shards hold {rows}")
        if features is not None:
            card_features = Features._from_yaml_list(info.get("features", []))
            if card_features != features:
                problems.append(f"card dataset_info features {list(card_features)} differ from the shards' {list(features)}")
    for split, paths in splits.items():
        problems += _ledger_problems(folder, split, paths)
    if FolderLock.is_held(folder):
        problems.append("a diffuseg run is writing to it right now: wait for it to finish")
    if problems:
        raise ValueError(f"{folder} is not a valid dataset: " + "; ".join(problems))
    return rows


def _ledger_problems(folder: Path, split: str, published: Sequence[Path]) -> list[str]:
    """How the shards of ``split`` disagree with the writer's ledgers: blocks twice, blocks or samples missing.

    Every block of samples is written once, as one shard (published, or staged when all of
    its samples were skipped), so blocks ``0..B-1`` must each appear exactly once and every
    block but the last must be full.
    """
    staged = sorted((folder / STATE_DIR / "staging").glob(f"{split}-b*.parquet"))
    blocks: dict[int, list[str]] = {}
    sizes: dict[int, int] = {}
    problems = []
    for path in [*published, *(p for p in staged if _STAGED_NAME.match(p.name))]:
        try:
            ledger = _read_ledger(path)
            num_rows = pq.read_metadata(path).num_rows
        except Exception as error:  # unreadable or foreign shards are reported, not raised
            problems.append(f"{path.name}: no readable sample ledger ({error})")
            continue
        if num_rows != len(ledger["indices"]):
            problems.append(f"{path.name} holds {num_rows} rows but its ledger lists {len(ledger['indices'])}")
        blocks.setdefault(ledger["block"], []).append(path.name)
        sizes[ledger["block"]] = len(ledger["indices"]) + len(ledger["skipped"])
    twice = {block: names for block, names in blocks.items() if len(names) > 1}
    if twice:
        block, names = min(twice.items())
        problems.append(
            f"split {split!r}: {len(twice)} block(s) of samples were written more than once (e.g. block {block} in "
            f"{names}; two runs wrote this folder at once?): generate it again into a new folder"
        )
    state_path = folder / STATE_DIR / f"{split}.json"
    if blocks and state_path.is_file():
        per_shard = json.loads(state_path.read_text()).get("samples_per_shard")
        last = max(blocks)
        missing = [b for b in range(last + 1) if b not in blocks]
        short = [b for b in range(last) if b in sizes and per_shard and sizes[b] < per_shard]
        if missing or short:
            problems.append(
                f"split {split!r}: samples are missing (blocks {sorted(missing + short)[:8]} of 0..{last} are absent "
                "or incomplete): rerun the generate command to finish them"
            )
    return problems
