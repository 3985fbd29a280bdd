"""`diffuseg generate` / `push`: classes, prompts, filters, mosaic, resumption after kill -9,
2-process accelerate runs, the dataset read back by `datasets`, the upload plan."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from datasets import load_dataset
from PIL import Image

from diffuseg import cli
from diffuseg.data import DatasetMismatchError, check_dataset_folder, split_files
from diffuseg.generation import (
    DEFAULT_TEMPLATES,
    PRESETS,
    DescriptionPrompter,
    GenerationConfig,
    TemplatePrompter,
    WorkPlan,
    agreement_iou,
    check_prompt,
    check_templates,
    format_prompt,
    generate_dataset,
    mosaic,
    parse_classes,
    remap_label,
    sample_seed,
)
from diffuseg.models import modifier_phrases
from diffuseg.pipelines import DiffuMaskPipeline
from diffuseg.testing import build_clip_tokenizer, save_tiny_stable_diffusion, tiny_stable_diffusion

SIZE_ARGS = ["--steps", "2", "--height", "32", "--width", "32"]
STANDARD = ["image", "label", "classes", "prompt", "seed", "pipeline", "model"]
# One thread per process: a 1-process run and each of 2 accelerate processes then compute
# bit-identical floats, so their datasets can be compared exactly.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


# ----------------------------------------------------------------------------- helpers
def save_tiny_causal_lm(folder) -> str:
    """A random 1-layer GPT-2 over a word-level vocabulary, built in code (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from diffuseg.testing import DEFAULT_WORDS

    words = ["<unk>", "<eos>", *DEFAULT_WORDS, ".", ",", "sitting", "under", "near"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(words), n_positions=128, n_embd=16, n_layer=1, n_head=2,
                        bos_token_id=1, eos_token_id=1)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def save_tiny_segformer(folder, labels) -> str:
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    torch.manual_seed(0)
    config = SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], patch_sizes=[7, 3],
        strides=[4, 2], num_attention_heads=[1, 1], mlp_ratios=[2, 2], decoder_hidden_size=16,
        num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
    )
    SegformerForSemanticSegmentation(config).save_pretrained(folder)
    SegformerImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return str(folder)


def rows_of(folder) -> list[dict]:
    rows = []
    for path in split_files(folder)["train"]:
        rows += pq.read_table(path).to_pylist()
    return rows


def run_cli(args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffuseg", *args], env=ENV, capture_output=True, text=True,
                          timeout=600, **kwargs)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return save_tiny_stable_diffusion(tmp_path_factory.mktemp("models") / "tiny-sd")


