"""MaskDiffusionSegPipeline, its CLI, its evaluation script and the overlay helpers, on tiny offline models."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from diffuseg.models import load_pipeline
from diffuseg.pipelines import MaskDiffusionSegOutput, MaskDiffusionSegPipeline
from diffuseg.pipelines.maskdiffusion import (
    cluster_scores,
    image_to_tensor,
    ABSENT_SCORE,
    kmeans,
    present_class_scores,
    prompt_chunks,
    prototype_scores,
    silhouette_score,
    window_boxes,
)
from diffuseg.testing import build_clip_tokenizer, save_tiny_stable_diffusion, tiny_stable_diffusion
from diffuseg.tokens import token_weights
from diffuseg.visualize import overlay, palette

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["dog", "cat"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; on a busy 2-core machine more threads spin (4x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe():
    return tiny_stable_diffusion(pipeline_class=MaskDiffusionSegPipeline, seed=0)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return save_tiny_stable_diffusion(tmp_path_factory.mktemp("model") / "tiny-sd", seed=0)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def photo(height: int = 32, width: int = 32, seed: int = 0) -> np.ndarray:
    """Two flat colour halves plus noise: an RGB uint8 image with some structure."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), np.float64)
    image[:, : width // 2] = rng.integers(0, 256, 3)
    image[:, width // 2 :] = rng.integers(0, 256, 3)
    return np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)


def count_unet_calls(pipe) -> list[int]:
    calls = []
    pipe.unet.register_forward_pre_hook(lambda module, args, kwargs: calls.append(int(args[0].shape[0])), with_kwargs=True)
    return calls


# ---------------------------------------------------------------------- the method on planted data
def planted_regions(height: int = 24, width: int = 24) -> torch.Tensor:
    regions = torch.zeros(height, width, dtype=torch.long)
    regions[:, 8:16] = 1
    regions[:, 16:] = 2
    regions[2:6, 2:6] = 2  # a second, separate piece of class 2
    return regions


def test_prototype_assignment_recovers_planted_regions():
    torch.manual_seed(0)
    regions = planted_regions()
    directions = F.normalize(torch.randn(3, 16), dim=1)
    features = (directions[regions].permute(2, 0, 1) + 0.1 * torch.randn(16, *regions.shape))[None]
    # Rough attention: strong inside the class, spilling everywhere else, multiplicative noise.
    inside = F.one_hot(regions, 3).permute(2, 0, 1).float()
    attention = (inside + 0.3 * (1 - inside)) * torch.empty(3, *regions.shape).uniform_(0.5, 1.5)
    scores = prototype_scores(features, attention[None])
    assert scores.shape == (1, 3, 24, 24)
    assert torch.equal(scores.argmax(dim=1)[0], regions)
    # Prototypes are weighted means: scaling one class's attention changes nothing.
    rescaled = attention.clone()
    rescaled[0] *= 100
    assert torch.allclose(prototype_scores(features, rescaled[None]), scores, atol=1e-5)
    # Attention that points at the wrong region moves the class there (the assignment is not a constant).
    swapped = attention[[1, 0, 2]]
    assert torch.equal(prototype_scores(features, swapped[None]).argmax(dim=1)[0], torch.tensor([1, 0, 2])[regions])


def test_a_named_class_absent_from_the_image_is_dropped_and_gives_its_pixels_back():
    torch.manual_seed(0)
    regions = planted_regions()  # classes 0, 1, 2 present; class 2 also in a small separate piece
    directions = F.normalize(torch.randn(4, 16), dim=1)
    features = directions[regions].permute(2, 0, 1) + 0.05 * torch.randn(16, *regions.shape)
    features[:, 2:6, 2:6] += 0.6 * directions[3][:, None, None]  # the small piece looks a little different
    inside = F.one_hot(regions, 3).permute(2, 0, 1).float()
    # A 4th name, absent from the image: its attention peaks on the small piece of another object.
    absent = torch.zeros(*regions.shape)
    absent[2:6, 2:6] = 1.0
    attention = torch.cat([inside + 0.3 * (1 - inside), absent[None]])
    stolen = present_class_scores(features, attention).argmax(0)
    assert (stolen[2:6, 2:6] == 3).all()  # without the presence decision the absent class takes the piece
    scores = present_class_scores(features, attention, min_class_share=0.1)
    assert torch.equal(scores.argmax(0), regions) and (scores[3] == ABSENT_SCORE).all()
    # The background word's class (the last, outside `removable`) is never dropped, however small.
    kept = present_class_scores(features, attention, min_class_share=0.1, removable=3)
    assert torch.equal(kept.argmax(0), stolen)
    # The floor: attention below it does not count toward a prototype.
    floored = present_class_scores(features, attention[:3] * 0.5 + inside * 0.5, attention_floor=0.6)
    assert torch.allclose(floored, prototype_scores(features[None], inside[None])[0], atol=1e-5)


def test_kmeans_recovers_planted_clusters_deterministically():
    torch.manual_seed(1)
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    directions = F.normalize(torch.randn(3, 8), dim=1)
    points = directions[labels] + 0.05 * torch.randn(100, 8)
    assignments, centres = kmeans(points, 3, generator(0))
    assert torch.equal(assignments, labels)  # largest cluster first, so ids are canonical
    assert torch.allclose(centres.norm(dim=1), torch.ones(3))
    again, _ = kmeans(points, 3, generator(0))
    assert torch.equal(again, assignments)
    assert silhouette_score(points, labels) > 0.8
    assert silhouette_score(points, torch.arange(100) % 3) < 0.1

    features = points.T.reshape(8, 10, 10)
    scores = cluster_scores(features, None, max_clusters=6, generator=generator(0))
    assert scores.shape == (3, 10, 10)  # k chosen automatically: the planted 3
    assert torch.equal(scores.argmax(dim=0).flatten(), labels)


def test_window_boxes_cover_the_image_aligned():
    assert window_boxes(32, 24, 64, 0.25, 4) == [(0, 0, 32, 24)]
    boxes = window_boxes(96, 64, 40, 0.25, 8)
    covered = torch.zeros(96, 64)
    for top, left, h, w in boxes:
        assert (h, w) == (40, 40) and top % 8 == 0 and left % 8 == 0
        covered[top : top + h, left : left + w] += 1
    assert covered.min() >= 1
    assert max(top for top, *_ in boxes) == 96 - 40 and max(left for _, left, *_ in boxes) == 64 - 40


# ---------------------------------------------------------------------- pipeline outputs
def test_output_types_shapes_and_dtypes(pipe):
    out = pipe(photo(), CLASSES, generator=generator())
    assert isinstance(out, MaskDiffusionSegOutput)
    assert out.segmentation.shape == (1, 32, 32) and out.segmentation.dtype == np.int64
    assert out.scores.shape == (1, 2, 32, 32) and out.scores.dtype == np.float32
    assert np.array_equal(out.segmentation, out.scores.argmax(axis=1))
    assert np.all(np.abs(out.scores) <= 1 + 1e-5)  # cosine similarities

    segmentation, scores = pipe(photo(), CLASSES, generator=generator(), output_type="pt", return_dict=False)
    assert segmentation.dtype == torch.int64 and scores.dtype == torch.float32 and scores.shape == (1, 2, 32, 32)
    assert np.array_equal(segmentation.numpy(), out.segmentation)

    pil = pipe(photo(), CLASSES, generator=generator(), output_type="pil")
    assert pil.segmentation[0].mode == "L" and pil.segmentation[0].size == (32, 32)
    assert np.array_equal(np.asarray(pil.segmentation[0]), out.segmentation[0])


@pytest.mark.parametrize("size", [(37, 23), (8, 50), (5, 7)])
def test_any_input_size_comes_back_at_that_size(pipe, size):
    out = pipe(photo(*size), CLASSES, generator=generator())
    assert out.segmentation.shape == (1, *size) and out.scores.shape == (1, 2, *size)


def test_one_unet_pass_per_batch_by_default_and_the_decoder_stops_early():
    three_levels = tiny_stable_diffusion(pipeline_class=MaskDiffusionSegPipeline, seed=0, block_out_channels=(32, 32, 64))
    calls = count_unet_calls(three_levels)
    finest_block = []
    three_levels.unet.up_blocks[2].register_forward_hook(lambda *args: finest_block.append(1))
    out = three_levels([photo(), photo(seed=1)], CLASSES, generator=generator())
    assert calls == [2]  # one conditional pass, both images in one batch
    assert finest_block == []  # default features and attention need only the two coarsest up blocks
    assert out.scores.shape == (2, 2, 32, 32)

    calls.clear()
    three_levels(photo(), CLASSES, timesteps=[10, 100], num_noise_draws=2, generator=generator())
    assert calls == [1] * 4


def test_batch_equals_one_by_one(pipe):
    images = [photo(seed=1), photo(seed=2)]
    batch = pipe(images, CLASSES, generator=[generator(1), generator(2)])
    for i, image in enumerate(images):
        single = pipe(image, CLASSES, generator=generator(i + 1))
        assert np.allclose(batch.scores[i], single.scores[0], atol=1e-5)
        assert np.array_equal(batch.segmentation[i], single.segmentation[0])
    mixed = pipe([photo(32, 32), photo(20, 28)], CLASSES, generator=generator())
    assert [s.shape for s in mixed.segmentation] == [(32, 32), (20, 28)]
    assert [s.shape for s in mixed.scores] == [(2, 32, 32), (2, 20, 28)]


def test_same_generator_same_result(pipe):
    a = pipe(photo(), CLASSES, generator=generator(3))
    b = pipe(photo(), CLASSES, generator=generator(3))
    c = pipe(photo(), CLASSES, generator=generator(4))
    assert np.array_equal(a.scores, b.scores) and np.array_equal(a.segmentation, b.segmentation)
    assert not np.array_equal(a.scores, c.scores)


def test_a_prompt_of_your_own_reads_each_class_at_its_own_tokens(pipe):
    # the default prompt is the names joined by " and ": the same text given as a prompt is the same call
    default = pipe(photo(), ["dog", "cat"], background_prompt="grass", generator=generator())
    same = pipe(photo(), ["dog", "cat"], prompt="dog and cat and grass", background_prompt="grass", generator=generator())
    assert np.array_equal(default.scores, same.scores)
    # names listed in another order than the prompt's: each channel still follows its own word
    swapped = pipe(photo(), ["cat", "dog"], prompt="dog and cat and grass", background_prompt="grass",
                   generator=generator())
    assert np.allclose(swapped.scores[:, [1, 0, 2]], default.scores, atol=1e-6)
    captioned = pipe(photo(), ["dog", "cat"], prompt="a photo of a dog and a cat", generator=generator())
    assert not np.allclose(captioned.scores, pipe(photo(), ["dog", "cat"], generator=generator()).scores)


def test_rgba_l_and_16_bit_inputs(pipe, tmp_path):
    rgb = photo()
    alpha = np.linspace(0, 255, 32 * 32).reshape(32, 32).astype(np.uint8)
    rgba = np.dstack([rgb, alpha])
    composited = (rgb / 255) * (alpha[..., None] / 255) + (1 - alpha[..., None] / 255)
    assert torch.allclose(image_to_tensor(PIL.Image.fromarray(rgba, "RGBA")), torch.tensor(composited).permute(2, 0, 1).float(), atol=1e-6)

    grey = rgb[..., 0]
    from_l = image_to_tensor(PIL.Image.fromarray(grey, "L"))
    assert torch.equal(from_l, image_to_tensor(np.dstack([grey] * 3)))
    assert torch.equal(image_to_tensor(torch.from_numpy(grey)), from_l)

    # 16-bit: divided by 65535, so v * 257 reads as the 8-bit v / 255 (also after a PNG round trip).
    deep = grey.astype(np.uint16) * 257
    PIL.Image.fromarray(deep).save(tmp_path / "deep.png")
    with PIL.Image.open(tmp_path / "deep.png") as reopened:
        assert reopened.mode.startswith("I")
        assert torch.allclose(image_to_tensor(reopened), from_l, atol=1e-6)
    assert torch.allclose(image_to_tensor(deep), from_l, atol=1e-6)

    out = pipe(PIL.Image.fromarray(rgba, "RGBA"), CLASSES, generator=generator())
    same = pipe(composited, CLASSES, generator=generator())
    assert np.allclose(out.scores, same.scores, atol=1e-4)
    for image in (PIL.Image.fromarray(grey, "L"), PIL.Image.fromarray(deep), torch.rand(3, 32, 32), torch.rand(2, 3, 32, 32)):
        result = pipe(image, CLASSES, generator=generator())
        assert result.segmentation.shape[-2:] == (32, 32)


def test_background_id_is_the_number_of_classes(pipe):
    plain = pipe(photo(), CLASSES, generator=generator())
    prompt = pipe(photo(), CLASSES, background_prompt="background", generator=generator())
    assert prompt.scores.shape == (1, 3, 32, 32)
    assert set(np.unique(prompt.segmentation)) <= {0, 1, 2}
    assert np.array_equal(prompt.segmentation, prompt.scores.argmax(axis=1))

    everything = pipe(photo(), CLASSES, background_threshold=1.01, generator=generator())
    assert everything.scores.shape == (1, 3, 32, 32) and (everything.segmentation == 2).all()
    nothing = pipe(photo(), CLASSES, background_threshold=-1.01, generator=generator())
    assert np.array_equal(nothing.segmentation, plain.segmentation)

    middle = float(np.median(plain.scores.max(axis=1)))
    some = pipe(photo(), CLASSES, background_threshold=middle, generator=generator())
    below = plain.scores.max(axis=1) < middle
    assert np.array_equal(some.segmentation == 2, below) and 0 < below.sum() < below.size
    both = pipe(photo(), CLASSES, background_prompt="background", background_threshold=middle, generator=generator())
    assert np.allclose(both.scores[:, 2], np.maximum(prompt.scores[:, 2], middle))


def test_sliding_window(pipe):
    image = photo()
    default = pipe(image, CLASSES, generator=generator())
    for window in (32, 256):  # the image fits one window: the same single pass
        fitted = pipe(image, CLASSES, window_size=window, generator=generator())
        assert np.array_equal(fitted.scores, default.scores)

    calls = count_unet_calls(pipe)
    tiled = pipe(photo(64, 44), CLASSES, window_size=32, window_overlap=0.25, generator=generator())
    assert tiled.segmentation.shape == (1, 64, 44) and np.isfinite(tiled.scores).all()
    assert len(calls) == len(window_boxes(64, 44, 32, 0.25, pipe.size_multiple)) == 6

    # Blending: where one window alone covers the image, the features are that window's own.
    prompt = "dog and cat"
    embeds, _ = pipe.encode_prompt(prompt, torch.device("cpu"), 1, False)
    prompts = [(embeds, token_weights(pipe.tokenizer, [prompt], [CLASSES]))]
    pixels = image_to_tensor(photo(32, 64))[None]
    options = dict(levels=pipe.attention_levels(None), blocks=[0, 1], timesteps=[50], num_noise_draws=1)
    features, _ = pipe.extract(pixels, prompts, generator=[generator()], window=32, overlap=0.0, **options)
    left, _ = pipe.extract(pixels[..., :32], prompts, generator=[generator()], window=32, overlap=0.0, **options)
    assert features.shape[-1] == 2 * left.shape[-1]
    assert torch.allclose(features[..., : left.shape[-1]], left, atol=1e-6)


def test_unsupervised_clusters(pipe):
    out = pipe(photo(), num_clusters=3, generator=generator())
    assert out.scores.shape == (1, 3, 32, 32) and set(np.unique(out.segmentation)) <= {0, 1, 2}
    assert np.array_equal(out.segmentation, out.scores.argmax(axis=1))
    again = pipe(photo(), num_clusters=3, generator=generator())
    assert np.array_equal(out.scores, again.scores)

    auto = pipe([photo(seed=3), photo(seed=4)], max_clusters=5, generator=[generator(1), generator(2)])
    for scores in auto.scores:
        k = int(np.isfinite(scores[:, 0, 0]).sum())
        assert 2 <= k <= 5 and np.isneginf(scores[k:]).all()


def test_class_names_split_over_prompts_when_they_exceed_the_token_limit():
    short = tiny_stable_diffusion(pipeline_class=MaskDiffusionSegPipeline, seed=0, model_max_length=8)
    names = ["dog", "cat", "car", "bird", "sofa"]
    chunks = prompt_chunks(short.tokenizer, names)
    assert [w for chunk in chunks for w in chunk] == names and len(chunks) > 1
    calls = count_unet_calls(short)
    out = short(photo(), names, generator=generator())
    assert out.scores.shape == (1, 5, 32, 32) and len(calls) == len(chunks)
    with pytest.raises(ValueError, match="longer than the text encoder"):
        prompt_chunks(build_clip_tokenizer(model_max_length=8), ["supercalifragilistic"])


@pytest.mark.parametrize(
    "image, kwargs, message",
    [
        (None, dict(class_names=[]), "class_names is empty"),
        (None, dict(class_names=["dog", "Dog"]), "duplicate class names"),
        (None, dict(class_names="dog,cat"), "list of names"),
        (None, dict(class_names=["dog"], background_prompt="dog"), "duplicate class names"),
        (np.zeros((4, 32, 32), np.uint8), dict(class_names=["dog"]), "1 to 4 channels"),
        (np.full((32, 32, 3), 2.0), dict(class_names=["dog"]), r"\[0, 1\]"),
        (np.zeros((32, 32, 3), np.int32), dict(class_names=["dog"]), "unsupported image dtype"),
        ([], dict(class_names=["dog"]), "no images given"),
        ("photo.png", dict(class_names=["dog"]), "PIL images, numpy arrays or torch tensors"),
        (None, dict(class_names=["dog"], num_clusters=3), "num_clusters is for the unsupervised mode"),
        (None, dict(class_names=["dog", "cat"], prompt="a photo of a dog"), "class word 'cat' does not appear"),
        (None, dict(background_threshold=0.5), "background handling needs class_names"),
        (None, dict(class_names=["dog"], timesteps=1000), r"timesteps must be integers in \[0, 999\]"),
        (None, dict(class_names=["dog"], feature_blocks=[5]), "feature_blocks"),
        (None, dict(class_names=["dog"], attention_resolutions=[7]), "not among this model's cross-attention"),
        (None, dict(class_names=["dog"], window_size=2), "window_size must be at least"),
        (None, dict(class_names=["dog"], window_overlap=1.0), "window_overlap"),
        (None, dict(class_names=["dog"], output_type="latent"), "output_type"),
        (None, dict(class_names=["dog"], generator=[generator(), generator()]), "2 generators for 1 images"),
    ],
)
def test_bad_input_is_a_clear_error(pipe, image, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe(photo() if image is None else image, **kwargs)


def test_custom_pipeline_loads_with_trust_remote_code(model_folder, pipe):
    from diffusers import DiffusionPipeline

    shim = str(REPO / "pipelines" / "maskdiffusion")
    loaded = DiffusionPipeline.from_pretrained(model_folder, custom_pipeline=shim, trust_remote_code=True)
    assert type(loaded).__name__ == "MaskDiffusionSegPipeline"
    loaded.set_progress_bar_config(disable=True)
    out = loaded(photo(), CLASSES, generator=generator())
    expected = pipe(photo(), CLASSES, generator=generator())
    assert np.allclose(out.scores, expected.scores, atol=1e-5)
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(model_folder, custom_pipeline=shim)


# ---------------------------------------------------------------------- overlays
def test_palette_and_overlay():
    colours = palette(12)
    assert colours.shape == (12, 3) and colours.dtype == np.uint8
    assert len({tuple(c) for c in colours}) == 12 and np.array_equal(palette(5), colours[:5])
    image = photo()
    labels = np.zeros((32, 32), np.int64)
    labels[:, 16:] = 1
    labels[:4] = 255  # an id with no name: left as it is
    picture = overlay(image, labels, ["cat", "background"], background_id=1)
    assert picture.mode == "RGB" and picture.width >= 32 and picture.height > 32  # legend below
    pixels = np.asarray(picture)[:32, :32]
    assert np.array_equal(pixels[:, 16:], image[:, 16:]) and np.array_equal(pixels[:4], image[:4])
    assert not np.array_equal(pixels[4:, :16], image[4:, :16])
    assert overlay(image, labels, ["cat", "background"], legend=False).size == (32, 32)
    with pytest.raises(ValueError, match="does not match"):
        overlay(image, labels[:10], ["cat"])


# ---------------------------------------------------------------------- command line
def write_images(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(photo(32, 40)).save(folder / "street.png")
    PIL.Image.fromarray(np.dstack([photo(seed=1), np.full((32, 32), 200, np.uint8)]), "RGBA").save(folder / "cut.png")
    (folder / "sub").mkdir(exist_ok=True)
    PIL.Image.fromarray(photo(seed=2)[..., 0], "L").save(folder / "sub" / "street.png")
    return [str(folder / "street.png"), str(folder / "cut.png"), str(folder / "sub" / "street.png")]


def test_cli_writes_label_pngs_overlays_and_legend(tmp_path, model_folder):
    from diffuseg.cli import main

    images = write_images(tmp_path / "in")
    out = tmp_path / "out"
    args = ["segment", *images, "--classes", "dog, cat", "--background", "background", "--model", model_folder, "--out", str(out)]
    assert main(args) == 0
    # the datasets' ids in files: 0 background, 1..C the classes in --classes order
    assert json.loads((out / "labels.json").read_text()) == {"0": "background", "1": "dog", "2": "cat"}
    for stem, size in (("street", (40, 32)), ("cut", (32, 32)), ("street-2", (32, 32))):
        with PIL.Image.open(out / f"{stem}.png") as labels:
            assert labels.mode == "L" and labels.size == size and set(np.unique(np.asarray(labels))) <= {0, 1, 2}
        with PIL.Image.open(out / f"{stem}_overlay.png") as picture:
            assert picture.mode == "RGB" and picture.height > size[1]
    # the same pixels as the pipeline's own ids (classes from 0, background last), shifted
    pipe = load_pipeline(MaskDiffusionSegPipeline, model_folder)
    direct = pipe(PIL.Image.open(images[0]), ["dog", "cat"], background_prompt="background",
                  generator=torch.Generator().manual_seed(0), output_type="np").segmentation[0]
    with PIL.Image.open(out / "street.png") as labels:
        assert np.array_equal(np.asarray(labels), np.where(direct == 2, 0, direct + 1))

    clusters = tmp_path / "clusters"
    assert main(["segment", images[0], "--clusters", "2", "--model", model_folder, "--out", str(clusters)]) == 0
    assert json.loads((clusters / "labels.json").read_text()) == {"1": "cluster 1", "2": "cluster 2"}


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["missing.png", "--classes", "dog"], "image file not found: missing.png"),
        (["{text}", "--classes", "dog"], "cannot read"),
        (["{image}", "--classes", " , "], "names no class"),
        (["{image}", "--classes", "dog,cat,Dog"], "duplicate class names"),
        (["{image}"], "give --classes"),
        (["{image}", "--classes", "dog", "--clusters", "2"], "not both"),
        (["{image}", "--classes", "dog,cat", "--prompt", "a dog"], "--prompt must name every class"),
        (["{image}", "--clusters", "2", "--prompt", "a dog"], "need --classes"),
    ],
)
def test_cli_errors_are_one_clear_line(tmp_path, capsys, arguments, message):
    from diffuseg.cli import main

    (tmp_path / "notes.png").write_text("not an image")
    PIL.Image.fromarray(photo()).save(tmp_path / "ok.png")
    arguments = [a.format(text=tmp_path / "notes.png", image=tmp_path / "ok.png") for a in arguments]
    assert main(["segment", *arguments, "--out", str(tmp_path / "out"), "--model", "/nonexistent"]) == 2
    # one line of error after the line every command starts with (its thread choice)
    threads, error = capsys.readouterr().err.strip().split("\n", 1)
    assert threads.startswith("diffuseg: torch uses") and message in error and len(error.splitlines()) == 1


