"""diffuseg train / evaluate on real parquet folders: tiny SegFormers, 32-64 px, a few seconds each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffuseg import cli
from diffuseg.evaluation import load_segmentation_model
from diffuseg.training import (
    MODEL_PRESETS,
    TrainingArguments,
    build_model,
    counterfactual_absence_loss,
    counterfactual_embedding_loss,
    train,
    training_loss,
)
from diffuseg.training_data import (
    IGNORE_INDEX,
    MixtureSampler,
    SampleTransform,
    SegmentationSamples,
    build_label_space,
    collate_segmentation,
    load_source,
    training_label_lookups,
)

NAMES = ("background", "square", "circle")


def write_shapes_dataset(folder, count, seed, names=NAMES, size=64, split="train", synthetic=False, negatives=False, pipeline="test"):
    """A Hub-layout folder of red squares and blue discs on grey noise, exact masks.

    Red is always ``square`` and blue ``circle`` (else the last name) whatever ids ``names`` gives them; a few
    pixels are ignored. Synthetic sets carry the provenance columns; with ``negatives`` the
    counterfactual image is the same background without the shapes.
    """
    rng = np.random.default_rng(seed)
    ids = {name: i for i, name in enumerate(names)}
    red, blue = ids["square"], ids.get("circle", len(names) - 1)
    rows: dict[str, list] = {"image": [], "label": [], "classes": []}
    features = {"image": datasets.Image(), "label": datasets.Image(), "classes": datasets.Sequence(datasets.ClassLabel(names=list(names)))}
    if synthetic:
        rows.update(prompt=[], seed=[], pipeline=[], model=[])
        features.update(
            prompt=datasets.Value("string"), seed=datasets.Value("int64"), pipeline=datasets.Value("string"), model=datasets.Value("string")
        )
    if negatives:
        rows["negative_image"] = []
        features["negative_image"] = datasets.Image()
    rows_, cols = np.mgrid[:size, :size]
    for index in range(count):
        background = rng.integers(60, 120, (size, size, 3)).astype(np.uint8)
        image, label = background.copy(), np.zeros((size, size), np.uint8)
        top, left = rng.integers(0, size // 2, 2)
        height, width = rng.integers(size // 4, size // 2, 2)
        square = (rows_ >= top) & (rows_ < top + height) & (cols >= left) & (cols < left + width)
        centre_row, centre_col = rng.integers(size // 4, 3 * size // 4, 2)
        radius = rng.integers(size // 8, size // 4)
        disc = (rows_ - centre_row) ** 2 + (cols - centre_col) ** 2 < radius**2
        image[square], label[square] = (220, 30, 30), red
        image[disc], label[disc] = (30, 30, 220), blue
        label[0, :4] = IGNORE_INDEX
        rows["image"].append(Image.fromarray(image))
        rows["label"].append(Image.fromarray(label))
        rows["classes"].append(sorted({red, blue}))
        if synthetic:
            rows["prompt"].append("a red square and a blue circle")
            rows["seed"].append(index)
            rows["pipeline"].append(pipeline)
            rows["model"].append("none")
        if negatives:
            rows["negative_image"].append(Image.fromarray(background))
    dataset = datasets.Dataset.from_dict(rows, features=datasets.Features(features))
    (Path(folder) / "data").mkdir(parents=True)
    dataset.to_parquet(str(Path(folder) / "data" / f"{split}-00000-of-00001.parquet"))
    (Path(folder) / "id2label.json").write_text(json.dumps({str(i): name for i, name in enumerate(names)}))
    return str(folder)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    # These models are tiny: on a shared 2-core machine a second intra-op thread mostly spins
    # and waits, and makes each step many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    return {
        "real": write_shapes_dataset(root / "real", 4, 0),
        # Another id order: the label space is matched by name.
        "val": write_shapes_dataset(root / "val", 5, 1, names=("background", "circle", "square"), split="validation"),
        "syn": write_shapes_dataset(root / "syn", 6, 2, synthetic=True, negatives=True),
        "odd": write_shapes_dataset(root / "odd", 2, 3, names=("background", "square", "triangle"), split="validation"),
    }


def tiny_args(data, output_dir, **overrides) -> TrainingArguments:
    values = dict(
        train=[data["real"]], output_dir=str(output_dir), config="segformer-tiny", image_size=32, batch_size=4, max_steps=3, learning_rate=1e-2
    )
    return TrainingArguments(**{**values, **overrides})


def run_cli(argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what earlier steps printed
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_tiny_segformer_overfits_four_images_and_evaluate_reproduces_it(data, tmp_path, capsys):
    # A config.json without dropout: the from-config path, and train/eval behave alike.
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({**MODEL_PRESETS["segformer-tiny"], "classifier_dropout_prob": 0.0, "drop_path_rate": 0.0}))
    output = tmp_path / "model"
    args = tiny_args(
        data, output, config=str(config), eval=[data["real"]], eval_split="train", image_size=64, max_steps=60,
        lr_scheduler="constant", crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0),
    )
    result = train(args)
    report = result.eval_results[data["real"]]
    assert report["num_images"] == 4
    assert report["mean_iou"] > 0.9, report
    assert np.mean(result.losses[-5:]) < 0.3 * np.mean(result.losses[:5])

    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "id2label.json", "eval_results.json", "README.md"):
        assert (output / name).is_file(), name
    assert json.loads((output / "config.json").read_text())["id2label"] == {"0": "background", "1": "square", "2": "circle"}
    card = (output / "README.md").read_text()
    assert data["real"] in card and "mean_iou" in card and "image-segmentation" in card
    assert "(train split)" in card and all(r["split"] == "train" for r in result.eval_results.values())  # what was scored

    code, out, _ = run_cli(["evaluate", str(output), data["real"], "--split", "train", "--json"], capsys)
    assert code == 0
    reloaded = json.loads(out)
    assert reloaded["per_class"] == report["per_class"] and reloaded["mean_iou"] == report["mean_iou"]
    code, out, _ = run_cli(["evaluate", str(output), data["real"], "--split", "train"], capsys)
    assert code == 0 and "circle" in out and "mean_iou:" in out and "train split" in out
    assert reloaded["split"] == "train"


def test_resume_after_a_stop_gives_the_same_final_weights(data, tmp_path):
    # Two mixed sets (10 samples, 3 batches an epoch), counterfactual loss, augmentation and
    # dropout on: a stop at step 2 is mid-epoch, and every source of randomness must replay.
    common = dict(
        train=[data["real"], data["syn"]], train_weights=[1.0, 1.0], max_steps=5, checkpoint_steps=2, keep_checkpoints=None,
        crop_scale=(0.5, 2.0), learning_rate=5e-3,
    )
    uninterrupted = train(tiny_args(data, tmp_path / "a", **common))
    checkpoint = tmp_path / "a" / "checkpoints" / "step-00000002"
    assert (checkpoint / "trainer_state.json").is_file() and (tmp_path / "a" / "checkpoints" / "step-00000004").is_dir()
    resumed = train(tiny_args(data, tmp_path / "b", resume=str(checkpoint), **common))
    assert resumed.steps == 5 and len(resumed.losses) == 3
    assert resumed.losses == uninterrupted.losses[2:]
    expected, got = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[key], got[key]) for key in expected)
    # And the weights moved after the stop: the comparison is not of two copies of one state.
    at_stop = load_file(checkpoint / "model.safetensors")
    assert not torch.equal(at_stop["decode_head.classifier.weight"], expected["decode_head.classifier.weight"])


def test_two_process_accelerate_launch_counts_every_eval_image_once(data, tmp_path, capsys):
    output = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "diffuseg", "train", "--train", data["real"], "--eval", data["val"], "--config", "segformer-tiny",
        "--image-size", "32", "--max-steps", "2", "--batch-size", "2", "--eval-batch-size", "2", "--output-dir", str(output),
    ]
    # accelerate's --cpu flag alone starts one process without mpirun; torchrun processes use gloo on CPU with this.
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "on 2 process(es)" in (output / "README.md").read_text()
    gathered = json.loads((output / "eval_results.json").read_text())[data["val"]]
    assert gathered["num_images"] == 5  # 5 images on 2 processes: the padded duplicate is dropped

    code, out, _ = run_cli(["evaluate", str(output), data["val"], "--json", "--batch-size", "3"], capsys)
    assert code == 0
    single = json.loads(out)
    assert single["num_images"] == 5
    assert single["per_class"] == gathered["per_class"]
    assert single["mean_iou"] == gathered["mean_iou"]


def test_lora_adapter_round_trip_gives_identical_predictions(data, tmp_path):
    output = tmp_path / "lora"
    result = train(tiny_args(data, output, lora=True, lora_rank=4, learning_rate=2e-2))
    assert (output / "adapter_config.json").is_file() and (output / "adapter_model.safetensors").is_file()
    trainable = [name for name, parameter in result.model.named_parameters() if parameter.requires_grad]
    assert trainable and all("lora_" in name or "decode_head" in name for name in trainable)
    assert any("lora_" in name for name in trainable) and any("decode_head" in name for name in trainable)

    reloaded = load_segmentation_model(output).eval()
    trained = result.model.eval()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = trained(pixel_values=pixels).logits, reloaded(pixel_values=pixels).logits
        base = load_segmentation_model(output / "base").eval()(pixel_values=pixels).logits
    assert torch.equal(expected, got)
    assert not torch.allclose(base, got)  # the adapter carries the training


def test_zero_shot_ignores_unseen_classes_in_real_data_only(data, tmp_path):
    sources = [load_source(data["real"]), load_source(data["syn"])]
    space = build_label_space(sources)
    lookups, real = training_label_lookups(sources, space, ["circle"])
    assert real == [True, False]
    circle = {name: i for i, name in space.items()}["circle"]
    assert lookups[0][circle] == IGNORE_INDEX and lookups[1][circle] == circle
    lookups, real = training_label_lookups(sources, space, ["circle"], real=[data["syn"]])
    assert real == [False, True] and lookups[0][circle] == circle and lookups[1][circle] == IGNORE_INDEX
    # Rendered ground truth (ShapesWorld) has provenance columns too, yet is real data.
    rendered = write_shapes_dataset(tmp_path / "rendered", 1, 4, synthetic=True, pipeline="render")
    assert not load_source(rendered).synthetic and load_source(data["syn"]).synthetic

    output = tmp_path / "zs"
    result = train(tiny_args(data, output, eval=[data["val"]], unseen_classes=["circle"], max_steps=15, crop_scale=(1.0, 1.0)))
    report = result.eval_results[data["val"]]
    seen, unseen = report["mean_iou_seen"], report["mean_iou_unseen"]
    assert unseen == report["per_class"]["circle"]["iou"]
    assert unseen < 0.05 < seen  # circle pixels were never a target
    assert report["harmonic_mean_iou"] == pytest.approx(2 * seen * unseen / (seen + unseen))
    assert "unseen classes circle" in (output / "README.md").read_text()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--label-column", "mask"], "has no column 'mask'"),
        (["--eval", "{odd}"], "label space mismatch"),
        (["--unseen-classes", "triangle"], "not in the label space"),
        (["--labels", "background", "square"], "label space mismatch"),
        (["--train-weights", "1", "2"], "2 weights for 1 training datasets"),
        (["--eval", "./no/such/folder"], "does not exist"),
    ],
)
def test_bad_input_is_a_one_line_error(data, tmp_path, capsys, extra, message):
    argv = ["train", "--train", data["real"], "--config", "segformer-tiny", "--output-dir", str(tmp_path / "x"), "--max-steps", "1"]
    code, _, err = run_cli(argv + [item.format(**data) for item in extra], capsys)
    assert code == 2
    assert message in err and "Traceback" not in err


def test_augmentation_pads_with_ignore_and_moves_image_and_mask_together():
    label = torch.zeros(16, 16, dtype=torch.long)
    label[:, 8:] = 2
    image = torch.zeros(3, 16, 16)
    image[0, :, 8:] = 1.0  # red where the label is 2
    flip = SampleTransform(16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), augment=True, crop_scale=(1, 1), crop_ratio=(1, 1), hflip_prob=1.0)
    flipped_image, flipped_label, _ = flip(image, label, None, seed=0)
    assert torch.equal(flipped_label, label.flip(-1)) and torch.equal(flipped_image, image.flip(-1))

    zoom_out = SampleTransform(32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), augment=True, crop_scale=(3, 3), hflip_prob=0.0)
    first = zoom_out(image, label, image.clone(), seed=7)
    again = zoom_out(image, label, image.clone(), seed=7)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    _, padded_label, negative = first
    assert padded_label.shape == (32, 32) and negative.shape == (3, 32, 32)
    assert set(padded_label.unique().tolist()) == {0, 2, IGNORE_INDEX}  # nearest neighbour: no new ids
    assert torch.equal(first[0], negative)  # the counterfactual gets the same crop


def test_mixture_sampler_follows_weights_and_replays_epochs():
    sampler = MixtureSampler([4, 8], weights=[3, 1], seed=1)
    indices = [index for index, _ in sampler]
    assert len(indices) == 12 and sum(index < 4 for index in indices) == 9
    assert list(sampler) == list(sampler)
    sampler.set_epoch(1)
    assert [index for index, _ in sampler] != indices
    plain = MixtureSampler([4, 8], seed=1)
    assert sorted(index for index, _ in plain) == list(range(12))  # default: each sample once an epoch


def test_counterfactual_batch_and_loss(data):
    source = load_source(data["syn"])
    space = build_label_space([source])
    lookups, _ = training_label_lookups([source], space)
    samples = SegmentationSamples([source], lookups, SampleTransform(32), num_labels=3, background_id=0, with_negatives=True)
    batch = collate_segmentation([samples[0], samples[1]])
    assert batch["negative_pixel_values"].shape == (2, 3, 32, 32)
    assert batch["negative_classes"].tolist() == [[0.0, 1.0, 1.0]] * 2  # background is never "absent"

    classes = torch.tensor([[0.0, 1.0, 0.0]])
    says_square = torch.zeros(1, 3, 4, 4)
    says_square[:, 1] = 8.0
    says_background = torch.zeros(1, 3, 4, 4)
    says_background[:, 0] = 8.0
    assert counterfactual_absence_loss(says_square, classes) > 5 > 0.01 > counterfactual_absence_loss(says_background, classes)
    assert counterfactual_absence_loss(says_square, torch.zeros(1, 3)) == 0


def test_embedding_loss_contrasts_the_object_region_with_the_same_region_of_the_counterfactual():
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, :4, :4] = 1  # the object: top-left quarter, class 1
    classes = torch.tensor([[0.0, 1.0]])
    positive = torch.randn(1, 6, 4, 4)
    # The same features inside the region: cosine 1, whatever happens outside it.
    negative = torch.randn(1, 6, 4, 4)
    negative[..., :2, :2] = positive[..., :2, :2]
    assert torch.isclose(counterfactual_embedding_loss(positive, negative, labels, classes), torch.tensor(1.0))
    # Opposite inside the region: cosine -1, clamped at 0 (MagicSeg's max(0, cos)).
    negative[..., :2, :2] = -positive[..., :2, :2]
    assert counterfactual_embedding_loss(positive, negative, labels, classes) == 0
    # Orthogonal halves give the cosine itself.
    positive = torch.zeros(1, 2, 4, 4)
    positive[:, 0] = 1.0
    negative = torch.zeros(1, 2, 4, 4)
    negative[:, 0], negative[:, 1] = 1.0, 1.0
    assert torch.isclose(counterfactual_embedding_loss(positive, negative, labels, classes), torch.tensor(2**-0.5))
    # A class with no pixels left (cropped away) is skipped: nothing to contrast.
    assert counterfactual_embedding_loss(positive, negative, torch.zeros_like(labels), classes) == 0


def test_training_loss_pairs_each_negative_with_its_own_positive_in_a_mixed_batch(data):
    sources = [load_source(data["real"]), load_source(data["syn"])]
    space = build_label_space(sources)
    lookups, _ = training_label_lookups(sources, space)
    samples = SegmentationSamples(sources, lookups, SampleTransform(32), num_labels=3, background_id=0, with_negatives=True)
    real_count = len(sources[0].dataset)
    batch = collate_segmentation([samples[0], samples[real_count], samples[1], samples[real_count + 1]])
    assert batch["negative_index"].tolist() == [1, 3]  # rows 0 and 2 are real: no counterfactual

    torch.manual_seed(0)
    model = build_model(space, None, config="segformer-tiny").eval()  # no drop-path, fixed batch-norm: comparable passes
    plain = training_loss(model, batch, 0.0)
    both = model(pixel_values=torch.cat([batch["pixel_values"], batch["negative_pixel_values"]]), output_hidden_states=True)
    features = both.hidden_states[-1]
    expected = counterfactual_embedding_loss(
        features[[1, 3]], features[4:], batch["labels"][[1, 3]], batch["negative_classes"]
    )
    assert 0 < expected < 1
    with_loss = training_loss(model, batch, 2.0, "embedding")
    assert torch.isclose(with_loss, plain + 2.0 * expected, atol=1e-5)
    with_loss.backward()  # the contrast reaches the encoder through both images
    first_layer = next(p for name, p in model.named_parameters() if "patch_embeddings" in name)
    assert first_layer.grad.abs().sum() > 0
    absence = training_loss(model, batch, 1.0, "absence")
    assert absence > plain


def test_tensorboard_logging_when_asked(data, tmp_path):
    pytest.importorskip("tensorboard")
    train(tiny_args(data, tmp_path / "tb", max_steps=1, report_to="tensorboard"))
    assert list((tmp_path / "tb").rglob("events.out.tfevents*"))
