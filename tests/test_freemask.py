"""FreeMaskEditPipeline on tiny offline models: untouched pixels, label maps with occlusion,
retries and rejections, placement, determinism, batching, the inpainting UNet, loading, errors.

The tiny model is random, so its cross-attention is not where objects are: tests that need
an insertion accepted set ``max_leak=1`` (and ``min_coverage=0``) and check the bookkeeping,
not the masks' quality.
"""

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from diffuseg.pipelines import DiffuMaskPipeline, FreeMaskEditOutput, FreeMaskEditPipeline
from diffuseg.pipelines.freemask import (
    FreeMaskObject,
    InsertionRecord,
    feather_weights,
    insert_into_label_map,
    sample_free_box,
)
from diffuseg.testing import save_tiny_stable_diffusion, tiny_components, tiny_stable_diffusion

REPO = Path(__file__).resolve().parents[1]
FAST = dict(num_inference_steps=2)
ACCEPT = dict(min_coverage=0.0, max_leak=1.0)
CLASSES = ["dog", "cat", "car"]  # ids 1, 2, 3


@pytest.fixture(scope="module")
def pipe():
    return tiny_stable_diffusion(pipeline_class=FreeMaskEditPipeline, seed=0)


@pytest.fixture(scope="module")
def base():
    """A 32x32 image with a dog (id 1) in its top-left corner."""
    image = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    labels = np.zeros((32, 32), dtype=np.uint8)
    labels[2:14, 2:14] = 1
    return image, labels


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def grid(text):
    """A label map written as rows of numbers, ``I`` for ignore."""
    return np.array([[255 if v == "I" else int(v) for v in row.split()] for row in text.strip().splitlines()], np.uint8)


def recompose(base_labels, records):
    """The label map and instances the records imply, replayed through insert_into_label_map."""
    labels, instances = base_labels, []
    for record in records:
        labels, instances = insert_into_label_map(labels, instances, record.mask, record.class_id, record.region)
    return labels, instances


def assert_instances_consistent(labels, instances, records):
    if len(instances):
        assert (np.sum(instances, axis=0) <= 1).all(), "instances overlap"
    for own, record in zip(instances, records):
        assert (labels[own] == record.class_id).all()


# ---------------------------------------------------------------------------------------
# the contract: untouched pixels, labels with occlusion


def test_edit_keeps_pixels_outside_regions_and_updates_labels(pipe, base):
    image, labels = base
    objects = [
        FreeMaskObject("cat", region=(8, 8, 20, 20)),  # overlaps the dog
        {"class_name": "car", "prompt": "a red car on the street", "region": (14, 14, 28, 26)},  # overlaps the cat
    ]
    out = pipe(image, labels, objects=objects, class_names=CLASSES, generator=generator(), output_type="np",
               **FAST, **ACCEPT)
    assert isinstance(out, FreeMaskEditOutput)
    assert out.images.shape == (1, 32, 32, 3) and out.masks.shape == (1, 32, 32) and out.masks.dtype == np.uint8
    records = out.inserted[0]
    assert [r.class_name for r in records] == ["cat", "car"] and not out.rejected[0]
    assert [r.box for r in records] == [(8, 8, 20, 20), (14, 14, 28, 26)]
    assert all(r.attempts == 1 and r.reason is None for r in records)

    # Stated tolerance: pixels farther than `feather` (default: the VAE's factor, 2 px) from
    # every edited region are the base image's, exactly (up to float -> [0, 1] conversion).
    touched = np.max([feather_weights(r.region, pipe.vae_scale_factor) for r in records], axis=0) > 0
    assert touched.sum() < touched.size
    np.testing.assert_allclose(out.images[0][~touched], image[~touched] / 255.0, atol=1e-6)
    inside = np.any([r.region for r in records], axis=0)
    assert np.abs(out.images[0][inside] - image[inside] / 255.0).max() > 0.05

    # Labels outside the regions stay; inside they follow occlusion (replayed by hand below).
    assert np.array_equal(out.masks[0][~inside], labels[~inside])
    expected, instances = recompose(labels, records)
    assert np.array_equal(out.masks[0], expected)
    assert out.instance_masks[0].shape == (2, 32, 32) and out.instance_masks[0].dtype == bool
    assert np.array_equal(out.instance_masks[0], np.stack(instances))
    assert_instances_consistent(out.masks[0], out.instance_masks[0], records)
    for record in records:
        assert record.mask.any() and not (record.mask & ~record.region).any()
    # Dog pixels that the cat's edit repainted but its mask does not claim are now unknown.
    stale = records[0].region & (labels == 1) & ~records[0].mask & ~records[1].mask
    assert stale.any() and (out.masks[0][stale] == 255).all()


