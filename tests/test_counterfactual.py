"""CounterfactualPipeline on tiny offline models: injection makes the pair closer, the positives
are plain Stable Diffusion, token alignment, batching, determinism, loading, dataset, errors."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

from diffuseg.pipelines import CounterfactualAttention, CounterfactualOutput, CounterfactualPipeline, DiffuMaskPipeline
from diffuseg.testing import build_clip_tokenizer, on_same_components, save_tiny_stable_diffusion, tiny_stable_diffusion
from diffuseg.tokens import ClassWordNotFoundError, find_word_spans, replace_words, replacement_token_alignment

REPO = Path(__file__).resolve().parents[1]
FAST = dict(num_inference_steps=2, height=32, width=32)


@pytest.fixture(scope="module")
def pipe():
    return tiny_stable_diffusion(pipeline_class=CounterfactualPipeline, seed=0)


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def outside_difference(out, i):
    """Mean absolute difference between positive and counterfactual over the background of the mask."""
    outside = out.masks[i] == 0
    return float(np.abs(out.images[i] - out.negative_images[i])[outside].mean())


# ----------------------------------------------------------------------------- the point of the pipeline
def test_injection_brings_the_counterfactual_closer_outside_the_mask():
    # Freshly initialised attention is nearly uniform, so copying it would change little; larger
    # query weights make it content-dependent, as a trained model's is.
    sharp = tiny_stable_diffusion(pipeline_class=CounterfactualPipeline, seed=0)
    with torch.no_grad():
        for name, module in sharp.unet.named_modules():
            if name.endswith("to_q"):
                module.weight.mul_(8)
    prompts = ["a photo of a dog on the grass", "a cat in the room", "a red car on the road", "a bird in the sky"]
    names = [["dog"], ["cat"], ["car"], ["bird"]]

    def run(seeds, **kwargs):
        # difference_weight=0: attention-only masks, the same in every run (the positives are).
        return sharp(prompts, class_names=names, generator=[generator(s) for s in seeds], output_type="np",
                     num_inference_steps=4, height=32, width=32, difference_weight=0, blend_start=None, **kwargs)

    injected = run(range(4))  # default fractions
    shared_noise_only = run(range(4), self_attention_fraction=0, cross_attention_fraction=0)
    unrelated_seed = run(range(10, 14), self_attention_fraction=0, cross_attention_fraction=0)  # MagicSeg's pairing

    np.testing.assert_allclose(injected.images, shared_noise_only.images, atol=1e-5)
    np.testing.assert_array_equal(injected.masks, shared_noise_only.masks)
    with_injection = [outside_difference(injected, i) for i in range(4)]
    without = [outside_difference(shared_noise_only, i) for i in range(4)]
    unrelated = []
    for i in range(4):
        outside = injected.masks[i] == 0
        unrelated.append(float(np.abs(injected.images[i] - unrelated_seed.negative_images[i])[outside].mean()))
    assert all(a < b for a, b in zip(with_injection, without)), (with_injection, without)
    assert np.mean(with_injection) < 0.9 * np.mean(without), (with_injection, without)
    assert np.mean(without) < np.mean(unrelated), (without, unrelated)


def test_positives_are_plain_stable_diffusion_and_weight_zero_masks_are_diffumask(pipe):
    out = pipe("a photo of a dog on the grass", class_names=["dog", "grass"], generator=generator(5),
               output_type="np", difference_weight=0, **FAST)
    plain = StableDiffusionPipeline(**pipe.components)
    plain.set_progress_bar_config(disable=True)
    reference = plain("a photo of a dog on the grass", generator=generator(5), output_type="np", **FAST)
    np.testing.assert_allclose(out.images, reference.images, atol=1e-5)
    diffumask = DiffuMaskPipeline(**pipe.components)
    diffumask.set_progress_bar_config(disable=True)
    expected = diffumask("a photo of a dog on the grass", class_names=["dog", "grass"], generator=generator(5),
                         output_type="np", **FAST)
    np.testing.assert_allclose(out.attention_maps, expected.attention_maps, atol=1e-4)
    np.testing.assert_array_equal(out.masks, expected.masks)


def test_without_injection_the_counterfactual_is_plain_sd_of_the_replaced_prompt(pipe):
    # "zebra" is several tokens in the tiny vocabulary, and occurs twice; so is the replacement.
    prompt, replaced = "a zebra and a dog near a zebra", "a empty ground and a dog near a empty ground"
    kwargs = dict(output_type="np", **FAST)
    out = pipe(prompt, class_names=["zebra"], replacement="empty ground", self_attention_fraction=0,
               cross_attention_fraction=0, blend_start=None, generator=generator(2), **kwargs)
    plain = StableDiffusionPipeline(**pipe.components)
    plain.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(out.negative_images, plain(replaced, generator=generator(2), **kwargs).images, atol=1e-5)
    injected = pipe(prompt, class_names=["zebra"], replacement="empty ground", blend_start=None, generator=generator(2),
                    **kwargs)
    np.testing.assert_allclose(injected.images, out.images, atol=1e-5)
    assert not np.allclose(injected.negative_images, out.negative_images, atol=1e-4)


def test_remove_phrases_take_what_describes_the_object_with_it(pipe):
    # "a red nothing" would still ask for something red: the phrase goes whole.
    kwargs = dict(output_type="np", self_attention_fraction=0, cross_attention_fraction=0, blend_start=None, **FAST)
    prompts, seeds = ["a red car on the road", "a dog on the grass"], [generator(3), generator(4)]
    out = pipe(prompts, class_names=[["car"], ["dog"]], remove_phrases=[["red car"], []], generator=seeds, **kwargs)
    plain = StableDiffusionPipeline(**pipe.components)
    plain.set_progress_bar_config(disable=True)
    for i, replaced in enumerate(["a nothing on the road", "a nothing on the grass"]):
        expected = plain(replaced, generator=generator(3 + i), output_type="np", **FAST).images
        np.testing.assert_allclose(out.negative_images[i : i + 1], expected, atol=1e-4)
    shared = pipe(prompts[0], class_names=["car"], remove_phrases=["red car"], generator=generator(3), **kwargs)
    np.testing.assert_allclose(shared.negative_images, out.negative_images[:1], atol=1e-4)
    # the positives and their masks do not depend on what the counterfactual removes
    alone = pipe(prompts[0], class_names=["car"], generator=generator(3), **{**kwargs, "difference_weight": 0})
    np.testing.assert_allclose(shared.images, alone.images, atol=1e-5)


# ----------------------------------------------------------------------------- token replacement and alignment
def test_replacement_of_multi_token_repeated_and_overlapping_words():
    tokenizer = build_clip_tokenizer()
    assert replace_words("A Zebra and a dog and a zebra", ["zebra", "dog"], "nothing") == (
        "A nothing and a nothing and a nothing"
    )
    assert replace_words("a red car, a car", ["red car", "car"], "nothing") == "a nothing, a nothing"
    assert replace_words("a dog", ["dog"], "") == "a "

    prompt, words, replacement = "a zebra on the grass and a zebra", ["zebra"], "empty ground"
    new = replace_words(prompt, words, replacement)
    alignment = replacement_token_alignment(tokenizer, prompt, words, replacement, max_length=40)
    source = tokenizer(prompt, padding="max_length", max_length=40)["input_ids"]
    target = tokenizer(new, padding="max_length", max_length=40)["input_ids"]
    source_length, target_length = len(tokenizer(prompt)["input_ids"]), len(tokenizer(new)["input_ids"])
    replacement_tokens = len(tokenizer("empty ground", add_special_tokens=False)["input_ids"])
    assert len(tokenizer("zebra", add_special_tokens=False)["input_ids"]) > 1 and replacement_tokens > 1
    new_tokens = [j for j in range(target_length) if alignment[j] < 0]
    assert len(new_tokens) == 2 * replacement_tokens  # both occurrences, every token of the replacement
    for j in range(40):
        if alignment[j] >= 0 and j < target_length - 1:
            assert target[j] == source[alignment[j]]  # unchanged text maps onto itself
    assert alignment[0] == 0 and alignment[target_length - 1] == source_length - 1  # begin and end tokens
    shift = source_length - target_length
    assert alignment[target_length:].tolist() == [j + shift if j + shift < 40 else -1 for j in range(target_length, 40)]
    # "on the grass and a" sits between the two occurrences, shifted by the first replacement.
    grass = tokenizer.convert_tokens_to_ids("grass</w>")
    assert source[int(alignment[target.index(grass)])] == grass


def test_truncated_prompts_align_what_the_encoder_sees():
    tokenizer = build_clip_tokenizer(model_max_length=8)
    alignment = replacement_token_alignment(tokenizer, "a dog on the grass in the park", ["dog"], "zebra")
    assert alignment.shape == (8,) and alignment[0] == 0 and alignment[7] == 7  # both truncated: ends match
    assert (alignment[2:7] == -1).sum() >= 2  # the spelled-out "zebra" pushes "grass"… past the cut


def test_controller_copies_attention_into_the_counterfactuals_only():
    images, heads, queries, tokens = 2, 2, 4, 6
    weights = torch.zeros(images, tokens, 1)
    weights[:, 2, 0] = 1.0
    alignment = torch.tensor([[0, 1, -1, 3, 4, 5], [0, 1, 2, -1, -1, 4]])
    controller = CounterfactualAttention(weights, alignment, self_attention_steps=1, cross_attention_steps=2)
    controller.step = 0
    probs = torch.rand(4 * images, heads, queries, tokens).softmax(dim=-1)  # [uncond: +, -; cond: +, -]
    assert controller.wants("cross", (2, 2)) and controller.wants("self", (2, 2))
    out = controller("cross", (2, 2), probs.clone(), slice(0, 4))
    pairs, edited = probs.view(2, 2, images, heads, queries, tokens), out.view(2, 2, images, heads, queries, tokens)
    torch.testing.assert_close(edited[:, 0], pairs[:, 0])  # positives untouched
    torch.testing.assert_close(edited[0, 1], pairs[0, 0])  # same negative prompt: everything copied
    torch.testing.assert_close(edited[1, 1].sum(-1), torch.ones(images, heads, queries))
    own = edited[1, 1, 0]
    expected = torch.cat([pairs[1, 0, 0][..., :2], pairs[1, 1, 0][..., 2:3], pairs[1, 0, 0][..., 3:]], dim=-1)
    torch.testing.assert_close(own, expected / expected.sum(-1, keepdim=True))
    shifted = torch.stack([pairs[1, 0, 1][..., i] for i in (0, 1, 2)] + [pairs[1, 1, 1][..., 3], pairs[1, 1, 1][..., 4],
                                                                         pairs[1, 0, 1][..., 4]], dim=-1)
    torch.testing.assert_close(edited[1, 1, 1], shifted / shifted.sum(-1, keepdim=True))
    # Recording saw the conditional positives only.
    recorded = controller.cross_attention()[(2, 2)]
    torch.testing.assert_close(recorded[:, 0].flatten(1), pairs[1, 0].mean(1)[..., 2])
    square = torch.rand(2 * images, heads, 4, 4).softmax(-1)  # no guidance: [+, -]
    injected = controller("self", (2, 2), square, slice(0, 4)).view(2, images, heads, 4, 4)
    torch.testing.assert_close(injected[1], square.view(2, images, heads, 4, 4)[0])
    controller.step = 1
    assert controller("self", (2, 2), square, slice(0, 4)) is None and not controller.injects("self", (2, 2))
    controller.step = 2
    assert controller("cross", (2, 2), probs, slice(0, 4)) is None
    with pytest.raises(ValueError, match="not \\[positives, counterfactuals\\]"):
        controller("cross", (2, 2), probs[:3], slice(0, 4))


# ----------------------------------------------------------------------------- outputs, batching, determinism
def test_outputs_in_every_format(pipe):
    out = pipe("a dog on the grass", class_names=["dog"], generator=generator(), output_type="np",
               num_images_per_prompt=2, **FAST)
    assert isinstance(out, CounterfactualOutput)
    assert out.images.shape == out.negative_images.shape == (2, 32, 32, 3)
    assert out.masks.shape == (2, 32, 32) and out.masks.dtype == np.uint8 and set(np.unique(out.masks)) <= {0, 1}
    assert out.difference_maps.shape == (2, 32, 32) and np.allclose(out.difference_maps.max(axis=(1, 2)), 1)
    assert out.difference_maps.min() >= 0 and out.attention_maps.shape == (2, 1, 32, 32)
    assert out.agreement.shape == (2,) and ((0 <= out.agreement) & (out.agreement <= 1)).all()
    assert not np.allclose(out.images, out.negative_images)

    pil = pipe("a dog", class_names=["dog"], generator=generator(), **FAST)
    assert isinstance(pil.images[0], PIL.Image.Image) and isinstance(pil.negative_images[0], PIL.Image.Image)
    assert pil.masks[0].mode == "L" and pil.masks[0].size == (32, 32)
    images, negatives, masks, difference, agreement, attention = pipe(
        "a dog", class_names=["dog"], generator=generator(), output_type="pt", return_dict=False, **FAST
    )
    assert images.shape == negatives.shape == (1, 3, 32, 32) and masks.dtype == torch.uint8
    assert difference.shape == (1, 32, 32) and agreement.shape == (1,) and attention.shape == (1, 1, 32, 32)
    np.testing.assert_allclose(images.permute(0, 2, 3, 1).numpy(), np.asarray(pil.images[0])[None] / 255, atol=1 / 255)


def test_one_loop_over_a_doubled_batch(pipe):
    batches = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        pipe(["a dog", "a cat"], class_names=[["dog"], ["cat"]], generator=generator(),
             num_images_per_prompt=2, output_type="latent", **FAST)
        pipe("a dog", class_names=["dog"], generator=generator(), guidance_scale=1.0, output_type="latent", **FAST)
    finally:
        handle.remove()
    assert batches == [16, 16, 2, 2]  # one UNet call per step: 4N under guidance, 2N without


def test_batch_equals_one_by_one_and_is_deterministic(pipe):
    prompts = ["a dog on the grass", "a red car and a tree"]
    names = [["dog"], ["car", "tree"]]
    batch = pipe(prompts, class_names=names, generator=[generator(1), generator(2)], output_type="np", **FAST)
    again = pipe(prompts, class_names=names, generator=[generator(1), generator(2)], output_type="np", **FAST)
    for field in ("images", "negative_images", "masks", "difference_maps", "agreement"):
        np.testing.assert_array_equal(getattr(batch, field), getattr(again, field))
    for i, (prompt, words) in enumerate(zip(prompts, names)):
        single = pipe(prompt, class_names=words, generator=generator(i + 1), output_type="np", **FAST)
        np.testing.assert_allclose(batch.images[i], single.images[0], atol=1e-5)
        np.testing.assert_allclose(batch.negative_images[i], single.negative_images[0], atol=1e-5)
        np.testing.assert_array_equal(batch.masks[i], single.masks[0])
    other = pipe(prompts, class_names=names, generator=[generator(3), generator(4)], output_type="np", **FAST)
    assert not np.allclose(other.negative_images, batch.negative_images)


def test_options_and_sd2_shape(pipe):
    out = pipe("a dog on the grass", class_names=["dog", "grass"], generator=generator(), output_type="np",
               difference_source="latent", fusion="mean", difference_weight=0.3, refine=True, threshold="adaptive",
               ignore_band=0.02, self_attention_resolutions=[8], replacement="empty ground", **FAST)
    assert out.masks.shape == (1, 32, 32) and set(np.unique(out.masks)) <= {0, 1, 2, 255}
    assert np.isfinite(out.difference_maps).all()
    sd2 = tiny_stable_diffusion(pipeline_class=CounterfactualPipeline, shape="sd2", seed=0)
    out = sd2("a photo of a cat", class_names=["cat"], generator=generator(), output_type="np", **FAST)
    assert out.negative_images.shape == (1, 32, 32, 3) and np.isfinite(out.attention_maps).all()


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(class_names=["cat"]), ClassWordNotFoundError, "'cat' does not appear in the prompt"),
        (dict(replacement="Dog"), ValueError, "replacement 'Dog' contains the class word 'dog'"),
        (dict(replacement="a dog house"), ValueError, "contains the class word"),
        (dict(self_attention_fraction=-0.1), ValueError, "self_attention_fraction must be a number in \\[0, 1\\]"),
        (dict(cross_attention_fraction=1.5), ValueError, "cross_attention_fraction must be a number in \\[0, 1\\]"),
        (dict(difference_weight=2), ValueError, "difference_weight must be a number in \\[0, 1\\]"),
        (dict(difference_source="pixels"), ValueError, "difference_source must be one of"),
        (dict(fusion="max"), ValueError, "fusion must be one of"),
        (dict(height=36), ValueError, "multiples of 8"),
        (dict(class_names=[]), ValueError, "class_names is empty"),
        (dict(class_names="dog"), TypeError, "class names must be a list, got the string 'dog'"),
        (dict(remove_phrases=["brown dog"]), ClassWordNotFoundError, "'brown dog' does not appear in the prompt"),
        (dict(remove_phrases="the dog"), TypeError, "phrases to remove must be a list"),
        (dict(remove_phrases=[["dog"], ["dog"]]), ValueError, "got 1 prompts but 2 lists of phrases to remove"),
        (dict(prompt_embeds=torch.zeros(1, 77, 32)), ValueError, "needs the prompt as text"),
        (dict(latents=torch.zeros(2, 4, 16, 16)), ValueError, "latents must have shape \\(1, 4, 16, 16\\)"),
        (dict(generator=[generator(), generator()]), ValueError, "2 generators for 1 images"),
    ],
)
def test_bad_input_is_a_clear_error(pipe, kwargs, error, message):
    kwargs = {"prompt": "a dog on the grass", "class_names": ["dog"], **FAST, **kwargs}
    with pytest.raises(error, match=message):
        pipe(**kwargs)


# ----------------------------------------------------------------------------- loading and dataset generation
def test_custom_pipeline_loads_with_trust_remote_code(tmp_path, pipe):
    from diffusers import DiffusionPipeline

    folder = save_tiny_stable_diffusion(tmp_path / "tiny-sd", seed=0)
    shim = str(REPO / "pipelines" / "counterfactual")
    loaded = DiffusionPipeline.from_pretrained(folder, custom_pipeline=shim, trust_remote_code=True)
    assert type(loaded).__name__ == "CounterfactualPipeline"
    loaded.set_progress_bar_config(disable=True)
    out = loaded("a dog", class_names=["dog"], generator=generator(), output_type="np", **FAST)
    expected = pipe("a dog", class_names=["dog"], generator=generator(), output_type="np", **FAST)
    np.testing.assert_allclose(out.negative_images, expected.negative_images, atol=1e-5)
    np.testing.assert_array_equal(out.masks, expected.masks)
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(folder, custom_pipeline=shim)


def test_generate_writes_the_negative_image_column(tmp_path, pipe):
    from datasets import load_dataset

    from diffuseg.generation import GenerationConfig, generate_dataset, parse_classes, to_uint8

    config = GenerationConfig(out=str(tmp_path / "ds"), classes=parse_classes("dog,cat"), images_per_class=1,
                              pipeline="counterfactual", model="tiny-random", seed=1, height=32, width=32,
                              num_inference_steps=2, batch_size=2, samples_per_shard=2)
    assert generate_dataset(config, pipe=pipe, progress=False).kept == 2
    ds = load_dataset(str(tmp_path / "ds"), split="train")
    assert "negative_image" in ds.column_names and set(ds["pipeline"]) == {"counterfactual"}
    assert '| counterfactual prompts | the class words replaced by "nothing" |' in (tmp_path / "ds" / "README.md").read_text()
    for row in ds:
        words = [w for w in ("dog", "cat") if find_word_spans(row["prompt"], w)]
        again = pipe(row["prompt"], class_names=words, generator=generator(row["seed"]), output_type="np", **FAST)
        # Batched there, alone here: equal up to rounding.
        np.testing.assert_allclose(np.asarray(row["negative_image"]), to_uint8(again.negative_images)[0], atol=1)
        np.testing.assert_allclose(np.asarray(row["image"]), to_uint8(again.images)[0], atol=1)
        assert not np.array_equal(np.asarray(row["negative_image"]), np.asarray(row["image"]))


def test_generate_on_shapesworld_removes_the_coloured_shape(tmp_path):
    from datasets import load_dataset
    from scipy import ndimage

    from diffuseg.generation import GenerationConfig, generate_dataset, parse_classes, to_uint8
    from diffuseg.models import load_default_model
    from diffuseg.shapesworld.recognize import color_regions

    shipped = load_default_model(CounterfactualPipeline)
    shipped.set_progress_bar_config(disable=True)
    config = GenerationConfig(out=str(tmp_path / "ds"), classes=parse_classes("shapes"), images_per_class=1,
                              pipeline="counterfactual", num_inference_steps=10, samples_per_shard=3)
    assert generate_dataset(config, pipe=shipped, progress=False).kept == 3
    for row in load_dataset(str(tmp_path / "ds"), split="train"):
        words = row["prompt"].split()
        shape = next(w for w in words if w in config.classes.names)
        color = words[words.index(shape) - 1]
        positive, negative = np.asarray(row["image"]), np.asarray(row["negative_image"])
        # The geometric recogniser (no learned part) sees the prompted colour in the positive and
        # not in the negative: the shape is gone. (Blobs of other colours, which this model draws
        # for "a picture of a background", remain in about half of the negatives: not asserted.)
        assert color in color_regions(positive), row["prompt"]
        assert color not in color_regions(negative), (row["prompt"], sorted(color_regions(negative)))
        # And the rest of the scene is the positive's: outside the object (grown by a few pixels).
        around = ndimage.binary_dilation(color_regions(positive)[color] | (np.asarray(row["label"]) > 0), iterations=3)
        assert np.abs(positive.astype(float) - negative.astype(float))[~around].mean() < 8
        again = shipped(row["prompt"], class_names=[shape], replacement="background",
                        remove_phrases=[f"{color} {shape}"], generator=generator(row["seed"]), output_type="np",
                        num_inference_steps=10, guidance_scale=config.guidance_scale)
        np.testing.assert_allclose(negative, to_uint8(again.negative_images)[0], atol=1)


# ----------------------------------------------------------------------------- diffusers' arguments
def test_string_and_per_prompt_negative_prompts(pipe):
    plain = on_same_components(pipe, StableDiffusionPipeline)
    no_injection = dict(self_attention_fraction=0, cross_attention_fraction=0, blend_start=None)
    kwargs = dict(negative_prompt="blurry", output_type="np", **FAST)
    out = pipe("a photo of a dog", class_names=["dog"], generator=generator(), **no_injection, **kwargs)
    np.testing.assert_allclose(out.images, plain("a photo of a dog", generator=generator(), **kwargs).images, atol=1e-5)
    # The counterfactual keeps its positive's negative prompt.
    expected = plain("a photo of a nothing", generator=generator(), **kwargs).images
    np.testing.assert_allclose(out.negative_images, expected, atol=1e-5)
    prompts, names = ["a dog on the grass", "a cat"], [["dog"], ["cat"]]
    kwargs = dict(negative_prompt=["blurry", "dark"], num_images_per_prompt=2, output_type="np", **FAST)
    out = pipe(prompts, class_names=names, generator=generator(), **no_injection, **kwargs)
    np.testing.assert_allclose(out.images, plain(prompts, generator=generator(), **kwargs).images, atol=1e-5)
    expected = plain(["a nothing on the grass", "a nothing"], generator=generator(), **kwargs).images
    np.testing.assert_allclose(out.negative_images, expected, atol=1e-5)
    with pytest.raises(ValueError, match="got 2 prompts but 1 negative prompts"):
        pipe(prompts, class_names=names, negative_prompt=["blurry"], **FAST)


def test_custom_timesteps_set_every_window_from_the_schedule_run(pipe, monkeypatch):
    euler = on_same_components(pipe, scheduler_class=EulerDiscreteScheduler)
    kwargs = dict(prompt="a photo of a dog on the grass", class_names=["dog"], output_type="np", height=32, width=32,
                  timesteps=[999, 499])

    def run(**extra):
        return euler(generator=generator(), **kwargs, **extra)

    # diffusers' convention (num_inference_steps=None) and the default 50 run the same two steps alike.
    late = run(num_inference_steps=None, attention_steps=(0.5, 1.0))
    default = run(attention_steps=(0.5, 1.0))
    for field in ("images", "negative_images", "attention_maps", "masks"):
        np.testing.assert_array_equal(getattr(late, field), getattr(default, field))
    diffumask = on_same_components(pipe, DiffuMaskPipeline, EulerDiscreteScheduler)
    expected = diffumask(generator=generator(), num_inference_steps=None, attention_steps=(0.5, 1.0), **kwargs)
    np.testing.assert_allclose(late.images, expected.images, atol=1e-5)
    np.testing.assert_allclose(late.attention_maps, expected.attention_maps, atol=1e-5)
    # Every window counts the two steps run: injection 0.4 and 0.8 of them (1 and 2 steps), recording the second.
    windows = []
    begin = CounterfactualAttention.begin_unet_call

    def spy(controller, sample):
        begin(controller, sample)
        windows.append((controller.self_attention_steps, controller.cross_attention_steps, controller.steps))

    monkeypatch.setattr(CounterfactualAttention, "begin_unet_call", spy)
    run(attention_steps=(0.5, 1.0))
    assert windows == [(1, 2, (1, 2))] * 2


@pytest.mark.parametrize(
    "scheduler_class, extra",
    [(EulerAncestralDiscreteScheduler, {}), (DDIMScheduler, {"eta": 1.0})],
    ids=["euler-ancestral", "ddim-eta1"],
)
def test_stochastic_samplers_give_both_halves_the_plain_pipelines_noise(pipe, scheduler_class, extra):
    ancestral = on_same_components(pipe, scheduler_class=scheduler_class)
    plain = on_same_components(pipe, StableDiffusionPipeline, scheduler_class)
    prompts, names = ["a dog on the grass", "a cat in the room"], [["dog"], ["cat"]]
    replaced = ["a nothing on the grass", "a nothing in the room"]
    kwargs = dict(output_type="np", **FAST, **extra)
    for seeds in (generator(7), [generator(7), generator(8)]):  # one generator for the batch, one per image
        fresh = (lambda: generator(7)) if not isinstance(seeds, list) else (lambda: [generator(7), generator(8)])
        out = ancestral(prompts, class_names=names, generator=fresh(), self_attention_fraction=0,
                        cross_attention_fraction=0, blend_start=None, **kwargs)
        # The positives are Stable Diffusion's images, the counterfactuals Stable Diffusion's for the replaced
        # prompts: at every step each counterfactual drew the noise its positive drew.
        np.testing.assert_allclose(out.images, plain(prompts, generator=fresh(), **kwargs).images, atol=1e-5)
        np.testing.assert_allclose(out.negative_images, plain(replaced, generator=fresh(), **kwargs).images, atol=1e-5)
    # No generator: torch's global one, drawn from as Stable Diffusion draws from it.
    torch.manual_seed(7)
    out = ancestral(prompts, class_names=names, self_attention_fraction=0, cross_attention_fraction=0, blend_start=None, **kwargs)
    after = torch.get_rng_state()
    torch.manual_seed(7)
    np.testing.assert_allclose(out.images, plain(prompts, **kwargs).images, atol=1e-5)
    assert torch.equal(after, torch.get_rng_state())
    torch.manual_seed(7)
    np.testing.assert_allclose(out.negative_images, plain(replaced, **kwargs).images, atol=1e-5)
    # With injection the positives stay the same; the noise draws leave the generator where diffusers leaves it.
    shared_generator = generator(7)
    injected = ancestral(prompts, class_names=names, generator=shared_generator, **kwargs)
    reference_generator = generator(7)
    np.testing.assert_allclose(injected.images, plain(prompts, generator=reference_generator, **kwargs).images,
                               atol=1e-5)
    assert torch.equal(shared_generator.get_state(), reference_generator.get_state())


def test_interrupt_stops_both_halves_at_the_same_step(pipe):
    seen = []

    def keep(p, step, timestep, tensors):
        seen.append(tensors["latents"].clone())
        return tensors

    def stop(p, step, timestep, tensors):
        p._interrupt = True
        return tensors

    prompts, names = ["a dog on the grass", "a cat"], [["dog"], ["cat"]]
    kwargs = dict(class_names=names, output_type="latent", **FAST)
    full = pipe(prompts, generator=generator(), callback_on_step_end=keep, **kwargs)
    # The callback sees the doubled batch [positives, counterfactuals].
    assert len(seen) == 2 and seen[0].shape[0] == 4
    out = pipe(prompts, generator=generator(), callback_on_step_end=stop, **kwargs)
    torch.testing.assert_close(out.images, seen[0][:2], rtol=0, atol=1e-4)
    torch.testing.assert_close(out.negative_images, seen[0][2:], rtol=0, atol=1e-4)
    assert not torch.allclose(out.images, full.images, atol=1e-3)
    # Decoded outputs and masks of an interrupted call: both halves from that step (without the background
    # blend, which needs recorded attention: the early call below has none).
    decoded = pipe(prompts, generator=generator(), callback_on_step_end=stop, class_names=names, output_type="np",
                   blend_start=None, **FAST)
    plain = on_same_components(pipe, StableDiffusionPipeline)
    expected = plain(prompts, generator=generator(), callback_on_step_end=stop, output_type="np", **FAST)
    np.testing.assert_allclose(decoded.images, expected.images, atol=1e-5)
    assert decoded.masks.shape == (2, 32, 32) and decoded.attention_maps.max() > 0
    # Interrupted before the attention window began: nothing recorded, background masks, no error.
    early = pipe(prompts, generator=generator(), callback_on_step_end=stop, class_names=names, output_type="np",
                 attention_steps=(0.5, 1.0), blend_start=None, **FAST)
    assert not early.attention_maps.any() and not early.masks.any()
    np.testing.assert_allclose(early.negative_images, decoded.negative_images, atol=1e-5)


def test_background_blend_keeps_the_positive_outside_the_object_region():
    from diffuseg.attention import AttentionStore
    from diffuseg.pipelines.counterfactual import BackgroundBlend

    store = AttentionStore(token_weights=torch.ones(2, 4, 1))  # 2 images, 1 class word each
    attention = torch.full((2, 1, 8, 8), 0.05)
    attention[0, 0, 1:3, 1:3] = 1.0  # image 0's object: top-left
    attention[1, 0, 5:7, 4:6] = 1.0  # image 1's object: elsewhere
    store.cross_sums, store.cross_counts = {(8, 8): attention.flatten(2)}, {(8, 8): 1}
    blend = BackgroundBlend(store, [1, 1], "otsu", start_fraction=0.3, dilation=1)
    region = blend.object_region((8, 8))
    expected = torch.zeros(2, 1, 8, 8)
    expected[0, 0, 0:4, 0:4] = 1  # the object, grown by one latent pixel
    expected[1, 0, 4:8, 3:7] = 1
    assert torch.equal(region, expected)

    positive, counterfactual = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    schedule = SimpleNamespace(num_timesteps=10)  # start_fraction 0.3: from step 3 of 10
    early = blend(schedule, 1, 0, {"latents": torch.cat([positive, counterfactual])})["latents"]
    assert torch.equal(early[2:], counterfactual)  # before start_step: untouched
    calls = []
    chained = blend.chain(lambda pipe, step, t, kwargs: calls.append(step) or kwargs)
    blended = chained(schedule, 2, 0, {"latents": torch.cat([positive, counterfactual])})["latents"]
    assert calls == [2] and torch.equal(blended[:2], positive)
    assert torch.equal(blended[2:] * (1 - region), positive * (1 - region))
    assert torch.equal(blended[2:] * region, counterfactual * region)


def test_negatives_benchmark_reads_object_and_background_with_the_recogniser():
    import importlib.util

    from diffuseg.shapesworld.render import COLORS

    spec = importlib.util.spec_from_file_location("counterfactual_negatives", Path(__file__).parents[1] / "benchmarks" / "counterfactual_negatives.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    background = np.full((64, 64, 3), 128, np.uint8)
    positive, label = background.copy(), np.zeros((64, 64), np.uint8)
    positive[20:40, 20:40], label[20:40, 20:40] = COLORS["red"], 2
    good = bench.negative_verdicts(positive, background, label, 8.0)
    assert good["no_object"] and good["background_kept"] and good["colors_left"] == []
    framed = background.copy()
    framed[:10], framed[20:30, 20:30] = 60, COLORS["green"]  # a dark band, and a green blob where the object was
    bad = bench.negative_verdicts(positive, framed, label, 8.0)
    assert not bad["no_object"] and bad["colors_left"] == ["green"] and not bad["background_kept"]
