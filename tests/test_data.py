"""DatasetWriter: Hub layout read back by `datasets`, multi-split, fingerprints, resumption."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from datasets import load_dataset
from PIL import Image

from diffuseg.data import DatasetMismatchError, DatasetWriter, read_id2label, split_files

CLASSES = ["dog", "cat", "sofa"]


def make_sample(i: int, size: int = 12) -> dict:
    rng = np.random.default_rng(i)
    label = np.zeros((size, size), np.uint8)
    label[2:6, 2:6] = 1 + i % 3
    label[0, :] = 255
    return {
        "image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
        "label": label,
        "classes": [1 + i % 3],
        "prompt": f"a photo of a {CLASSES[i % 3]} number {i}",
        "seed": 1000 + i,
        "pipeline": "diffumask",
        "model": "tiny",
        "mask_area": float(i) / 10,
    }


def card_yaml(folder) -> dict:
    text = (folder / "README.md").read_text()
    return yaml.safe_load(text.split("---")[1])


def read_rows(folder, split="train") -> list[dict]:
    rows = []
    for path in split_files(folder)[split]:
        rows += pq.read_table(path).to_pylist()
    return rows


def test_roundtrip_layout_and_card(tmp_path):
    folder = tmp_path / "ds"
    with DatasetWriter(folder, CLASSES, fingerprint={"seed": 0}, samples_per_shard=4) as writer:
        for i in range(10):
            writer.add(make_sample(i), index=i)
    files = sorted(p.name for p in (folder / "data").iterdir())
    assert files == [f"train-0000{k}-of-00003.parquet" for k in range(3)]
    assert read_id2label(folder) == {0: "background", 1: "dog", 2: "cat", 3: "sofa"}

    ds = load_dataset(str(folder), split="train")
    assert ds.column_names == ["image", "label", "classes", "prompt", "seed", "pipeline", "model", "mask_area"]
    assert type(ds.features["image"]).__name__ == type(ds.features["label"]).__name__ == "Image"
    assert ds.features["classes"].feature.names == ["background", *CLASSES]
    assert ds.features["seed"].dtype == "int64"
    assert len(ds) == 10
    for i, row in enumerate(ds):
        expected = make_sample(i)
        assert row["label"].mode == "L" and row["label"].format == "PNG"
        assert row["image"].format == "PNG"
        np.testing.assert_array_equal(np.asarray(row["label"]), expected["label"])
        np.testing.assert_array_equal(np.asarray(row["image"]), expected["image"])
        assert row["classes"] == expected["classes"] and row["seed"] == 1000 + i
        assert row["prompt"] == expected["prompt"]

    meta = card_yaml(folder)
    assert meta["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}]
    assert meta["dataset_info"]["splits"][0]["num_examples"] == 10
    names = {f["name"] for f in meta["dataset_info"]["features"]}
    assert names == set(ds.column_names)


def test_second_split_keeps_the_first_and_card_covers_both(tmp_path):
    folder = tmp_path / "ds"
    with DatasetWriter(folder, CLASSES, split="train", fingerprint={"part": "train"}) as writer:
        for i in range(5):
            writer.add(make_sample(i))
    with DatasetWriter(folder, CLASSES, split="test", fingerprint={"part": "test"}) as writer:
        for i in range(3):
            writer.add(make_sample(i))
    ds = load_dataset(str(folder))
    assert {k: len(v) for k, v in ds.items()} == {"train": 5, "test": 3}
    splits = {s["name"]: s["num_examples"] for s in card_yaml(folder)["dataset_info"]["splits"]}
    assert splits == {"train": 5, "test": 3}
    # A different class list is another dataset, even for a new split.
    with pytest.raises(DatasetMismatchError, match="classes"):
        DatasetWriter(folder, ["dog", "cat"], split="validation")


def test_refuses_other_dataset_and_foreign_folder(tmp_path):
    folder = tmp_path / "ds"
    with DatasetWriter(folder, CLASSES, fingerprint={"model": "a", "seed": 0}) as writer:
        writer.add(make_sample(0))
    with pytest.raises(DatasetMismatchError, match=r"different 'train' split \(model: 'a' -> 'b'\)"):
        DatasetWriter(folder, CLASSES, fingerprint={"model": "b", "seed": 0})
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DatasetMismatchError, match="not written by diffuseg"):
        DatasetWriter(foreign, CLASSES)


def test_bad_samples_are_rejected(tmp_path):
    writer = DatasetWriter(tmp_path / "ds", CLASSES)
    sample = make_sample(0)
    with pytest.raises(ValueError, match="uint8"):
        writer.add({**sample, "image": sample["image"].astype(np.float32) / 255})
    with pytest.raises(ValueError, match="outside 0..3"):
        writer.add({**sample, "classes": [4]})
    with pytest.raises(ValueError, match="label is"):
        writer.add({**sample, "label": np.zeros((5, 5), np.uint8)})
    with pytest.raises(ValueError, match="lacks"):
        writer.add({k: v for k, v in sample.items() if k != "prompt"})
    writer.add(sample, index=0)
    with pytest.raises(ValueError, match="already written"):
        writer.add(sample, index=0)
    with pytest.raises(ValueError, match="background"):
        DatasetWriter(tmp_path / "other", ["background", "dog"])


def test_palette_label_keeps_class_ids(tmp_path):
    folder = tmp_path / "ds"
    sample = make_sample(1)
    palette_label = Image.fromarray(sample["label"], mode="L").convert("P")
    palette_label.putpalette([255, 0, 0] * 256)  # colours must not leak into ids
    with DatasetWriter(folder, CLASSES) as writer:
        writer.add({**sample, "label": palette_label})
    row = load_dataset(str(folder), split="train")[0]
    np.testing.assert_array_equal(np.asarray(row["label"]), sample["label"])


def write_all(folder, order, skip=(), spp=4, stop_after=None):
    """Write samples in `order`; abandon the writer (as kill -9 would) after `stop_after` calls."""
    writer = DatasetWriter(folder, CLASSES, fingerprint={"seed": 0}, samples_per_shard=spp)
    for count, i in enumerate(i for i in order if i not in writer.completed_indices):
        if stop_after is not None and count == stop_after:
            return writer.completed_indices
        if i in skip:
            writer.skip(i, {"reason": "mask_area", "mask_area": 0.0})
        else:
            writer.add(make_sample(i), index=i)
    writer.close()
    return None


def test_interrupted_runs_resume_to_the_same_dataset(tmp_path):
    reference = tmp_path / "reference"
    write_all(reference, range(11), skip={2, 5})

    resumed = tmp_path / "resumed"
    done = write_all(resumed, range(11), skip={2, 5}, stop_after=6)
    # Only whole blocks reach the disk; the in-memory part of block 1 is lost, not half written.
    assert DatasetWriter(resumed, CLASSES, fingerprint={"seed": 0}, samples_per_shard=4).completed_indices == {0, 1, 2, 3}
    assert done == set(range(6))
    # A killed shard write leaves only a temporary file: ignored, then removed.
    (resumed / ".diffuseg" / "staging" / "train-b000001-i000000004.parquet.tmp-999").write_bytes(b"PAR1 garbage")
    done = write_all(resumed, range(11), skip={2, 5}, stop_after=5)
    assert done == set(range(9))
    write_all(resumed, range(11), skip={2, 5})

    assert read_rows(resumed) == read_rows(reference)
    assert not list((resumed / ".diffuseg").rglob("*.tmp-*"))
    assert len(load_dataset(str(resumed), split="train")) == 9


def test_two_writers_on_disjoint_blocks_equal_one(tmp_path):
    single = tmp_path / "single"
    write_all(single, range(10), skip={7})
    shared = tmp_path / "shared"
    # As in a distributed run: the main writer holds the folder lock, the other process's does not.
    writers = [DatasetWriter(shared, CLASSES, fingerprint={"seed": 0}, samples_per_shard=4, lock=k == 0) for k in range(2)]
    for i in reversed(range(10)):  # any order, blocks dealt round-robin to the writers
        writer = writers[(i // 4) % 2]
        writer.skip(i, {"reason": "x"}) if i == 7 else writer.add(make_sample(i), index=i)
    writers[1].close(finalize=False)
    writers[0].close()
    assert read_rows(shared) == read_rows(single)
    assert sorted(os.listdir(shared / "data")) == sorted(os.listdir(single / "data"))
    assert json.loads((shared / "id2label.json").read_text()) == json.loads((single / "id2label.json").read_text())


def test_error_inside_context_keeps_only_whole_blocks(tmp_path):
    folder = tmp_path / "ds"
    with pytest.raises(RuntimeError):
        with DatasetWriter(folder, CLASSES, samples_per_shard=4) as writer:
            for i in range(6):
                writer.add(make_sample(i), index=i)
            raise RuntimeError("generation failed")
    assert DatasetWriter(folder, CLASSES, samples_per_shard=4).completed_indices == {0, 1, 2, 3}
