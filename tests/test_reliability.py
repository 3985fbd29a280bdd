"""Issue 20: no duplicated or half-published data, no code run on resume, no user file
overwritten or uploaded, clear one-line errors before any work, bounded work.

(The Space's refusals are tested over HTTP in ``test_space.py``; the kill -9 and 2-process
generation tests are in ``test_generate.py``.)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from diffuseg import cli
from diffuseg.data import DatasetMismatchError, DatasetWriter, FolderLock, check_dataset_folder, write_metadata
from diffuseg.pipelines import CounterfactualPipeline, DiffuMaskPipeline
from diffuseg.testing import save_tiny_stable_diffusion, tiny_stable_diffusion

CLASSES = ["dog", "cat"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONDONTWRITEBYTECODE": "1"}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return save_tiny_stable_diffusion(tmp_path_factory.mktemp("models") / "tiny-sd")


def generate_args(model, out, *extra) -> list[str]:
    return ["generate", "--out", str(out), "--model", model, "--classes", "dog,cat", "--images-per-class", "2",
            "--samples-per-shard", "2", "--steps", "2", "--height", "32", "--width", "32", "--no-progress", *extra]


def run_cli(args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffuseg", *args], env=ENV, capture_output=True, text=True,
                          timeout=600, **kwargs)


def sample(index: int, size: int = 8, label_value: int = 1) -> dict:
    label = np.zeros((size, size), np.uint8)
    label[: size // 2] = label_value
    return {"image": np.full((size, size, 3), index, np.uint8), "label": label, "classes": [1], "prompt": f"p{index}",
            "seed": index, "pipeline": "test", "model": "none"}


def write_dataset(folder, count: int, per_shard: int = 2):
    with DatasetWriter(folder, CLASSES, samples_per_shard=per_shard) as writer:
        for i in range(count):
            writer.add(sample(i), index=i)
    return folder


def shards(folder) -> list[str]:
    return sorted(p.name for p in (folder / "data").glob("*.parquet"))


# ----------------------------------------------------------------------------- 1. one run per folder
def test_a_second_run_into_a_folder_in_use_is_refused_and_a_killed_owner_leaves_no_lock(tiny_model, tmp_path):
    out = tmp_path / "out"
    held = FolderLock(out)  # what a running `diffuseg generate` holds
    result = run_cli(generate_args(tiny_model, out))
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"is being written by another diffuseg run (process {os.getpid()})" in result.stderr
    assert "Traceback" not in result.stderr and not list(out.rglob("*.parquet"))
    with pytest.raises(DatasetMismatchError, match="another diffuseg run"):
        DatasetWriter(out, CLASSES)
    held.release()

    # The lock dies with its process: after kill -9 the folder is free at once.
    owner = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom diffuseg.data import FolderLock\nlock = FolderLock(sys.argv[1])\n"
         "print('locked', flush=True)\ntime.sleep(120)", str(out)],
        env=ENV, stdout=subprocess.PIPE, text=True,
    )
    assert owner.stdout.readline().strip() == "locked"
    assert FolderLock.is_held(out)
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    assert not FolderLock.is_held(out)
    write_dataset(out, 3)
    assert check_dataset_folder(out) == {"train": 3}


def test_push_refuses_blocks_written_twice_or_missing(tmp_path, capsys):
    # Two runs without a lock: one published block 1, the other staged it again and published too.
    doubled = write_dataset(tmp_path / "doubled", 4)
    staged = doubled / ".diffuseg" / "staging" / "train-b000001-i000000002.parquet"
    shutil.copy(doubled / "data" / "train-00001-of-00002.parquet", staged)
    DatasetWriter(doubled, CLASSES, samples_per_shard=2).close()
    assert len(datasets.load_dataset(str(doubled), split="train")) == 6  # what a reader would get: duplicates
    with pytest.raises(ValueError, match=r"1 block\(s\) of samples were written more than once"):
        check_dataset_folder(doubled)
    assert cli.main(["push", str(doubled), "--repo", "me/x", "--dry-run"]) == 2
    assert "written more than once" in capsys.readouterr().err

    # A shard lost and the rest renumbered, card rewritten: only the ledgers show the gap.
    gappy = write_dataset(tmp_path / "gappy", 6)
    data = gappy / "data"
    (data / "train-00001-of-00003.parquet").unlink()
    os.replace(data / "train-00000-of-00003.parquet", data / "train-00000-of-00002.parquet")
    os.replace(data / "train-00002-of-00003.parquet", data / "train-00001-of-00002.parquet")
    write_metadata(gappy)
    with pytest.raises(ValueError, match=r"samples are missing \(blocks \[1\] of 0..2"):
        check_dataset_folder(gappy)


# ----------------------------------------------------------------------------- 2. publication
KILL_INSIDE_PUBLISH = """
import os, signal, sys
replace, where = os.replace, sys.argv[1]

