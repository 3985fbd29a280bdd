"""DiffuMaskPipeline on tiny offline models: outputs, determinism, batching, loading, errors."""

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

from diffuseg.attention import capture
from diffuseg.pipelines import DiffuMaskPipeline, DiffuMaskPipelineOutput
from diffuseg.testing import on_same_components, save_tiny_stable_diffusion, tiny_stable_diffusion

REPO = Path(__file__).resolve().parents[1]
FAST = dict(num_inference_steps=2, height=32, width=32)


@pytest.fixture(scope="module")
def pipe():
    return tiny_stable_diffusion(pipeline_class=DiffuMaskPipeline, seed=0)


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def test_pil_output(pipe):
    out = pipe("a photo of a dog on the grass", class_names=["dog", "grass"], generator=generator(), **FAST)
    assert isinstance(out, DiffuMaskPipelineOutput)
    assert len(out.images) == 1 and out.images[0].size == (32, 32)
    assert isinstance(out.masks[0], PIL.Image.Image) and out.masks[0].mode == "L" and out.masks[0].size == (32, 32)
    assert out.attention_maps.shape == (1, 2, 32, 32) and out.attention_maps.dtype == np.float32
    assert set(np.unique(np.asarray(out.masks[0]))) <= {0, 1, 2, 255}


def test_np_and_pt_outputs_and_tuple(pipe):
    out = pipe("a dog", class_names=["dog"], generator=generator(), output_type="np", num_images_per_prompt=2, **FAST)
    assert out.images.shape == (2, 32, 32, 3) and out.masks.shape == (2, 32, 32) and out.masks.dtype == np.uint8
    images, masks, maps = pipe(
        "a dog", class_names=["dog"], generator=generator(), output_type="pt", return_dict=False, **FAST
    )
    assert images.shape == (1, 3, 32, 32) and masks.dtype == torch.uint8 and maps.shape == (1, 1, 32, 32)
    # Otsu on max-normalised maps: some pixels above, some below.
    assert 0 < int((out.masks == 1).sum()) < out.masks.size


def test_same_generator_same_images_and_masks(pipe):
    a = pipe("a red car", class_names=["car"], generator=generator(3), output_type="np", **FAST)
    b = pipe("a red car", class_names=["car"], generator=generator(3), output_type="np", **FAST)
    c = pipe("a red car", class_names=["car"], generator=generator(4), output_type="np", **FAST)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.masks, b.masks)
    assert not np.array_equal(a.images, c.images)


def test_batch_gives_the_same_masks_as_one_by_one(pipe):
    prompts = ["a dog on the grass", "a zebra in the park"]
    names = [["dog", "grass"], ["zebra"]]
    batch = pipe(
        prompts, class_names=names, generator=[generator(1), generator(2)], output_type="np", **FAST
    )
    for i, (prompt, words) in enumerate(zip(prompts, names)):
        single = pipe(prompt, class_names=words, generator=generator(i + 1), output_type="np", **FAST)
        assert np.allclose(batch.attention_maps[i, : len(words)], single.attention_maps[0], atol=1e-4)
        assert np.array_equal(batch.masks[i], single.masks[0])
    assert not batch.attention_maps[1, 1].any()  # padding column of the one-word prompt


def test_label_values_follow_class_order(pipe):
    out = pipe("a dog on the grass", class_names=["grass", "dog"], generator=generator(), output_type="np", **FAST)
    flipped = pipe("a dog on the grass", class_names=["dog", "grass"], generator=generator(), output_type="np", **FAST)
    swap = np.array([0, 2, 1] + [0] * 252 + [255], dtype=np.uint8)
    assert np.array_equal(swap[out.masks], flipped.masks)


def test_options_refine_ignore_band_resolutions(pipe):
    out = pipe(
        "a dog",
        class_names=["dog"],
        generator=generator(),
        output_type="np",
        refine=True,
        ignore_band=0.02,
        resolutions=[8],
        threshold="adaptive",
        attention_steps=(0.5, 1.0),
        **FAST,
    )
    assert out.masks.shape == (1, 32, 32)
    assert set(np.unique(out.masks)) <= {0, 1, 255}