def test_paste_mode_on_a_base_rendered_by_diffumask(pipe):
    prompt, seed = "a photo of a dog on the grass", 5
    diffumask = DiffuMaskPipeline(**pipe.components, requires_safety_checker=False)
    diffumask.set_progress_bar_config(disable=True)
    # The base is rendered with the call's mask settings (refine=True is FreeMaskEditPipeline's default).
    reference = diffumask(prompt, class_names=["dog"], height=32, width=32, generator=generator(seed),
                          output_type="np", refine=True, **FAST)
    region = (16, 0, 32, 16)
    out = pipe(base_prompt=prompt, base_classes=["dog"], objects=[FreeMaskObject("car", region=region)],
               class_names=CLASSES, mode="paste", height=32, width=32, generator=generator(seed),
               output_type="np", **FAST, **ACCEPT)
    (record,) = out.inserted[0]
    assert record.leak == [0.0] and 0 < record.coverage[0] <= 1
    touched = feather_weights(record.region, pipe.vae_scale_factor) > 0
    # Exact up to float round-off: the rendered base goes [0, 1] -> [-1, 1] -> [0, 1].
    np.testing.assert_allclose(out.images[0][~touched], reference.images[0][~touched], atol=1e-5)
    # The base's ids are the dog's id in class_names (1); the pasted car takes id 3 exactly on its mask,
    # and copy-paste repaints nothing else, so the other labels stay.
    assert np.array_equal(out.masks[0][record.mask], np.full(record.mask.sum(), 3, np.uint8))
    assert np.array_equal(out.masks[0][~record.mask], reference.masks[0][~record.mask])
    assert np.array_equal(out.instance_masks[0], record.mask[None])


def test_blended_latents_equal_the_original_outside_the_region(pipe):
    latents = torch.randn(2, 4, 16, 16, generator=generator(1))
    mask = torch.zeros(2, 1, 16, 16)
    mask[0, :, 2:8, 3:9] = 1
    mask[1, :, 8:16, 0:16] = 1
    edited = pipe.edit_latents(latents, mask, ["a photo of a cat", "a car"], generator=generator(), **FAST)
    assert torch.equal(edited * (1 - mask), latents * (1 - mask))
    assert not torch.allclose(edited * mask, latents * mask)


def test_label_map_with_overlapping_insertions_by_hand():
    base = grid("""
        1 1 1 0 0 0
        1 1 1 0 0 0
        1 1 1 0 0 0
        0 0 0 0 0 0
        0 0 0 0 0 0
        0 0 0 0 0 0
    """)
    box = np.zeros((6, 6), bool)
    # A: cat (2) edited into rows/cols 1..4, its mask rows/cols 2..4: the repainted dog pixels become ignore.
    region_a, mask_a = box.copy(), box.copy()
    region_a[1:5, 1:5], mask_a[2:5, 2:5] = True, True
    labels, instances = insert_into_label_map(base, [], mask_a, 2, repainted=region_a)
    assert np.array_equal(labels, grid("""
        1 1 1 0 0 0
        1 I I 0 0 0
        1 I 2 2 2 0
        0 0 2 2 2 0
        0 0 2 2 2 0
        0 0 0 0 0 0
    """))
    # B: car (3) pasted over the cat's lower right (no repainting): the cat shrinks.
    mask_b = box.copy()
    mask_b[3:6, 3:6] = True
    labels, instances = insert_into_label_map(labels, instances, mask_b, 3)
    assert np.array_equal(labels, grid("""
        1 1 1 0 0 0
        1 I I 0 0 0
        1 I 2 2 2 0
        0 0 2 3 3 3
        0 0 2 3 3 3
        0 0 0 3 3 3
    """))
    assert np.array_equal(instances[0], grid("""
        0 0 0 0 0 0
        0 0 0 0 0 0
        0 0 1 1 1 0
        0 0 1 0 0 0
        0 0 1 0 0 0
        0 0 0 0 0 0
    """).astype(bool))
    assert np.array_equal(instances[1], mask_b)
    # C: a second dog (1) with an uncertain band on background, and D: a cat covering the car entirely.
    region_c, mask_c, band_c = box.copy(), box.copy(), box.copy()
    region_c[0:2, 3:6], mask_c[0:2, 4:6], band_c[0:2, 3] = True, True, True
    labels, instances = insert_into_label_map(labels, instances, mask_c, 1, repainted=region_c, uncertain=band_c)
    mask_d = box.copy()
    mask_d[3:6, 3:6] = True
    labels, instances = insert_into_label_map(labels, instances, mask_d, 2)
    assert np.array_equal(labels, grid("""
        1 1 1 I 1 1
        1 I I I 1 1
        1 I 2 2 2 0
        0 0 2 2 2 2
        0 0 2 2 2 2
        0 0 0 2 2 2
    """))
    assert len(instances) == 4 and not instances[1].any()  # the car is fully covered
    assert (np.sum(instances, axis=0) <= 1).all()
    for own, class_id in zip(instances, [2, 3, 1, 2]):
        assert (labels[own] == class_id).all()
    assert base[1, 1] == 1  # inputs are not modified