def replace_then_die(src, dst):
    replace(src, dst)
    landed_in_data = os.path.basename(os.path.dirname(os.fspath(dst))) == "data"
    if (where == "first-shard" and landed_in_data) or (where == "first-card" and os.path.basename(dst) == "README.md"):
        os.kill(os.getpid(), signal.SIGKILL)

os.replace = replace_then_die
from diffuseg import cli
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.parametrize("where", ["first-shard", "first-card"])
def test_a_kill_inside_publishing_leaves_nothing_readable_as_complete(tiny_model, tmp_path, where, capsys):
    out = tmp_path / "out"
    args = generate_args(tiny_model, out, "--images-per-class", "3")
    killed = subprocess.run([sys.executable, "-c", KILL_INSIDE_PUBLISH, where, *args], env=ENV, capture_output=True,
                            text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    if where == "first-shard":
        assert len(shards(out)) == 1  # one of three shards in data/, as a reader would find it
    with pytest.raises(Exception, match="PUBLISHING-INTERRUPTED"):
        datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="publishing was interrupted"):
        check_dataset_folder(out)
    assert cli.main(["push", str(out), "--repo", "me/x", "--dry-run"]) == 2
    capsys.readouterr()

    assert cli.main(args) == 0  # the rerun finishes the publication
    assert check_dataset_folder(out) == {"train": 6}
    assert "## How it was made" in (out / "README.md").read_text()
    assert len(datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "cache"))) == 6