def test_sd2_shaped_model():
    sd2 = tiny_stable_diffusion(pipeline_class=DiffuMaskPipeline, shape="sd2", seed=0)
    assert sd2.unet.config.use_linear_projection and sd2.unet.config.cross_attention_dim == 48
    out = sd2("a photo of a cat", class_names=["cat"], generator=generator(), output_type="np", **FAST)
    assert out.masks.shape == (1, 32, 32) and np.isfinite(out.attention_maps).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt="a dog", class_names=["cat"]), "'cat' does not appear in the prompt 'a dog'"),
        (dict(prompt="a dog", class_names=[]), "class_names is empty"),
        (dict(prompt="a dog", class_names=["dog"], height=36), "multiples of 8"),
        (dict(prompt="a dog", class_names=["dog"], threshold="mean"), "unknown threshold method"),
        (dict(prompt=["a dog", "a cat"], class_names=[["dog"]]), "2 prompts but 1 lists"),
        (dict(prompt="a dog", class_names=["dog"], attention_steps=(0.8, 0.2)), "attention_steps"),
        (dict(prompt=None, class_names=["dog"]), "`prompt` is required"),
    ],
)
def test_bad_input_is_a_clear_error(pipe, kwargs, message):
    kwargs = {**FAST, **kwargs}
    with pytest.raises(ValueError, match=message):
        pipe(**kwargs)


def test_custom_pipeline_loads_with_trust_remote_code(tmp_path):
    from diffusers import DiffusionPipeline

    folder = save_tiny_stable_diffusion(tmp_path / "tiny-sd", seed=0)
    loaded = DiffusionPipeline.from_pretrained(
        folder, custom_pipeline=str(REPO / "pipelines" / "diffumask"), trust_remote_code=True
    )
    assert type(loaded).__name__ == "DiffuMaskPipeline"
    loaded.set_progress_bar_config(disable=True)
    out = loaded("a dog", class_names=["dog"], generator=generator(), output_type="np", **FAST)
    reference = tiny_stable_diffusion(pipeline_class=DiffuMaskPipeline, seed=0)
    expected = reference("a dog", class_names=["dog"], generator=generator(), output_type="np", **FAST)
    assert np.allclose(out.images, expected.images, atol=1e-5)
    assert np.array_equal(out.masks, expected.masks)


def test_custom_pipeline_refused_without_trust_remote_code(tmp_path):
    from diffusers import DiffusionPipeline

    folder = save_tiny_stable_diffusion(tmp_path / "tiny-sd", seed=0)
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(folder, custom_pipeline=str(REPO / "pipelines" / "diffumask"))


def test_shipped_model_generates_an_image_and_a_mask_offline():
    from diffuseg.models import EMBEDDED_MODELS, load_default_model

    if not (EMBEDDED_MODELS["shapesworld"] / "model_index.json").is_file():
        pytest.skip("the embedded ShapesWorld model is not in this checkout")
    pipe = load_default_model()
    assert isinstance(pipe, DiffuMaskPipeline)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red circle", class_names=["circle"], num_inference_steps=4, generator=generator(), output_type="np")
    assert out.images.shape == (1, 64, 64, 3) and out.masks.shape == (1, 64, 64)
    assert np.isfinite(out.attention_maps).all() and out.images.std() > 0


# ----------------------------------------------------------------------------- diffusers' arguments
def test_string_and_per_prompt_negative_prompts(pipe):
    plain = on_same_components(pipe, StableDiffusionPipeline)
    # A string negative prompt with guidance on; the prompt goes on to diffusers as a list.
    kwargs = dict(negative_prompt="blurry", output_type="np", height=64, width=64, num_inference_steps=2)
    out = pipe("a photo of a dog", class_names=["dog"], generator=generator(), **kwargs)
    np.testing.assert_allclose(out.images, plain("a photo of a dog", generator=generator(), **kwargs).images, atol=1e-5)
    # One negative prompt per prompt, several images each.
    prompts, names = ["a dog on the grass", "a cat"], [["dog"], ["cat"]]
    kwargs = dict(num_images_per_prompt=2, output_type="np", **FAST)
    out = pipe(prompts, class_names=names, negative_prompt=["blurry", "dark"], generator=generator(), **kwargs)
    expected = plain(prompts, negative_prompt=["blurry", "dark"], generator=generator(), **kwargs)
    np.testing.assert_allclose(out.images, expected.images, atol=1e-5)
    assert out.masks.shape == (4, 32, 32)
    # One string beside several prompts is every prompt's negative prompt.
    shared = pipe(prompts, class_names=names, negative_prompt="blurry", generator=generator(), **kwargs)
    each = pipe(prompts, class_names=names, negative_prompt=["blurry"] * 2, generator=generator(), **kwargs)
    np.testing.assert_array_equal(shared.images, each.images)
    with pytest.raises(ValueError, match="got 2 prompts but 3 negative prompts"):
        pipe(prompts, class_names=names, negative_prompt=["a", "b", "c"], **FAST)


