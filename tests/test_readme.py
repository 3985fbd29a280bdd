"""Every code example of the README runs, on the embedded model, and gives a sensible result.

Each fenced block is found by its text. Python blocks run as written (in a folder holding the
datasets earlier examples make); bash lines are run, or, where they need a Hub checkpoint or a GPU
cluster, parsed by the real ``diffuseg`` parser, or skipped for a stated reason (installation, the
test suite itself, hours-long training). A README block or command line that no rule here covers
fails the test: a new example comes with its check.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
BLOCKS = [(m.group(1), m.group(2)) for m in re.finditer(r"```(\w+)\n(.*?)```", README, re.S)]

# Sizes of the examples, scaled down so the suite stays fast; the commands are otherwise as written.
SMALLER = {
    "--images-per-class 8": "--images-per-class 2",
    "--images-per-class 100": "--images-per-class 2",
    "--max-steps 2000": "--max-steps 20",
    'write_real_dataset("shapes-real", 2000, 500, 500)': 'write_real_dataset("shapes-real", 16, 8, 8)',
    "--split validation": "--split validation --limit 4",
}

SKIPPED = {  # line prefix -> why it is not run here
    "pip install": "installation (the CI runs it)",
    "if ! command -v chromium": "installation (the CI runs it)",
    "python -m pytest": "the test suite itself",
    "diffuseg train ... --resume": "elided arguments",
    "accelerate launch --multi_gpu --num_processes 4 -m diffuseg generate --classes voc20 ...": "elided arguments",
    "python -m diffuseg.shapesworld.train": "hours of training (its resume is tested in test_shapesworld.py)",
    "python benchmarks/shapesworld_quality.py": "a benchmark of minutes",
    "python benchmarks/shapesworld_protocol.py": "a benchmark of hours",
}
HUB_ONLY = ("--model CompVis/stable-diffusion-v1-4", "--train voc-synth voc-real")  # parsed, not run: Hub models


def bash_lines(block: str) -> list[str]:
    """Command lines of a bash block: continuations joined, comments and blanks dropped."""
    joined = block.replace("\\\n", " ")
    lines = []
    for line in joined.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line and not line.startswith("#"):
            lines.append(" ".join(line.split()))
    return lines


def smaller(text: str) -> str:
    for old, new in SMALLER.items():
        text = text.replace(old, new)
    return text


def block(marker: str) -> str:
    found = [code for _, code in BLOCKS if marker in code]
    assert len(found) == 1, f"{len(found)} README blocks contain {marker!r}"
    return found[0]


def run_diffuseg(line: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run a README command line in this process (``diffuseg ...`` through its entry point,
    ``python benchmarks/X.py ...`` as ``__main__``): subprocesses would pay the imports each time."""
    import contextlib
    import io
    import runpy

    from diffuseg.cli import main

    argv = []
    for arg in shlex.split(line):  # the shell's globbing, in cwd
        argv += sorted(str(p.relative_to(cwd)) for p in cwd.glob(arg)) or [arg] if "*" in arg else [arg]
    out, err = io.StringIO(), io.StringIO()
    previous, previous_argv, threads = os.getcwd(), sys.argv, torch.get_num_threads()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            if argv[0] == "diffuseg":
                code = main(argv[1:])
            else:
                assert argv[0] == "python" and argv[1].startswith("benchmarks/"), line
                sys.argv = [str(REPO / argv[1]), *argv[2:]]
                try:
                    runpy.run_path(sys.argv[0], run_name="__main__")
                    code = 0
                except SystemExit as exit:
                    code = exit.code or 0
    finally:
        os.chdir(previous)
        sys.argv = previous_argv
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A folder with what the README's examples make before others use it: the main job's dataset,
    the rendered real set and two scenes to segment."""
    folder = tmp_path_factory.mktemp("readme")
    (main_job,) = [line for line in bash_lines(BLOCKS[0][1]) if "diffuseg generate" in line.split("&&")[-1]]
    generate = smaller(main_job.split("&&")[-1].strip())
    result = run_diffuseg(generate, folder)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch uses" in result.stderr and "CPU thread" in result.stderr  # the thread choice is printed
    exec_block(smaller(block("write_real_dataset(")), folder)
    from diffuseg.shapesworld import make_sample

    (folder / "more").mkdir()
    for name, index in (("scene.png", 6), ("more/a.png", 2), ("more/b.png", 3)):
        make_sample("validation", index)["image"].save(folder / name)
    return folder


def exec_block(code: str, cwd: Path, **names) -> dict:
    namespace = dict(names)
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        exec(compile(code, "README.md", "exec"), namespace)
    finally:
        os.chdir(previous)
    return namespace


def coverage(mask, label_id: int) -> float:
    return float((np.asarray(mask) == label_id).mean())


# ----------------------------------------------------------------------------- every block is covered
PYTHON_MARKERS = (
    "diffuseg.capture(pipe", "load_default_model(DiffuMaskPipeline)", 'community_pipeline("diffumask")',
    "load_dataset(", 'community_pipeline("freemask")', 'community_pipeline("counterfactual")',
    "load_pipeline(MaskDiffusionSegPipeline", "load_mean_iou", "write_real_dataset(", "save_tiny_stable_diffusion(",
    "DiffuMaskXLPipeline.from_pretrained(", 'load_default_model("shapesworld-dit")',
)


def test_every_readme_example_has_a_check():
    for language, code in BLOCKS:
        assert language in ("python", "bash"), language
        if language == "python":
            assert sum(marker in code for marker in PYTHON_MARKERS) == 1, f"no check for README block:\n{code}"
            continue
        for line in bash_lines(code):
            covered = (any(line.startswith(prefix) for prefix in SKIPPED) or any(h in line for h in HUB_ONLY)
                       or line.startswith(("diffuseg ", "python benchmarks/maskdiffusion_eval.py"))
                       or "&& diffuseg generate" in line)
            assert covered, f"no rule for README command: {line}"


# ----------------------------------------------------------------------------- bash
def test_main_job_writes_a_sensible_dataset_with_the_models_defaults(workspace):
    from datasets import load_dataset

    folder = workspace / "shapes-synth"
    card = (folder / "README.md").read_text()
    assert "| denoising steps | 25 |" in card and "| guidance scale | 4.0 |" in card  # the model's defaults
    assert "64×64 px" in card and "native" not in card
    dataset = load_dataset(str(folder), split="train")
    assert len(dataset) == 6
    for row in dataset:
        label = np.asarray(row["label"])
        assert set(np.unique(label)) <= {0, 1, 2, 3, 255}
        named = coverage(label, row["classes"][0]) if row["classes"] else 0.0
        assert 0.01 < named < 0.6, (row["prompt"], named)  # an object, not the whole image
    namespace = exec_block(block("load_dataset("), workspace)
    assert len(namespace["ds"]) == 6


def test_bash_examples_run_or_parse(workspace):
    from diffuseg.cli import build_parser

    ran = []
    for _, code in [b for b in BLOCKS if b[0] == "bash"][1:]:
        for line in bash_lines(code):
            if any(line.startswith(prefix) for prefix in SKIPPED):
                continue
            if any(h in line for h in HUB_ONLY):
                argv = shlex.split(line)
                argv = argv[argv.index("diffuseg") + 1:] if "diffuseg" in argv else argv[1:]
                build_parser([argv[0]]).parse_args(argv)  # the options exist; the model is not downloadable here
                continue
            if line.startswith("diffuseg push"):
                line += " --dry-run"  # never upload from a test
                line = line.replace("voc-synth", "shapes-synth")
            result = run_diffuseg(smaller(line), workspace)
            assert result.returncode == 0, (line, result.stderr[-3000:])
            ran.append((line, result))
    outputs = {line.split()[1] if line.startswith("diffuseg") else "eval": result.stdout for line, result in ran}
    assert "shapes-synth" in outputs["push"]
    assert "validation split" in outputs["eval"] or "[validation]" in outputs["eval"]
    # segment: dataset ids in files, labels.json names them, the scene's two shapes are found
    labels = json.loads((workspace / "seg" / "labels.json").read_text())
    assert labels == {"0": "background", "1": "circle", "2": "square", "3": "triangle"}
    segmented = np.asarray(PIL.Image.open(workspace / "seg" / "scene.png"))
    assert 0.3 < coverage(segmented, 0) < 0.95 and {1, 2} <= set(np.unique(segmented))
    assert json.loads((workspace / "clusters" / "labels.json").read_text())["1"] == "cluster 1"
    # train and evaluate: tables say which split they scored
    assert "shapes-real" in outputs["evaluate"] and "split" in outputs["evaluate"]


# ----------------------------------------------------------------------------- python
def test_attention_capture_example(workspace):
    namespace = exec_block(block("diffuseg.capture(pipe"), workspace)
    circle = namespace["maps"]["circle"]
    square = namespace["maps"]["square"]
    assert circle.shape == (1, 64, 64) and torch.isfinite(circle).all()
    assert set(namespace["maps"].per_resolution()) == {(16, 16), (8, 8)}
    # two words, two places: the maps are not the same blob
    assert torch.corrcoef(torch.stack([circle.flatten(), square.flatten()]))[0, 1] < 0.9


def test_diffumask_example_masks_cover_objects_not_the_image(workspace):
    namespace = exec_block(block("load_default_model(DiffuMaskPipeline)"), workspace)
    out = namespace["out"]
    assert len(out.images) == len(out.masks) == 4
    for mask in out.masks:
        for class_id in (1, 2):
            assert coverage(mask, class_id) < 0.45, coverage(mask, class_id)
        assert coverage(mask, 0) > 0.3  # ShapesWorld objects cover well under half the image
        assert coverage(mask, 1) + coverage(mask, 2) > 0.02
    with pytest.raises(ValueError, match=r"it has \[8, 16\]"):  # the paper's levels on this model: an error
        namespace["pipe"]("a picture of a red circle", class_names=["circle"], num_inference_steps=2,
                          resolutions=(16, 32, 64))


def test_community_pipeline_example(workspace):
    namespace = exec_block(block('community_pipeline("diffumask")'), workspace)
    assert type(namespace["pipe"]).__name__ == "DiffuMaskPipeline"


def test_freemask_example(workspace):
    namespace = exec_block(block('community_pipeline("freemask")'), workspace)
    out = namespace["out"]
    labels = np.asarray(out.masks[0])
    assert set(np.unique(labels)) <= {0, 1, 2, 3, 255} and coverage(labels, 1) > 0.01  # the base circle
    assert len(out.inserted[0]) + len(out.rejected[0]) == 2  # each object inserted or rejected with a reason
    for record in out.inserted[0]:  # an inserted object is where it was put
        visible = labels == record.class_id
        assert visible.any() and record.region[visible].mean() > 0.5, record.class_name
    assert all(record.reason for record in out.rejected[0])


def test_counterfactual_example_removes_the_object(workspace):
    namespace = exec_block(block('community_pipeline("counterfactual")'), workspace)
    out = namespace["out"]
    mask = np.asarray(out.masks[0]) == 1
    positive = np.asarray(out.images[0], dtype=np.float32)
    negative = np.asarray(out.negative_images[0], dtype=np.float32)
    change = np.abs(positive - negative).mean(axis=-1)
    assert 0.01 < mask.mean() < 0.5
    assert change[mask].mean() > 2 * change[~mask].mean()  # the object went, the scene stayed
    assert float(np.asarray(out.agreement).ravel()[0]) > 0.3


def test_maskdiffusion_example_labels_the_rendered_shapes(workspace):
    from diffuseg.shapesworld import make_sample

    namespace = exec_block(block("load_pipeline(MaskDiffusionSegPipeline"), workspace)
    segmentation = np.asarray(namespace["out"].segmentation[0])
    truth = np.asarray(make_sample("validation", 6)["label"])  # 0 background, 1 circle, 2 square, 3 triangle
    for class_id in np.unique(truth):
        predicted = 3 if class_id == 0 else class_id - 1  # the pipeline's ids: classes from 0, background last
        assert (segmentation[truth == class_id] == predicted).mean() > 0.6, class_id
    clusters = np.asarray(namespace["clusters"].segmentation[0])
    assert len(np.unique(clusters)) >= 2


def test_metric_example(workspace):
    preds = [np.array([[0, 1], [2, 2]]), np.array([[15, 16], [0, 0]])]
    labels = [np.array([[0, 1], [2, 255]]), np.array([[15, 0], [0, 0]])]
    namespace = exec_block(block("load_mean_iou"), workspace, preds=preds, labels=labels)
    direct = namespace["mean_iou"](preds, labels, num_labels=21, unseen_classes=[15, 16])
    computed = namespace["metric"].compute(predictions=preds, references=labels, num_labels=21, ignore_index=255)
    assert 0 < direct["mean_iou"] < 1 and abs(computed["mean_iou"] - direct["mean_iou"]) < 1e-6


def test_shapesworld_and_tiny_model_examples(workspace):
    from datasets import load_dataset

    real = load_dataset(str(workspace / "shapes-real"))
    assert {name: len(split) for name, split in real.items()} == {"train": 16, "validation": 8, "test": 8}
    namespace = exec_block(block("save_tiny_stable_diffusion("), workspace)
    assert type(namespace["pipe"]).__name__ == "DiffuMaskPipeline" and (workspace / "tiny-sd" / "model_index.json").is_file()


def test_model_families_example_on_tiny_models_of_each_family(tmp_path):
    """The SDXL / SD3.5 / FLUX block, with tiny local models in place of the Hub ids (and their
    sizes: one attention level, one double-stream block, 2 steps)."""
    from diffuseg.testing import save_tiny_pipeline

    folders = {family: save_tiny_pipeline(tmp_path / family, family, seed=0) for family in ("sdxl", "sd3", "flux")}
    code = block("DiffuMaskXLPipeline.from_pretrained(")
    for old, new in {
        '"stabilityai/stable-diffusion-xl-base-1.0"': repr(folders["sdxl"]),
        '"stabilityai/stable-diffusion-3.5-medium"': repr(folders["sd3"]),
        '"black-forest-labs/FLUX.1-dev"': repr(folders["flux"]),
        '"black-forest-labs/FLUX.1-schnell"': repr(folders["flux"]),
        "resolutions=(32, 64)": "resolutions=(16,), num_inference_steps=2",
        "guidance_scale=4.5": "guidance_scale=4.5, num_inference_steps=2",
        "blocks=range(19)": "blocks=range(1), num_inference_steps=2",
        "num_inference_steps=4": "num_inference_steps=2",
    }.items():
        assert old in code, old
        code = code.replace(old, new)
    namespace = exec_block(code, tmp_path)
    out = namespace["out"]  # FLUX's, from concept maps
    masks = np.stack([np.asarray(mask) for mask in out.masks])
    width, height = out.images[0].size
    assert masks.shape[1:] == (height, width) and set(np.unique(masks)) <= {0, 1, 2, 255}
    assert namespace["maps"]["dog"].shape == (1, height, width)
    pair = namespace["pair"]  # SD3's counterfactual pair
    assert len(pair.negative_images) == len(pair.images) == 1
    assert set(np.unique(np.asarray(pair.masks[0]))) <= {0, 1, 255}


def test_shapesworld_dit_example_gives_an_image_and_its_mask(workspace):
    # The DiT is still training (its quality bars are not met): this checks the shipped snapshot loads
    # offline and DiffuMask runs through it, not what it draws.
    namespace = exec_block(block('load_default_model("shapesworld-dit")'), workspace)
    out = namespace["out"]
    assert out.images[0].size == (64, 64)
    assert np.asarray(out.masks[0]).shape == (64, 64) and set(np.unique(np.asarray(out.masks[0]))) <= {0, 1, 255}