def generate_args(model: str, out) -> list[str]:
    return ["generate", "--out", str(out), "--model", model, "--classes", "dog,cat=cat|kitten",
            "--images-per-class", "8", "--samples-per-shard", "2", "--batch-size", "2", "--seed", "3",
            "--no-progress", *SIZE_ARGS]


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    """An uninterrupted 1-process CLI run: 16 samples in 8 shards."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    result = run_cli(generate_args(tiny_model, out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


# ----------------------------------------------------------------------------- classes and prompts
def test_presets_and_class_specs(tmp_path):
    assert len(PRESETS["voc20"]().classes) == 20 and len(PRESETS["coco80"]().classes) == 80
    voc = parse_classes("voc20")
    assert voc.names[0] == "aeroplane" and "airplane" in voc.classes[0].words
    shapes = parse_classes("shapes")
    assert shapes.names == ["circle", "square", "triangle"] and shapes.templates
    # what a counterfactual removes and says instead comes from the model (its diffuseg.json), not the classes:
    # the embedded model drops the colour with the shape, for its empty scenes' word; other models say "nothing"
    config = GenerationConfig(out=str(tmp_path / "x"), classes=shapes, images_per_class=1, pipeline="counterfactual")
    fingerprint = config.fingerprint()
    assert (fingerprint["counterfactual_replacement"], fingerprint["num_inference_steps"], fingerprint["guidance_scale"]) == (
        "background", 25, 4.0)
    assert "red" in fingerprint["object_modifiers"]
    assert modifier_phrases("a picture of a red circle on a background", ["circle"], config.object_modifiers) == ["red circle"]
    other = GenerationConfig(out=str(tmp_path / "y"), classes=voc, images_per_class=1, model="owner/any-sd-checkpoint")
    assert (other.counterfactual_replacement, other.object_modifiers, other.num_inference_steps, other.guidance_scale) == (
        "nothing", (), 50, 7.5)
    assert dataclasses.replace(config, counterfactual_replacement="void").fingerprint()["counterfactual_replacement"] == "void"

    listed = parse_classes("dog, cat=cat|kitten ,traffic light")
    assert listed.names == ["dog", "cat", "traffic light"] and listed.classes[1].words == ("cat", "kitten")
    text_file = tmp_path / "classes.txt"
    text_file.write_text("# my classes\ndog\ncat=cat|kitten  # with a synonym\n")
    assert parse_classes(str(text_file)).classes == listed.classes[:2]
    json_file = tmp_path / "classes.json"
    json_file.write_text(json.dumps({"dog": {"synonyms": ["dog", "puppy"], "contexts": ["in a park"]}}))
    assert parse_classes(str(json_file)).classes[0].contexts == ("in a park",)

    with pytest.raises(ValueError, match="unknown class preset 'voc21'"):
        parse_classes("voc21")
    with pytest.raises(ValueError, match="unknown class preset 'coco'"):
        parse_classes("coco")
    assert parse_classes("coco,").names == ["coco"]  # explicit one-class list
    with pytest.raises(FileNotFoundError, match="does not exist"):
        parse_classes("missing/classes.txt")
    with pytest.raises(ValueError, match="duplicate"):
        parse_classes("dog,dog")


def test_every_preset_prompt_names_its_class():
    for name, make in PRESETS.items():
        class_set = make()
        prompter = TemplatePrompter(class_set)
        rng = np.random.default_rng(0)
        for class_id in range(1, len(class_set.classes) + 1):
            for _ in range(3):
                prompt, words = prompter([class_id], rng)
                check_prompt(prompt, words)
                assert words[0] in class_set.classes[class_id - 1].words
    prompt, _ = TemplatePrompter(parse_classes("shapes"))([1], np.random.default_rng(1))
    assert "circle" in prompt and prompt.split()[0] in ("a", "one")  # ShapesWorld caption grammar


def test_templates_articles_and_token_limit():
    assert format_prompt("a photo of {a} {class} {context}", ["aeroplane"], "in the sky") == "a photo of an aeroplane in the sky"
    assert format_prompt("a photo of {a} {class} {context}", ["dog", "owl"]) == "a photo of a dog and an owl"
    with pytest.raises(ValueError, match="does not contain {class}"):
        check_templates(["a photo of a dog"])
    with pytest.raises(ValueError, match="unknown placeholders"):
        check_templates(["a {class} {where}"])
    tokenizer = build_clip_tokenizer()
    check_prompt("a photo of a dog", ["dog"], tokenizer)
    with pytest.raises(ValueError, match="token limit"):
        check_prompt("the " * 80 + "dog", ["dog"], tokenizer)
    with pytest.raises(ValueError, match="does not appear"):
        check_prompt("a photo of a cats", ["cat"], tokenizer)


def test_descriptions_from_a_local_language_model(tmp_path):
    folder = save_tiny_causal_lm(tmp_path / "lm")
    prompter = DescriptionPrompter(folder, parse_classes("dog,cat"), max_new_tokens=8)
    first = prompter([1, 2], np.random.default_rng(5))
    assert first == prompter([1, 2], np.random.default_rng(5))  # seeded sampling: reproducible
    prompt, words = first
    assert words == ["dog", "cat"]
    check_prompt(prompt, words, build_clip_tokenizer())
    assert any(template.split()[0] == prompt.split()[0] for template in DEFAULT_TEMPLATES)
    assert len(prompt.split()) > len(format_prompt("a photograph of {a} {class}", words).split()) - 3
    with pytest.raises(FileNotFoundError, match="prompt model folder"):
        DescriptionPrompter(tmp_path / "missing", parse_classes("dog"))


# ----------------------------------------------------------------------------- pieces
def test_mosaic_tiles_images_and_masks_together():
    images = [np.full((12, 12, 3), 40 * k, np.uint8) for k in range(4)]
    labels = [np.full((12, 12), k + 1, np.uint8) for k in range(4)]
    labels[3][:, :] = 255
    image, label = mosaic(images, labels, 2)
    assert image.shape == (12, 12, 3) and label.shape == (12, 12)
    assert (label[:6, :6] == 1).all() and (label[:6, 6:] == 2).all() and (label[6:, :6] == 3).all()
    assert (label[6:, 6:] == 255).all()
    np.testing.assert_array_equal(image[6:, :6], np.full((6, 6, 3), 80, np.uint8))
    image3, label3 = mosaic(images * 2 + images[:1], labels * 2 + labels[:1], 3)
    assert set(np.unique(label3)) <= {1, 2, 3, 255} and image3.shape == (12, 12, 3)
    with pytest.raises(ValueError, match="needs 4"):
        mosaic(images[:3], labels[:3], 2)


def test_remap_iou_and_seeds():
    mask = np.array([[0, 1, 2, 255]], np.uint8)
    np.testing.assert_array_equal(remap_label(mask, [7, 3]), [[0, 7, 3, 255]])
    label = np.array([[1, 1, 0, 255]], np.uint8)
    assert agreement_iou(label, np.array([[1, 0, 0, 1]]), [1]) == pytest.approx(0.5)  # ignore pixel left out
    assert agreement_iou(label, np.array([[2, 2, 2, 2]]), [1]) == 0.0
    seeds = {sample_seed(0, i) for i in range(1000)}
    assert len(seeds) == 1000 and sample_seed(0, 5) == sample_seed(0, 5) != sample_seed(1, 5)


# ----------------------------------------------------------------------------- CLI
def test_help_documents_every_option():
    parser = cli.build_parser(["generate", "push"])
    subparsers = next(a for a in parser._actions if a.dest == "command")
    for name in ("generate", "push"):
        sub = subparsers.choices[name]
        text = sub.format_help()
        for action in sub._actions:
            if action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
            for option in action.option_strings:
                assert option in text


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--classes", "voc21"], "unknown class preset"),
        (["--images-per-class", "0"], "--images-per-class must be a positive integer"),
        (["--samples-per-shard", "-1"], "--samples-per-shard must be a positive integer"),
        (["--model", "./no/such/model"], "does not exist"),
        (["--prompt-model", "./no/such/lm"], "prompt model folder"),
        (["--pipeline", "nosuch"], "unknown pipeline 'nosuch'"),
        (["--agreement-keep", "0.3"], "need --agreement-model"),
    ],
)
def test_clear_errors(tmp_path, capsys, extra, message):
    rc = cli.main(["generate", "--out", str(tmp_path / "out"), *extra])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_template_without_class_word_is_refused(tmp_path, capsys):
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of {a} {class}\na photo of a dog in the park\n")
    rc = cli.main(["generate", "--out", str(tmp_path / "out"), "--templates", str(templates)])
    assert rc == 2 and "does not contain {class}" in capsys.readouterr().err


# ----------------------------------------------------------------------------- in-process generation
def test_filters_mosaic_descriptions_and_card(tmp_path):
    pipe = tiny_stable_diffusion(pipeline_class=DiffuMaskPipeline)
    config = GenerationConfig(
        out=str(tmp_path / "ds"), classes=parse_classes("dog,cat"), images_per_class=6, model="tiny-random",
        seed=1, prompt_model=save_tiny_causal_lm(tmp_path / "lm"), prompt_max_new_tokens=6,
        two_class_fraction=0.5, height=32, width=32, num_inference_steps=2, min_mask_area=0.02,
        agreement_model=save_tiny_segformer(tmp_path / "seg", ["background", "dog", "cat"]), agreement_keep=0.8,
        mosaic=2, mosaic_fraction=0.5, batch_size=3, samples_per_shard=6,
    )
    summary = generate_dataset(config, pipe=pipe, progress=False)
    assert summary.generated == 12 and summary.kept + sum(summary.rejected.values()) == 12
    assert summary.rejected.get("agreement_keep", 0) >= 2  # at least 1 of each 6-sample shard

    ds = load_dataset(str(tmp_path / "ds"), split="train")
    extras = ["agreement_iou", "ignore_fraction", "mask_area", "mosaic", "mosaic_tiles"]
    assert ds.column_names == STANDARD + extras
    assert ds.features["classes"].feature.names == ["background", "dog", "cat"]
    assert len(ds) == summary.kept + summary.mosaics
    plain = [row for row in ds if row["mosaic"] == 0]
    mosaics = [row for row in ds if row["mosaic"] == 2]
    assert mosaics and len(plain) == summary.kept
    seeds = {row["seed"] for row in plain}
    for row in plain:
        assert row["mask_area"] >= 0.02 and 0.0 <= row["agreement_iou"] <= 1.0
        for c in row["classes"]:
            check_prompt(row["prompt"], [["dog", "cat"][c - 1]])
        assert row["label"].mode == "L" and set(np.unique(np.asarray(row["label"]))) <= {0, 1, 2, 255}
    for row in mosaics:
        tiles = [int(s) for s in row["mosaic_tiles"].split(",")]
        assert len(tiles) == 4 and set(tiles) <= seeds and row["prompt"].count(" | ") == 3
    assert any(len(row["classes"]) == 2 for row in plain + mosaics)

    check_dataset_folder(tmp_path / "ds")
    card = (tmp_path / "ds" / "README.md").read_text()
    assert "Rejected samples:" in card and "agreement_keep" in card and "2×2 mosaics" in card
    assert "| 1 | dog | dog |" in card and "MagicSeg-style descriptions" in card

    # Sample i is reproducible from the plan: same prompt and seed, same image and mask.
    plan = WorkPlan(config)
    prompter = DescriptionPrompter(config.prompt_model, config.classes, max_new_tokens=6)
    by_seed = {row["seed"]: row for row in rows_of(tmp_path / "ds")}
    request = next(plan.request(i, prompter) for i in range(12) if sample_seed(1, i) in by_seed)
    row = by_seed[request.seed]
    assert row["prompt"] == request.prompt
    again = pipe(request.prompt, class_names=request.words, generator=torch.Generator().manual_seed(request.seed),
                 height=32, width=32, num_inference_steps=2, output_type="np")
    image = (np.clip(again.images[0], 0, 1) * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(row["image"]["bytes"]))), image)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(row["label"]["bytes"]))),
                                  remap_label(again.masks[0], request.class_ids))

    # Same settings: nothing left to do. Other settings: refused.
    assert generate_dataset(config, pipe=pipe, progress=False).generated == 0
    with pytest.raises(DatasetMismatchError, match="seed: 1 -> 2"):
        generate_dataset(GenerationConfig(**{**config.__dict__, "seed": 2}), pipe=pipe, progress=False)
    # Samples depend on the batch in their last bits: another batch size would mix two datasets.
    with pytest.raises(DatasetMismatchError, match="batch_size: 3 -> 1"):
        generate_dataset(GenerationConfig(**{**config.__dict__, "batch_size": 1}), pipe=pipe, progress=False)
    strict = GenerationConfig(out=str(tmp_path / "strict"), classes=parse_classes("dog"), images_per_class=1,
                              model="tiny-random", height=32, width=32, num_inference_steps=2, min_mask_area=1.0)
    with pytest.raises(ValueError, match="rejected every sample"):
        generate_dataset(strict, pipe=pipe, progress=False)


# ----------------------------------------------------------------------------- subprocesses
def test_reference_run_is_a_valid_dataset(reference):
    assert check_dataset_folder(reference) == {"train": 16}
    ds = load_dataset(str(reference), split="train")
    assert ds.column_names == STANDARD + ["ignore_fraction", "mask_area"]
    assert sorted(ds["seed"]) == sorted(sample_seed(3, i) for i in range(16))
    assert sorted(os.listdir(reference / "data")) == [f"train-{k:05d}-of-00008.parquet" for k in range(8)]
    assert json.loads((reference / "id2label.json").read_text()) == {"0": "background", "1": "dog", "2": "cat"}


def test_kill_9_and_rerun_equals_an_uninterrupted_run(tiny_model, reference, tmp_path):
    out = tmp_path / "resumed"
    process = subprocess.Popen([sys.executable, "-m", "diffuseg", *generate_args(tiny_model, out)], env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = out / ".diffuseg" / "staging"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if staging.is_dir() and len(list(staging.glob("*.parquet"))) >= 2:
            break
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "id2label.json").exists()  # interrupted before publishing
    written = len(list(staging.glob("*.parquet")))
    assert 2 <= written < 8

    result = run_cli(generate_args(tiny_model, out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{written} shard(s) were already done" in result.stdout
    assert rows_of(out) == rows_of(reference)
    assert check_dataset_folder(out) == {"train": 16}

    other = generate_args(tiny_model, out)
    other[other.index("--seed") + 1] = "4"
    refused = run_cli(other)
    assert refused.returncode == 2 and "already holds a different 'train' split (seed: 3 -> 4)" in refused.stderr


def test_two_accelerate_processes_equal_one(tiny_model, reference, tmp_path):
    out = tmp_path / "distributed"
    # On a machine without GPU, `--multi_gpu` is what starts N torchrun processes (they form a
    # gloo group on CPU); accelerate's `--cpu` launcher starts several processes only through mpirun.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "diffuseg", *generate_args(tiny_model, out)]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = rows_of(out)
    seeds = [row["seed"] for row in rows]
    assert len(seeds) == len(set(seeds)) == 16  # no duplicate, none missing
    assert rows == rows_of(reference)  # same content, same shards
    writers = {json.loads(pq.read_schema(p).metadata[b"diffuseg"])["pid"] for p in split_files(out)["train"]}
    assert len(writers) == 2  # each process wrote its own shards
    assert check_dataset_folder(out) == {"train": 16}


def test_push_plan_and_folder_checks(reference, tmp_path, capsys):
    from diffuseg.commands.push import plan_upload

    plan = plan_upload(reference, "me/voc-synth", private=True)
    files = [path for path, _ in plan.files]
    assert files == ["README.md", *[f"data/train-{k:05d}-of-00008.parquet" for k in range(8)], "id2label.json"]
    assert plan.rows == {"train": 16} and plan.total_bytes == sum((reference / f).stat().st_size for f in files)

    assert cli.main(["push", str(reference), "--repo", "me/voc-synth", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dataset repo me/voc-synth (public); train: 16 rows" in out and ".diffuseg" not in out

    offline = subprocess.run([sys.executable, "-m", "diffuseg", "push", str(reference), "--repo", "me/x"],
                             env={**ENV, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert offline.returncode == 2 and "HF_HUB_OFFLINE is set" in offline.stderr

    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(reference, broken)
    card = (broken / "README.md").read_text()
    (broken / "README.md").write_text(card.replace("num_examples: 16", "num_examples: 17"))
    (broken / "data" / "train-00003-of-00008.parquet").unlink()
    with pytest.raises(ValueError, match="not a complete NNNNN-of-NNNNN set.*card dataset_info counts"):
        plan_upload(broken, "me/x")
    assert cli.main(["push", str(broken), "--repo", "me/x"]) == 2
    with pytest.raises(ValueError, match="--repo must look like"):
        plan_upload(reference, "a/b/c")


# ----------------------------------------------------------------------------- dataset scripts
def load_script(name):
    import importlib.util
    import sys
    from pathlib import Path

    folder = Path(__file__).parent.parent / "dataset_scripts"
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(folder))  # as when the script runs: its folder comes first on sys.path
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
    return module


@pytest.mark.parametrize("name", ["voc_diffumask", "coco_diffumask", "shapes_diffumask"])
def test_dataset_script_settings_are_valid(name, tiny_model):
    import dataclasses

    settings = dict(load_script(name).SETTINGS)
    fields = {f.name for f in dataclasses.fields(GenerationConfig)}
    assert set(settings) <= fields
    # agreement_keep applies when the run names an agreement model (--agreement-model).
    config = GenerationConfig(**{**settings, "classes": parse_classes(settings["classes"]), "model": tiny_model,
                                 "agreement_model": "some/segmenter"})
    config.validate()
    if name == "voc_diffumask":  # the paper's settings, written down
        assert (settings["model"], config.height, config.num_inference_steps, config.guidance_scale) == (
            "CompVis/stable-diffusion-v1-4", 512, 50, 7.0)
        assert len(config.classes.classes) == 20 and config.num_samples == 60_000


def test_shapes_script_runs_end_to_end(tiny_model, tmp_path):
    script = load_script("shapes_diffumask")
    out = tmp_path / "shapes"
    argv = ["--out", str(out), "--model", tiny_model, "--images-per-class", "1", "--batch-size", "3"]
    assert script.run_dataset_script({**script.SETTINGS, "num_inference_steps": 2}, script.__doc__, argv) == 0
    ds = load_dataset(str(out), split="train")
    assert ds.features["classes"].feature.names == ["background", "circle", "square", "triangle"]
    assert 1 <= len(ds) <= 3 and "Generated by `diffuseg generate`" in (out / "README.md").read_text()
    assert set(ds["pipeline"]) == {"diffumask"} and "| guidance scale | 4.0 |" in (out / "README.md").read_text()


def test_a_resume_keeps_the_thread_count_the_dataset_was_started_with(tiny_model, tmp_path, capsys, monkeypatch):
    # 1 vs 2 torch threads change a few pixels by 1: the count is a setting of the dataset.
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    args = ["generate", "--out", str(tmp_path / "ds"), "--model", tiny_model, "--classes", "dog",
            "--images-per-class", "2", "--no-progress", *SIZE_ARGS]
    assert cli.main([*args, "--threads", "2"]) == 0
    capsys.readouterr()
    assert cli.main([*args, "--threads", "1"]) != 0
    assert "threads: 2 -> 1" in capsys.readouterr().err
    # Without --threads the rerun takes the stored count, whatever the default would be now.
    assert cli.main(args) == 0
    assert "this process generated 0 " in capsys.readouterr().out