@pytest.mark.parametrize(
    "schedule", [dict(timesteps=[999, 499]), dict(sigmas=[14.6, 1.5, 0.0])], ids=["timesteps", "sigmas"]
)
def test_custom_timesteps_and_sigmas_set_the_attention_window(pipe, schedule):
    euler = on_same_components(pipe, scheduler_class=EulerDiscreteScheduler)
    plain = on_same_components(pipe, StableDiffusionPipeline, EulerDiscreteScheduler)
    kwargs = dict(output_type="np", height=32, width=32, **schedule)
    # diffusers' convention: the schedule alone; the window is its second half, one of two steps.
    late = euler("a photo of a dog", class_names=["dog"], num_inference_steps=None, attention_steps=(0.5, 1.0),
                 generator=generator(), **kwargs)
    with capture(plain, ["dog"], steps=(1, 2)) as maps:
        expected = plain("a photo of a dog", num_inference_steps=None, generator=generator(), **kwargs)
    np.testing.assert_allclose(late.images, expected.images, atol=1e-5)
    np.testing.assert_allclose(late.attention_maps, maps.aggregate().numpy(), atol=1e-5)
    # num_inference_steps left at its default (50) does not stretch the window past the two steps run.
    default = euler("a photo of a dog", class_names=["dog"], attention_steps=(0.5, 1.0), generator=generator(),
                    **kwargs)
    np.testing.assert_array_equal(default.attention_maps, late.attention_maps)
    whole = euler("a photo of a dog", class_names=["dog"], num_inference_steps=None, generator=generator(), **kwargs)
    assert not np.allclose(whole.attention_maps, late.attention_maps, atol=1e-4)


def test_interrupt_stops_generation_and_masks_keep_what_was_recorded(pipe):
    plain = on_same_components(pipe, StableDiffusionPipeline)

    def stop(p, step, timestep, tensors):
        p._interrupt = True
        return tensors

    kwargs = dict(callback_on_step_end=stop, output_type="np", **FAST)
    expected = plain("a photo of a dog", generator=generator(), **kwargs)
    # Interrupted after the first of two steps, before the window (the second step) began: no attention.
    before = pipe("a photo of a dog", class_names=["dog"], attention_steps=(0.5, 1.0), generator=generator(), **kwargs)
    np.testing.assert_allclose(before.images, expected.images, atol=1e-5)
    assert not before.attention_maps.any() and not before.masks.any()
    # Interrupted inside the window: the maps of the one step that ran.
    inside = pipe("a photo of a dog", class_names=["dog"], generator=generator(), **kwargs)
    with capture(plain, ["dog"], steps=(0, 1)) as maps:
        plain("a photo of a dog", generator=generator(), output_type="np", **FAST)
    np.testing.assert_allclose(inside.images, expected.images, atol=1e-5)
    np.testing.assert_allclose(inside.attention_maps, maps.aggregate().numpy(), atol=1e-5)


@pytest.mark.parametrize("pipeline", ["diffumask", "counterfactual"])
def test_generate_cli_takes_a_negative_prompt(tmp_path, pipe, pipeline):
    from datasets import load_dataset

    from diffuseg import cli
    from diffuseg.pipelines import CounterfactualPipeline
    from diffuseg.tokens import find_word_spans

    model = save_tiny_stable_diffusion(tmp_path / "tiny-sd", seed=0)
    out = tmp_path / "ds"
    rc = cli.main(["generate", "--out", str(out), "--model", model, "--pipeline", pipeline, "--classes", "dog,cat",
                   "--images-per-class", "1", "--steps", "2", "--height", "32", "--width", "32",
                   "--negative-prompt", "blurry", "--no-progress"])
    assert rc == 0
    same_model = pipe if pipeline == "diffumask" else on_same_components(pipe, CounterfactualPipeline)
    for row in load_dataset(str(out), split="train"):
        words = [w for w in ("dog", "cat") if find_word_spans(row["prompt"], w)]
        again = same_model(row["prompt"], class_names=words, negative_prompt="blurry",
                           generator=generator(row["seed"]), output_type="np", **FAST)
        np.testing.assert_allclose(np.asarray(row["image"]) / 255, again.images[0], atol=1.5 / 255)
        if pipeline == "counterfactual":
            np.testing.assert_allclose(np.asarray(row["negative_image"]) / 255, again.negative_images[0],
                                       atol=1.5 / 255)