# ---------------------------------------------------------------------------------------
# consistency check: retry, then reject; placement; determinism; batch


def test_retry_then_rejection_and_retry_then_success(pipe, base):
    image, labels = base
    obj = [FreeMaskObject("cat", region=(16, 16, 32, 32))]
    kwargs = dict(objects=obj, class_names=CLASSES, output_type="np", max_leak=1.0, max_retries=2, **FAST)
    failed = pipe(image, labels, generator=generator(2), min_coverage=1.0, **kwargs)
    assert not failed.inserted[0]
    (record,) = failed.rejected[0]
    assert record.attempts == 3 and "min_coverage" in record.reason and record.mask is None
    assert len(set(record.coverage)) == 3  # every retry drew new noise
    assert np.array_equal(failed.masks[0], labels) and failed.instance_masks[0].shape == (0, 32, 32)
    np.testing.assert_allclose(failed.images[0], image / 255.0, atol=1e-6)

    # A threshold between the first attempt and a later, better one: the first fails, that one passes.
    coverages = record.coverage
    later = next(j for j in range(1, 3) if coverages[j] > coverages[0])
    accepted = pipe(image, labels, generator=generator(2), min_coverage=(coverages[0] + coverages[later]) / 2,
                    **kwargs)
    (inserted,) = accepted.inserted[0]
    assert inserted.attempts == later + 1 and inserted.coverage == coverages[: later + 1]
    assert not accepted.rejected[0] and (accepted.masks[0][inserted.mask] == 2).all()


def test_leak_rejection_reason(pipe, base):
    image, labels = base
    out = pipe(image, labels, objects=[FreeMaskObject("car", region=(20, 20, 28, 28))], class_names=CLASSES,
               generator=generator(), output_type="np", min_coverage=0.0, max_leak=0.0, max_retries=0, **FAST)
    (record,) = out.rejected[0]
    assert record.attempts == 1 and "max_leak" in record.reason and record.leak[0] > 0


def test_free_box_sampler():
    occupied = np.zeros((64, 64), bool)
    occupied[:, :32] = True  # the left half is taken
    boxes = [sample_free_box(occupied, generator(s), (0.05, 0.2), (0.5, 2.0), max_overlap=0.1, grid=8)
             for s in range(6)]
    assert boxes[0] == sample_free_box(occupied, generator(0), (0.05, 0.2), (0.5, 2.0), max_overlap=0.1, grid=8)
    assert len(set(boxes)) > 1
    for x0, y0, x1, y1 in boxes:
        assert all(v % 8 == 0 for v in (x0, y0, x1, y1)) and 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
        area = (x1 - x0) * (y1 - y0)
        assert occupied[y0:y1, x0:x1].sum() <= 0.1 * area
        assert 0.05 * 0.5 <= area / 64**2 <= 0.2 * 1.5  # the range, up to snapping to the 8-px grid
    fine = [sample_free_box(np.zeros((64, 64), bool), generator(s), (0.1, 0.2)) for s in range(20)]
    assert all(0.1 * 0.9 <= (x1 - x0) * (y1 - y0) / 64**2 <= 0.2 * 1.1 for x0, y0, x1, y1 in fine)
    assert sample_free_box(np.ones((64, 64), bool), generator(), max_overlap=0.5) is None