# ----------------------------------------------------------------------------- 4, 9, 10. bad inputs
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--threshold", "1.5"], "--threshold must be otsu, adaptive or a number in [0, 1], got 1.5"),
        (["--guidance-scale", "-5"], "--guidance-scale must be 0 or more"),
        (["--seed", "-1"], "--seed must be 0 or more, got -1"),
        (["--steps", "0"], "--steps must be a positive integer, got 0"),
        (["--height", "0"], "--height must be a positive multiple of 8"),
        (["--images-per-class", str(10**12)], "2,000,000,000,000 samples, 1,000,000,000,000 shards of 2"),
        (["--resolutions", "7"], "resolutions [7] are not cross-attention map heights of this model at 32x32; it has [8, 16]"),
    ],
)
def test_bad_generate_inputs_fail_in_one_line_before_any_sample(tiny_model, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert cli.main(generate_args(tiny_model, out, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not list(out.rglob("*.parquet"))


@pytest.fixture(scope="module")
def tiny_pipe():
    pipe = tiny_stable_diffusion(DiffuMaskPipeline)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(
    "pipeline, overrides, message",
    [
        ("diffumask", {"height": 0}, "height and width must be positive multiples of 8 pixels, got height=0"),
        ("diffumask", {"width": 36}, "height and width must be positive multiples of 8 pixels, got width=36"),
        ("diffumask", {"guidance_scale": -3.0}, "guidance_scale must be 0 or more"),
        ("diffumask", {"num_inference_steps": 0}, "num_inference_steps must be a positive integer, got 0"),
        ("diffumask", {"num_inference_steps": -1}, "num_inference_steps must be a positive integer, got -1"),
        ("diffumask", {"threshold": 1.5}, "a numeric threshold must be in [0, 1], got 1.5"),
        ("diffumask", {"resolutions": [7]}, "it has [8, 16]"),
        ("counterfactual", {"guidance_scale": -3.0}, "guidance_scale must be 0 or more"),
        ("counterfactual", {"num_inference_steps": 0}, "num_inference_steps must be a positive integer"),
    ],
)
def test_bad_pipeline_inputs_fail_before_the_model_runs(tiny_pipe, pipeline, overrides, message):
    pipe = tiny_pipe if pipeline == "diffumask" else CounterfactualPipeline.from_pipe(tiny_pipe)
    calls = []
    handle = pipe.unet.register_forward_hook(lambda *_: calls.append(1))
    try:
        kwargs = {"height": 32, "width": 32, "num_inference_steps": 2, **overrides}
        with pytest.raises(ValueError, match=re.escape(message)):
            pipe("a dog on the grass", class_names=["dog"], **kwargs)
    finally:
        handle.remove()
    assert not calls  # refused before any denoising step


def write_raw_dataset(folder, image_size: int, label_size: int, label_value: int) -> str:
    """A Hub-layout folder written without diffuseg's writer (which would refuse these labels)."""
    image = Image.fromarray(np.full((image_size, image_size, 3), 90, np.uint8))
    label = np.zeros((label_size, label_size), np.uint8)
    label[:4] = label_value
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    dataset = datasets.Dataset.from_dict({"image": [image] * 4, "label": [Image.fromarray(label)] * 4}, features=features)
    (folder / "data").mkdir(parents=True)
    dataset.to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    (folder / "id2label.json").write_text(json.dumps({"0": "background", "1": "square"}))
    return str(folder)


@pytest.mark.parametrize(
    "image_size, label_size, label_value, message",
    [
        (64, 32, 1, "the image is 64x64 px but its label map is 32x32"),
        (32, 32, 7, "label values [7] are not class ids of the dataset"),
    ],
)
def test_training_refuses_labels_that_do_not_fit_before_any_work(tmp_path, capsys, image_size, label_size, label_value, message):
    data = write_raw_dataset(tmp_path / "set", image_size, label_size, label_value)
    output = tmp_path / "model"
    argv = ["train", "--train", data, "--config", "segformer-tiny", "--output-dir", str(output), "--max-steps", "1",
            "--image-size", "32"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (output / "model.safetensors").exists()


def test_the_writer_refuses_label_values_beyond_its_classes(tmp_path):
    with DatasetWriter(tmp_path / "set", CLASSES) as writer:
        writer.add(sample(0, label_value=255))  # ignore is a label value of every dataset
        with pytest.raises(ValueError, match=r"label values \[3\] are not class ids of this dataset"):
            writer.add(sample(1, label_value=3))


def test_model_folder_without_a_component_or_its_weights(tiny_model, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    shutil.rmtree(broken / "unet")
    assert cli.main(generate_args(str(broken), tmp_path / "a")) == 2
    assert "lacks its 'unet' component (unet/ is missing)" in capsys.readouterr().err
    shutil.copytree(os.path.join(tiny_model, "unet"), broken / "unet")
    for weights in (broken / "vae").glob("*.safetensors"):
        weights.unlink()
    assert cli.main(generate_args(str(broken), tmp_path / "b")) == 2
    assert "vae/ has no .safetensors weights" in capsys.readouterr().err


def test_unwritable_out_is_one_line(tiny_model, tmp_path):
    readonly = "/sys/diffuseg-test/out"  # /sys refuses new entries, even to root
    if os.path.exists("/sys/diffuseg-test") or not os.path.isdir("/sys"):
        pytest.skip("needs a read-only /sys")
    result = run_cli(generate_args(tiny_model, readonly))
    assert result.returncode == 1
    assert "cannot write there" in result.stderr and "/sys/diffuseg-test" in result.stderr
    assert "Traceback" not in result.stderr


def _file_size_limit(limit: int):
    def apply():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_no_room_for_a_shard_is_one_line_and_loses_nothing(tiny_model, tmp_path):
    out = tmp_path / "out"
    full = run_cli(generate_args(tiny_model, out), preexec_fn=_file_size_limit(3000))
    assert full.returncode == 1, full.stderr[-2000:]
    assert "file size limit reached" in full.stderr and "while writing a shard of about" in full.stderr
    assert "free space and rerun to resume" in full.stderr and "Traceback" not in full.stderr
    assert not list(out.rglob("*.tmp-*"))  # no partial file left behind
    assert cli.main(generate_args(tiny_model, out)) == 0  # with room again, the rerun finishes
    assert check_dataset_folder(out) == {"train": 4}


def test_a_damaged_shard_is_named_on_resume(tmp_path):
    folder = write_dataset(tmp_path / "set", 4)
    damaged = folder / "data" / "train-00001-of-00002.parquet"
    damaged.write_bytes(b"not parquet at all")
    with pytest.raises(DatasetMismatchError, match=re.escape(f"{damaged} is not a readable Parquet shard")) as error:
        DatasetWriter(folder, CLASSES, samples_per_shard=2)
    assert "delete it and rerun" in str(error.value)
    damaged.unlink()
    with DatasetWriter(folder, CLASSES, samples_per_shard=2) as writer:
        assert writer.completed_indices == {0, 1}
        for i in (2, 3):
            writer.add(sample(i), index=i)
    assert check_dataset_folder(folder) == {"train": 4}


# ----------------------------------------------------------------------------- 5. user files
def test_segment_and_train_never_overwrite_user_files(tiny_model, tmp_path, capsys):
    photo = tmp_path / "ok.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(photo)
    out = tmp_path / "seg"
    out.mkdir()
    (out / "ok.png").write_bytes(b"the user's own file")
    (out / "notes.txt").write_text("mine")
    segment = ["segment", str(photo), "--classes", "dog,cat", "--model", tiny_model, "--out", str(out)]
    assert cli.main(segment) == 2
    assert "already holds ok.png, which diffuseg did not write" in capsys.readouterr().err
    assert (out / "ok.png").read_bytes() == b"the user's own file"

    (out / "ok.png").unlink()
    assert cli.main(segment) == 0
    assert cli.main(segment) == 0  # its own files it may replace
    assert (out / "notes.txt").read_text() == "mine"
    assert Image.open(out / "ok.png").size == (40, 40)

    output = tmp_path / "model"
    output.mkdir()
    (output / "README.md").write_text("my notes")
    data = write_raw_dataset(tmp_path / "set", 32, 32, 1)
    assert cli.main(["train", "--train", data, "--config", "segformer-tiny", "--output-dir", str(output)]) == 2
    assert "--output-dir" in capsys.readouterr().err and (output / "README.md").read_text() == "my notes"


# ----------------------------------------------------------------------------- 6. resume runs no code
class Payload:
    """Unpickling this creates a file: proof that a checkpoint ran code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_payload_in_a_checkpoint_does_not_run(tmp_path):
    from diffuseg.training import TrainingArguments, train

    data = write_raw_dataset(tmp_path / "set", 32, 32, 1)
    args = dict(train=[data], config="segformer-tiny", image_size=32, batch_size=2, max_steps=2, checkpoint_steps=1)
    train(TrainingArguments(output_dir=str(tmp_path / "a"), **args))
    checkpoint = tmp_path / "a" / "checkpoints" / "step-00000001"
    assert not (checkpoint / "custom_checkpoint_0.pkl").exists()  # the scheduler state is JSON now

    result = train(TrainingArguments(output_dir=str(tmp_path / "b"), resume=str(checkpoint), **args))
    assert result.steps == 2 and len(result.losses) == 1

    marker = tmp_path / "payload-ran"
    payload = checkpoint / "custom_checkpoint_0.pkl"  # accelerate loaded this one with weights_only=False
    torch.save(Payload(str(marker)), payload)
    with pytest.raises(ValueError, match="custom_checkpoint_0.pkl: pickles, which diffuseg never loads"):
        train(TrainingArguments(output_dir=str(tmp_path / "c"), resume=str(checkpoint), **args))
    payload.unlink()
    torch.save(Payload(str(marker)), checkpoint / "optimizer.bin")
    with pytest.raises(ValueError, match="not plain tensor data, refused unread"):
        train(TrainingArguments(output_dir=str(tmp_path / "d"), resume=str(checkpoint), **args))
    assert not marker.exists()


# ----------------------------------------------------------------------------- 7. push uploads the dataset only
def test_push_plan_is_the_dataset_layout_only(tmp_path, capsys):
    from diffuseg.commands.push import plan_upload

    folder = write_dataset(tmp_path / "set", 4)
    secret = tmp_path / "secret"
    secret.write_text("token")
    (folder / ".env").write_text("HF_TOKEN=hf_secret")
    (folder / "shadow").symlink_to("/etc/shadow")
    (folder / "data" / "extra").symlink_to(secret)
    plan = plan_upload(folder, "me/set")
    assert [path for path, _ in plan.files] == [
        "README.md", "data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet", "id2label.json"]
    assert plan.left_out == [".env", "data/extra", "shadow"]
    assert cli.main(["push", str(folder), "--repo", "me/set", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 files" in out and "not uploaded (not part of the dataset layout): .env, data/extra, shadow" in out

    shard = folder / "data" / "train-00001-of-00002.parquet"
    shutil.move(shard, secret.with_suffix(".parquet"))
    shard.symlink_to(secret.with_suffix(".parquet"))
    with pytest.raises(ValueError, match="symbolic links where dataset files belong"):
        plan_upload(folder, "me/set")


# ----------------------------------------------------------------------------- 10. bounded work
def test_segment_caps_huge_images_by_default_and_shows_windows(tiny_model, tmp_path, capsys):
    photo = tmp_path / "big.jpg"
    Image.new("RGB", (1600, 1200), (120, 80, 40)).save(photo)
    out = tmp_path / "seg"
    assert cli.main(["segment", str(photo), "--classes", "dog", "--model", tiny_model, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    totals = [int(t) for t in re.findall(r"windows: .*?\d+/(\d+)", err)]
    # Native 64 px, so 8 window sides = 512 px: 10 x 7 windows instead of 33 x 25 at full size.
    assert totals and max(totals) <= 100
    assert Image.open(out / "big.png").size == (1600, 1200)  # outputs keep the input size
