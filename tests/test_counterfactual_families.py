"""The counterfactual method (MagicSeg) on the other model families, beside each family's own pipeline.

Tiny offline models (diffuseg.testing), 64-pixel images, 2 steps. The positives are the family
pipeline's images for the same generator (injection and blending touch the counterfactual half
only); the counterfactual differs from its positive where the object is, and nowhere else once
blended.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionXLPipeline

from diffuseg.families import method_pipelines, pipeline_class_for
from diffuseg.pipelines import (
    CounterfactualFluxPipeline,
    CounterfactualSD3Pipeline,
    CounterfactualXLPipeline,
)
from diffuseg.pipelines.counterfactual import sequence_token_alignment
from diffuseg.testing import (
    build_clip_tokenizer,
    build_t5_tokenizer,
    save_tiny_pipeline,
    tiny_pipeline,
)
from diffuseg.tokens import TextSegment, replacement_token_alignment

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
# family: (counterfactual pipeline, the family's own pipeline, community folder, fast call arguments,
#          the family's second-encoder prompt and its negative prompt)
FAMILIES = {
    "sdxl": (
        CounterfactualXLPipeline,
        StableDiffusionXLPipeline,
        "counterfactual_xl",
        dict(num_inference_steps=2, height=64, width=64),
        ("prompt_2", "negative_prompt_2"),
    ),
    "sd3": (
        CounterfactualSD3Pipeline,
        StableDiffusion3Pipeline,
        "counterfactual_sd3",
        dict(num_inference_steps=2, height=64, width=64, max_sequence_length=32),
        ("prompt_3", "negative_prompt_3"),
    ),
    # FLUX-dev, guidance-distilled: its negative prompts count only under true_cfg_scale > 1 (refused).
    "flux": (
        CounterfactualFluxPipeline,
        FluxPipeline,
        "counterfactual_flux",
        dict(num_inference_steps=2, height=64, width=64, max_sequence_length=32),
        ("prompt_2", "negative_prompt_2"),
    ),
}
PROMPT = "a photo of a dog on the grass"


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    counterfactual_class, plain_class, _, fast, _ = FAMILIES[request.param]
    pipe = tiny_pipeline(request.param, pipeline_class=counterfactual_class, seed=0)
    plain = plain_class(**pipe.components)
    plain.set_progress_bar_config(disable=True)
    return request.param, pipe, plain, fast


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def test_positives_are_the_family_pipelines_images_and_masks_are_labels(family):
    _, pipe, plain, fast = family
    expected = plain(PROMPT, generator=generator(), output_type="np", **fast).images
    out = pipe(PROMPT, class_names=["dog", "grass"], generator=generator(), output_type="np", **fast)
    np.testing.assert_allclose(out.images, expected, rtol=0, atol=1e-5)
    assert out.negative_images.shape == out.images.shape
    assert out.masks.shape == (1, 64, 64) and out.masks.dtype == np.uint8
    assert set(np.unique(out.masks)) <= {0, 1, 2, 255}
    assert out.attention_maps.shape == (1, 2, 64, 64) and np.isfinite(out.attention_maps).all()
    assert out.difference_maps.shape == (1, 64, 64) and out.agreement.shape == (1,)


def test_counterfactual_differs_from_the_positive_where_the_object_is(family):
    _, pipe, plain, fast = family
    out = pipe(PROMPT, class_names=["dog"], generator=generator(), output_type="np", **fast)
    difference = np.abs(out.images[0] - out.negative_images[0]).mean(axis=-1)
    object_pixels = out.masks[0] == 1
    assert object_pixels.any() and not object_pixels.all()
    assert difference[object_pixels].mean() > 1e-3
    # Blended: outside the object region the counterfactual is the positive's background.
    assert difference[object_pixels].mean() > 2 * difference[~object_pixels].mean()

    # Without injection or blending only the noise is shared: the counterfactual is the family
    # pipeline's image of the replaced prompt.
    bare = pipe(PROMPT, class_names=["dog"], generator=generator(), output_type="np", replacement="nothing",
                self_attention_fraction=0.0, cross_attention_fraction=0.0, blend_start=None, **fast)
    replaced = plain("a photo of a nothing on the grass", generator=generator(), output_type="np", **fast).images
    np.testing.assert_allclose(bare.negative_images, replaced, rtol=0, atol=1e-5)


def test_family_prompts_and_negative_prompts_reach_both_halves(family):
    name, pipe, plain, fast = family
    second, second_negative = FAMILIES[name][4]
    prompts = [PROMPT, "a cat"]
    extra = {second: ["a dog, grass", "a cat"], "negative_prompt": "blurry", second_negative: ["dark", "dim"]}
    expected = plain(prompts, generator=generator(), output_type="np", **{**extra, "negative_prompt": ["blurry"] * 2},
                     **fast).images
    out = pipe(prompts, class_names=[["dog"], ["cat"]], generator=generator(), output_type="np",
               self_attention_fraction=0.0, cross_attention_fraction=0.0, blend_start=None, **extra, **fast)
    np.testing.assert_allclose(out.images, expected, rtol=0, atol=1e-5)
    # The counterfactuals read the second prompt without the class words too.
    replaced = plain(["a photo of a nothing on the grass", "a nothing"], generator=generator(), output_type="np",
                     **{**extra, second: ["a nothing, grass", "a nothing"], "negative_prompt": ["blurry"] * 2},
                     **fast).images
    np.testing.assert_allclose(out.negative_images, replaced, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=f"2 prompts but 3 {second}s"):
        pipe(prompts, class_names=[["dog"], ["cat"]], **{second: ["a", "b", "c"]}, **fast)


def test_registry_and_custom_pipeline_load(family, tmp_path):
    from diffusers import DiffusionPipeline

    name, pipe, _, fast = family
    counterfactual_class, _, shim, _, _ = FAMILIES[name]
    assert method_pipelines()["counterfactual"][name] is counterfactual_class
    folder = save_tiny_pipeline(tmp_path / name, name, seed=0)
    assert pipeline_class_for("counterfactual", folder) is counterfactual_class
    loaded = DiffusionPipeline.from_pretrained(folder, custom_pipeline=str(REPO / "pipelines" / shim),
                                               trust_remote_code=True)
    assert type(loaded).__name__ == counterfactual_class.__name__
    loaded.set_progress_bar_config(disable=True)
    out = loaded("a dog", class_names=["dog"], generator=generator(), output_type="np", **fast)
    expected = pipe("a dog", class_names=["dog"], generator=generator(), output_type="np", **fast)
    np.testing.assert_allclose(out.negative_images, expected.negative_images, rtol=0, atol=1e-5)
    assert np.array_equal(out.masks, expected.masks)


def test_sd3_without_t5_and_with_injected_self_attention():
    pipe = tiny_pipeline("sd3", pipeline_class=CounterfactualSD3Pipeline, seed=0, t5=False)
    plain = StableDiffusion3Pipeline(**pipe.components)
    plain.set_progress_bar_config(disable=True)
    fast = FAMILIES["sd3"][3]
    expected = plain(PROMPT, generator=generator(), output_type="np", **fast).images
    out = pipe(PROMPT, class_names=["dog"], generator=generator(), output_type="np", **fast)
    np.testing.assert_allclose(out.images, expected, rtol=0, atol=1e-5)
    assert set(np.unique(out.masks)) <= {0, 1, 255}
    # The 16² patch grid's affinity injected too: the counterfactual moves, the positive does not.
    injected = pipe(PROMPT, class_names=["dog"], generator=generator(), output_type="np",
                    self_attention_resolutions=[16], **fast)
    np.testing.assert_allclose(injected.images, expected, rtol=0, atol=1e-5)
    assert not np.allclose(injected.negative_images, out.negative_images, atol=1e-6)


def test_flux_latent_difference_and_true_guidance_refused():
    pipe = tiny_pipeline("flux", pipeline_class=CounterfactualFluxPipeline, seed=0)
    fast = FAMILIES["flux"][3]
    out = pipe(PROMPT, class_names=["dog"], generator=generator(), output_type="latent", difference_source="latent",
               **fast)
    assert out.images.shape == out.negative_images.shape == (1, 256, 4)  # packed, as FluxPipeline returns them
    assert out.difference_maps.shape == (1, 64, 64) and out.difference_maps.max() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="true_cfg_scale > 1"):
        pipe(PROMPT, class_names=["dog"], negative_prompt="blurry", true_cfg_scale=2.0, **fast)


def test_alignment_over_clip_then_t5_stretches():
    clip, t5 = build_clip_tokenizer(), build_t5_tokenizer()
    # T5 has no begin token: a replaced first word has no counterpart (CLIP's position 0 is its begin token).
    first = replacement_token_alignment(t5, "dog on the grass", ["dog"], "nothing", 8)
    assert first.tolist() == [-1, 1, 2, 3, 4, 5, 6, 7]
    segments = [TextSegment(clip, 77, ["dog on the grass"], "CLIP"), TextSegment(t5, 8, ["a dog"], "T5"),
                TextSegment(None, 4, ["a dog"], "T5")]
    alignment = sequence_token_alignment(segments, [["dog"]], "nothing")
    assert alignment.shape == (1, 77 + 8 + 4)
    torch.testing.assert_close(alignment[0, :77], replacement_token_alignment(clip, "dog on the grass", ["dog"],
                                                                              "nothing"))
    assert alignment[0, 77:85].tolist() == [77, -1, 79, 80, 81, 82, 83, 84]  # "a nothing</s>": shifted past CLIP
    assert alignment[0, 85:].tolist() == [85, 86, 87, 88]  # no T5 encoder: zeros copied as they are