def test_no_free_region_is_a_rejection(pipe, base):
    image, _ = base
    full = np.ones((32, 32), np.uint8)
    out = pipe(image, full, objects=["cat"], class_names=CLASSES, generator=generator(), output_type="np", **FAST)
    (record,) = out.rejected[0]
    assert "no free region" in record.reason and record.attempts == 0 and record.region is None


def test_same_generator_same_result(pipe, base):
    image, labels = base
    kwargs = dict(objects=["cat", "car"], class_names=CLASSES, output_type="np", max_overlap=0.0, **FAST, **ACCEPT)
    a = pipe(image, labels, generator=generator(3), **kwargs)
    b = pipe(image, labels, generator=generator(3), **kwargs)
    c = pipe(image, labels, generator=generator(4), **kwargs)
    assert [r.box for r in a.inserted[0]] == [r.box for r in b.inserted[0]]
    assert np.array_equal(a.images, b.images) and np.array_equal(a.masks, b.masks)
    assert np.array_equal(a.instance_masks[0], b.instance_masks[0])
    assert not np.array_equal(a.images, c.images)
    for record in a.inserted[0]:  # chosen boxes avoid the dog and each other entirely (max_overlap=0)
        assert not (record.region & (labels == 1)).any()
    assert not (a.inserted[0][0].region & a.inserted[0][1].region).any()


def test_batch_gives_the_same_results_as_one_by_one(pipe, base):
    image, labels = base
    other = np.ascontiguousarray(image[::-1])
    objects = [[FreeMaskObject("cat", region=(16, 16, 30, 30))], ["car", FreeMaskObject("dog", region=(0, 20, 12, 32))]]
    kwargs = dict(class_names=CLASSES, output_type="np", **FAST, **ACCEPT)
    batch = pipe([image, other], [labels, labels], objects=objects, generator=[generator(1), generator(2)], **kwargs)
    assert batch.images.shape == (2, 32, 32, 3) and [len(r) for r in batch.inserted] == [1, 2]
    for i, img in enumerate([image, other]):
        single = pipe(img, labels, objects=objects[i], generator=generator(i + 1), **kwargs)
        np.testing.assert_allclose(batch.images[i], single.images[0], atol=1e-4)
        assert np.array_equal(batch.masks[i], single.masks[0])
        assert np.array_equal(batch.instance_masks[i], single.instance_masks[0])
        assert [r.box for r in batch.inserted[i]] == [r.box for r in single.inserted[0]]


def test_pil_and_pt_outputs_and_tuple(pipe, base):
    image, labels = base
    out = pipe(PIL.Image.fromarray(image), PIL.Image.fromarray(labels),
               objects=[FreeMaskObject("cat", region=(16, 16, 32, 32))], class_names=CLASSES, generator=generator(),
               **FAST, **ACCEPT)
    assert out.images[0].size == (32, 32) and out.masks[0].mode == "L"
    unchanged = feather_weights(out.inserted[0][0].region, pipe.vae_scale_factor) == 0
    assert np.array_equal(np.asarray(out.images[0])[unchanged], image[unchanged])  # exact in uint8
    images, masks, instances, inserted, rejected = pipe(
        torch.from_numpy(image).permute(2, 0, 1) / 255.0, torch.from_numpy(labels), objects=["cat"],
        class_names=CLASSES, generator=generator(), output_type="pt", return_dict=False, **FAST, **ACCEPT,
    )
    assert images.shape == (1, 3, 32, 32) and masks.dtype == torch.uint8 and instances[0].dtype == torch.bool
    assert len(inserted[0]) + len(rejected[0]) == 1


# ---------------------------------------------------------------------------------------
# the inpainting UNet (9 input channels)