# ---------------------------------------------------------------------- evaluation script
def load_eval_script():
    spec = importlib.util.spec_from_file_location("maskdiffusion_eval", REPO / "benchmarks" / "maskdiffusion_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hungarian_matching_undoes_a_permutation():
    evaluation = load_eval_script()
    reference = np.zeros((8, 8), np.uint8)
    reference[:, 4:] = 2
    reference[:2] = 255
    clusters = np.where(reference == 2, 0, 1)  # cluster ids swapped relative to the classes
    clusters[0, 0] = 2  # a third cluster, unmatched: an id outside every class
    matched = evaluation.match_clusters(clusters, reference, unmatched=9)
    assert np.array_equal(matched[2:], reference[2:]) and matched[0, 0] == 9


def test_split_matching_is_one_table_for_every_image():
    evaluation = load_eval_script()
    first = np.array([[0, 0, 2, 2]])
    second = np.array([[0, 0, 0, 255]])
    # Cluster 0 is class 0 in both images, cluster 1 class 2 in the first only: the split's
    # table follows the summed overlap, and cluster 1 of the second image gets it too.
    clusters = [np.array([[0, 0, 1, 1]]), np.array([[0, 1, 0, 0]])]
    table = evaluation.split_cluster_table(clusters, [first, second], unmatched=9)
    assert table.tolist() == [0, 2]
    assert (table[clusters[1]] == [[0, 2, 0, 0]]).all()  # per image it would have been all 0


def test_evaluation_script_reports_miou(tmp_path, model_folder, capsys):
    from diffuseg.data import DatasetWriter

    dataset = tmp_path / "shapes"
    with DatasetWriter(dataset, ["dog", "cat"], split="validation", samples_per_shard=2) as writer:
        for i in range(3):
            label = np.zeros((32, 32), np.uint8)
            label[4:20, 4:20] = 1 + i % 2
            label[0] = 255
            writer.add({"image": photo(seed=i), "label": label, "classes": [1 + i % 2], "prompt": "", "seed": i,
                        "pipeline": "render", "model": "none"}, index=i)
    evaluation = load_eval_script()
    report_path = tmp_path / "report.json"
    evaluation.main([str(dataset), "--model", model_folder, "--output", str(report_path)])
    report = json.loads(report_path.read_text())
    assert report["num_images"] == 3 and 0.0 <= report["mean_iou"] <= 1.0
    assert set(report["per_class"]) == {"background", "dog", "cat"}
    assert "mean_iou" in capsys.readouterr().out

    evaluation.main([str(dataset), "--model", model_folder, "--clusters", "gt", "--limit", "2", "--output", str(report_path)])
    report = json.loads(report_path.read_text())
    assert report["num_images"] == 2 and report["mode"] == "unsupervised" and 0.0 <= report["mean_iou"] <= 1.0
    assert report["matching"] == "image" and report["k_equals_labels"] == 1.0  # gt: the oracle k and matching

    evaluation.main([str(dataset), "--model", model_folder, "--clusters", "auto", "--output", str(report_path)])
    report = json.loads(report_path.read_text())
    assert report["matching"] == "split" and report["mean_k"] >= 2