def test_inpainting_unet_path(base):
    from diffusers import UNet2DConditionModel

    components = tiny_components(seed=0)
    torch.manual_seed(0)
    components["unet"] = UNet2DConditionModel.from_config({**components["unet"].config, "in_channels": 9}).eval()
    inpaint = FreeMaskEditPipeline(**components, requires_safety_checker=False)
    inpaint.set_progress_bar_config(disable=True)
    image, labels = base
    out = inpaint(image, labels, objects=[FreeMaskObject("cat", region=(16, 16, 32, 32))], class_names=CLASSES,
                  generator=generator(), output_type="np", **FAST, **ACCEPT)
    (record,) = out.inserted[0]
    unchanged = feather_weights(record.region, inpaint.vae_scale_factor) == 0
    np.testing.assert_allclose(out.images[0][unchanged], image[unchanged] / 255.0, atol=1e-6)
    assert (out.masks[0][record.mask] == 2).all()

    latents, mask = torch.randn(1, 4, 16, 16, generator=generator(1)), torch.zeros(1, 1, 16, 16)
    mask[..., 8:, 8:] = 1
    with pytest.raises(ValueError, match="masked_image_latents"):
        inpaint.edit_latents(latents, mask, ["a cat"], **FAST)
    with pytest.raises(ValueError, match="inpainting UNet"):
        inpaint(base_prompt="a dog", base_classes=["dog"], objects=["cat"], class_names=CLASSES, **FAST)


# ---------------------------------------------------------------------------------------
# bad input


def _mask(shape, box=None):
    mask = np.zeros(shape, bool)
    if box is not None:
        mask[box] = True
    return mask


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(objects=[FreeMaskObject("cat", region=(20, 20, 40, 30))]), "lies outside the 32x32 image"),
        (dict(objects=[FreeMaskObject("cat", region=(-2, 0, 8, 8))]), "lies outside"),
        (dict(objects=[FreeMaskObject("cat", region=(10, 10, 10, 20))]), "empty region"),
        (dict(objects=[FreeMaskObject("cat", region=_mask((32, 32)))]), "empty region"),
        (dict(objects=[FreeMaskObject("cat", region=_mask((16, 16), np.s_[2:4, 2:4]))]), "region mask is 16x16"),
        (dict(objects=["zebra"]), "unknown class 'zebra'"),
        (dict(objects=[FreeMaskObject("cat", prompt="a photo of a car")]), "'cat' does not appear in the prompt"),
        (dict(label_map=np.zeros((16, 32), np.uint8)), "label map 0 is 16x32 but its image is 32x32"),
        (dict(label_map=np.full((32, 32), 7, np.uint8)), r"values \[7\] that are not class ids"),
        (dict(label_map=None), "`label_map` is required"),
        (dict(class_names=None), "class_names is required"),
        (dict(objects=None), "`objects` is required"),
        (dict(image=None, label_map=None), "either a base `image`"),
        (dict(base_prompt="a dog"), "either a base `image`"),
        (dict(mode="inpaint"), "mode must be 'edit' or 'paste'"),
        (dict(region_size=(0.5, 0.1)), "region_size"),
        (dict(min_coverage=1.5), "min_coverage must be in"),
        (dict(threshold="mean"), "unknown threshold method"),
        (dict(generator=[generator(), generator()]), "2 generators for 1 images"),
        (dict(image=np.zeros((30, 30, 3), np.uint8), label_map=np.zeros((30, 30), np.uint8)), "multiples of 8"),
        (dict(objects=[["cat"], ["car"]]), "1 base images but 2 lists of objects"),
        (dict(output_type="latent"), "output_type"),
    ],
)
def test_bad_input_is_a_clear_error(pipe, base, change, message):
    image, labels = base
    kwargs = dict(image=image, label_map=labels, objects=["cat"], class_names=CLASSES, **FAST)
    kwargs.update(change)
    with pytest.raises(ValueError, match=message):
        pipe(**kwargs)


# ---------------------------------------------------------------------------------------
# loading as a custom pipeline; the dataset generator's registry


def test_custom_pipeline_loads_with_trust_remote_code(tmp_path, pipe, base):
    from diffusers import DiffusionPipeline

    folder = save_tiny_stable_diffusion(tmp_path / "tiny-sd", seed=0)
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(folder, custom_pipeline=str(REPO / "pipelines" / "freemask"))
    # Another shim loaded first in the same process (diffusers reuses one module for all local shims).
    first = DiffusionPipeline.from_pretrained(
        folder, custom_pipeline=str(REPO / "pipelines" / "diffumask"), trust_remote_code=True
    )
    assert type(first).__name__ == "DiffuMaskPipeline"
    loaded = DiffusionPipeline.from_pretrained(
        folder, custom_pipeline=str(REPO / "pipelines" / "freemask"), trust_remote_code=True
    )
    assert type(loaded).__name__ == "FreeMaskEditPipeline"
    loaded.set_progress_bar_config(disable=True)
    image, labels = base
    kwargs = dict(objects=[FreeMaskObject("cat", region=(16, 16, 32, 32))], class_names=CLASSES, output_type="np",
                  **FAST, **ACCEPT)
    out = loaded(image, labels, generator=generator(), **kwargs)
    expected = pipe(image, labels, generator=generator(), **kwargs)
    np.testing.assert_allclose(out.images, expected.images, atol=1e-5)
    assert np.array_equal(out.masks, expected.masks)


def test_registered_for_diffuseg_generate(pipe):
    from diffuseg.generation import GenerationConfig, SampleRequest, get_pipeline, parse_classes

    spec = get_pipeline("freemask")
    config = GenerationConfig(out="unused", classes=parse_classes("cat,dog"), images_per_class=1,
                              pipeline="freemask", height=32, width=32, num_inference_steps=2)
    requests = [SampleRequest(0, 11, "a photo of a dog on the grass", [2], ["dog"])]
    (sample,) = spec.generate(pipe, requests, config)
    assert sample["image"].shape == (32, 32, 3) and sample["image"].dtype == np.uint8
    assert set(np.unique(sample["label"])) <= {0, 2, 255}  # dataset ids: dog is 2
    # One insertion (the dog), accepted or rejected by a named check.
    assert sample["objects_inserted"] + sample["objects_rejected"] == 1
    assert sample["rejection_reasons"] in ("", "min_coverage", "max_leak", "no_free_region")
    assert (sample["rejection_reasons"] == "") == (sample["objects_inserted"] == 1)


def test_dataset_card_reports_insertion_acceptance(tmp_path, pipe):
    import pyarrow.parquet as pq

    from diffuseg.generation import GenerationConfig, generate_dataset, parse_classes

    config = GenerationConfig(out=str(tmp_path / "ds"), classes=parse_classes("cat,dog"), images_per_class=2,
                              pipeline="freemask", model="tiny-random", height=32, width=32, num_inference_steps=2,
                              batch_size=2, region_size=(0.1, 0.3))
    generate_dataset(config, pipe=pipe, progress=False)
    rows = pq.read_table(tmp_path / "ds" / "data").to_pylist()
    assert len(rows) == 4
    accepted = sum(r["objects_inserted"] for r in rows)
    checks = [c for r in rows for c in r["rejection_reasons"].split(",") if c]
    assert accepted + len(checks) == 4 and sum(r["objects_rejected"] for r in rows) == len(checks)
    card = (tmp_path / "ds" / "README.md").read_text()
    assert f"Free-Mask insertions (one more instance of each named class per sample, regions of 10%–30% " \
           f"of the image): {accepted} of 4 accepted ({accepted / 4:.0%})" in card
    for check in set(checks):
        assert f"{checks.count(check)} because" in card and f"(`{check}`)" in card
    assert config.fingerprint()["region_size"] == [0.1, 0.3]


def test_region_size_defaults_to_the_models(tmp_path, base):
    # A model's diffuseg.json sizes the regions to its objects (ShapesWorld: 15-35% of the image).
    from diffuseg.generation import GenerationConfig, parse_classes
    from diffuseg.models import model_defaults

    assert model_defaults("shapesworld").region_size == (0.15, 0.35)
    config = GenerationConfig(out="unused", classes=parse_classes("shapes"), images_per_class=1, pipeline="freemask")
    assert config.region_size == (0.15, 0.35)
    assert "region_size" not in GenerationConfig(out="unused", classes=parse_classes("shapes"),
                                                 images_per_class=1).fingerprint()  # other pipelines: unchanged

    folder = save_tiny_stable_diffusion(tmp_path / "tiny-sd", seed=0)
    (tmp_path / "tiny-sd" / "diffuseg.json").write_text('{"region_size": [0.5, 0.6]}')
    loaded = FreeMaskEditPipeline.from_pretrained(folder)
    loaded.set_progress_bar_config(disable=True)
    image, labels = base
    out = loaded(image, np.zeros_like(labels), objects=["cat"], class_names=CLASSES, generator=generator(), **FAST,
                 **ACCEPT)
    x0, y0, x1, y1 = out.inserted[0][0].box
    assert 0.5 * 32 * 32 * 0.8 <= (x1 - x0) * (y1 - y0) <= 0.6 * 32 * 32 * 1.3  # snapped to latent cells


def test_insertion_record_prints_a_short_summary():
    # The masks are (H, W) arrays: printing out.rejected must say what happened, not dump them.
    region = np.zeros((64, 64), dtype=bool)
    region[8:40, 8:40] = True
    record = InsertionRecord("square", 2, "square", "a picture of a square", region=region, box=(8, 8, 40, 40),
                             coverage=[0.077], leak=[0.2], reason="mask covers 7.7% of its region (min_coverage=15.0%)")
    text = repr([record])
    assert "mask covers 7.7%" in text and "(8, 8, 40, 40)" in text and "8% coverage / 20% leak" in text
    assert "array" not in text and "False" not in text and len(text) < 300
    record.reason, record.mask = None, region
    assert "inserted, mask 1024 px" in repr(record)


def test_default_object_prompt_is_in_the_embedded_models_grammar():
    from diffuseg.pipelines.freemask import default_object_prompt
    from diffuseg.shapesworld.render import CAPTION_TEMPLATES

    assert default_object_prompt("square") == "a picture of a square" == CAPTION_TEMPLATES[1][1].format("square")
    assert default_object_prompt("apple") == "a picture of an apple"


def test_leak_does_not_count_the_objects_already_in_the_image():
    # A class word attends to every object of its kind; the edit keeps those, they are no leak.
    from diffuseg.pipelines.freemask import object_mask

    region, existing = np.zeros((32, 32), dtype=bool), np.zeros((32, 32), dtype=bool)
    region[4:12, 4:12] = True
    existing[16:30, 16:30] = True
    attention = torch.zeros(32, 32)
    attention[5:11, 5:11] = 1.0
    attention[16:30, 16:30] = 0.9
    mask, _, coverage, leak = object_mask(attention, region)
    assert mask.sum() == 36 and leak > 0.8
    assert object_mask(attention, region, objects=existing)[3] == 0.0


def test_latent_window_is_the_region_with_context_in_unet_sized_sides():
    from diffuseg.pipelines.freemask import latent_window

    cells = torch.zeros(16, 16)
    cells[5:10, 0:3] = 1  # rows 5-9, columns 0-2
    # One cell of context (rows 4-10, columns 0-3), grown evenly to multiples of 4, kept inside.
    assert latent_window(cells, 1, 4) == (4, 12, 0, 4)
    assert latent_window(cells, 0, 1) == (5, 10, 0, 3)
    assert latent_window(cells, None, 4) == (0, 16, 0, 16)
    assert latent_window(cells, 20, 4) == (0, 16, 0, 16)


def test_insertion_denoises_only_a_window_around_its_region(pipe, base):
    # The word's map is read in the window only; a whole-latent run is still available.
    image, labels = base
    kwargs = dict(objects=[FreeMaskObject("cat", region=(20, 20, 28, 28))], class_names=CLASSES, output_type="np",
                  generator=generator(), **FAST, **ACCEPT)
    windowed, whole = pipe(image, labels, crop_margin=1, **kwargs), pipe(image, labels, crop_margin=None, **kwargs)
    for out in (windowed, whole):
        (record,) = out.inserted[0]
        assert record.mask.any() and not record.mask[~record.region].any()
    assert not np.allclose(windowed.images, whole.images)
    with pytest.raises(ValueError, match="crop_margin"):
        pipe(image, labels, crop_margin=-1, **kwargs)
