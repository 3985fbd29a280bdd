"""diffuseg.metrics and its evaluate module against a plain per-image, per-class NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffuseg.metrics import MEAN_IOU_PATH, confusion_matrix, load_mean_iou, mean_iou, metrics_from_confusion

IGNORE = 255


def reference_mean_iou(predictions, references, num_labels, ignore_index=IGNORE, label_map=None, reduce_labels=False):
    """Straightforward definition: loop over images and classes, count pixels, divide."""
    intersection = np.zeros(num_labels)
    area_reference = np.zeros(num_labels)
    area_prediction = np.zeros(num_labels)
    for prediction, reference in zip(predictions, references):
        prediction, reference = np.array(prediction, dtype=np.int64), np.array(reference, dtype=np.int64)
        if label_map:
            for old, new in label_map.items():
                reference[reference == old] = new
        if reduce_labels:
            reference[reference == 0] = 255
            reference = reference - 1
            reference[reference == 254] = 255
        scored = reference != ignore_index
        for c in range(num_labels):
            intersection[c] += np.sum((prediction == c) & (reference == c) & scored)
            area_reference[c] += np.sum((reference == c) & scored)
            area_prediction[c] += np.sum((prediction == c) & scored)
    union = area_reference + area_prediction - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = intersection / union
        accuracy = intersection / area_reference
    return {
        "mean_iou": np.nanmean(iou),
        "mean_accuracy": np.nanmean(accuracy),
        "overall_accuracy": intersection.sum() / area_reference.sum(),
        "per_category_iou": iou,
        "per_category_accuracy": accuracy,
    }


def random_batch(seed, num_labels=6, shapes=((17, 23), (31, 8), (5, 40), (12, 12))):
    """Ragged label maps with ignored pixels, an absent class and out-of-range ids."""
    rng = np.random.default_rng(seed)
    predictions, references = [], []
    for shape in shapes:
        reference = rng.integers(0, num_labels - 1, shape)  # class num_labels-1 never in the references
        reference[rng.random(shape) < 0.15] = IGNORE
        prediction = np.where(rng.random(shape) < 0.6, reference, rng.integers(0, num_labels - 2, shape))
        prediction[rng.random(shape) < 0.03] = 9  # an id that is no class
        predictions.append(prediction)
        references.append(reference)
    return predictions, references


def assert_same_metrics(ours, expected, keys=None):
    for key in keys or expected:
        np.testing.assert_allclose(np.asarray(ours[key], dtype=float), np.asarray(expected[key], dtype=float), rtol=0, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference_on_random_ragged_batches(seed):
    predictions, references = random_batch(seed)
    ours = mean_iou(predictions, references, num_labels=6, ignore_index=IGNORE)
    expected = reference_mean_iou(predictions, references, 6)
    assert np.isnan(expected["per_category_iou"][5])  # the absent class
    assert_same_metrics(ours, expected)


def test_absent_class_is_nan_and_nan_to_num_replaces_it():
    predictions, references = random_batch(3, num_labels=7)  # classes 5 and 6: neither referenced nor predicted
    ours = mean_iou(predictions, references, num_labels=7)
    expected = reference_mean_iou(predictions, references, 7)
    assert np.isnan(ours["per_category_iou"][6]) and np.isnan(expected["per_category_iou"][6])
    assert_same_metrics(ours, expected)
    filled = mean_iou(predictions, references, num_labels=7, nan_to_num=-1)
    assert filled["per_category_iou"][6] == -1 and filled["per_category_accuracy"][6] == -1
    assert filled["mean_iou"] == pytest.approx(expected["mean_iou"], abs=1e-12)  # the mean itself was defined


def test_stacked_arrays_and_tensors_equal_lists():
    rng = np.random.default_rng(4)
    references = rng.integers(0, 4, (3, 16, 16))
    references[:, :2] = IGNORE
    predictions = rng.integers(0, 4, (3, 16, 16))
    expected = reference_mean_iou(predictions, references, 4)
    assert_same_metrics(mean_iou(predictions, references, 4), expected)
    assert_same_metrics(mean_iou(torch.from_numpy(predictions), torch.from_numpy(references), 4), expected)
    assert_same_metrics(mean_iou(list(predictions), list(references), 4), expected)


def test_label_map_and_reduce_labels_match_reference():
    predictions, references = random_batch(5, num_labels=6)
    label_map = {1: 3, 3: 1, 4: 0}
    for kwargs in ({"label_map": label_map}, {"reduce_labels": True}, {"label_map": label_map, "reduce_labels": True}):
        assert_same_metrics(mean_iou(predictions, references, 6, **kwargs), reference_mean_iou(predictions, references, 6, **kwargs))


def test_out_of_range_prediction_counts_against_the_reference_class():
    references = [np.array([[0, 1, 1, IGNORE]])]
    predictions = [np.array([[0, 1, 9, 1]])]  # 9: no class; the ignored pixel is not counted
    result = mean_iou(predictions, references, num_labels=2)
    np.testing.assert_allclose(result["per_category_iou"], [1.0, 0.5])
    np.testing.assert_allclose(result["per_category_accuracy"], [1.0, 0.5])
    assert result["overall_accuracy"] == pytest.approx(2 / 3)


def test_seen_unseen_and_harmonic_mean():
    predictions, references = random_batch(6)
    result = mean_iou(predictions, references, num_labels=6, unseen_classes=[2, 4])
    iou = reference_mean_iou(predictions, references, 6)["per_category_iou"]
    seen, unseen = np.nanmean(iou[[0, 1, 3, 5]]), np.mean(iou[[2, 4]])  # class 5 is absent: NaN
    assert result["mean_iou_seen"] == pytest.approx(seen, abs=1e-12)
    assert result["mean_iou_unseen"] == pytest.approx(unseen, abs=1e-12)
    assert result["harmonic_mean_iou"] == pytest.approx(2 * seen * unseen / (seen + unseen), abs=1e-12)
    with pytest.raises(ValueError, match="outside"):
        mean_iou(predictions, references, num_labels=6, unseen_classes=[6])


def test_per_image_confusion_sums_to_the_batch_confusion():
    predictions, references = random_batch(7)
    per_image = confusion_matrix(predictions, references, 6, per_image=True)
    assert per_image.shape == (4, 7, 7)
    assert torch.equal(per_image.sum(0), confusion_matrix(predictions, references, 6))
    # One image's matrix is that image alone.
    assert torch.equal(per_image[1], confusion_matrix(predictions[1:2], references[1:2], 6))
    assert_same_metrics(metrics_from_confusion(per_image.sum(0)), reference_mean_iou(predictions, references, 6))


def test_mismatched_shapes_are_a_clear_error():
    with pytest.raises(ValueError, match="differ"):
        mean_iou([np.zeros((4, 4))], [np.zeros((4, 5))], num_labels=2)
    # Same number of pixels, other layout: scoring them would pair unrelated pixels.
    for predictions, references in (
        ([np.zeros((2, 3), dtype=np.int64)], [np.zeros((3, 2), dtype=np.int64)]),
        (np.zeros((1, 2, 3), dtype=np.int64), np.zeros((1, 3, 2), dtype=np.int64)),
        (torch.zeros(1, 2, 3, dtype=torch.long), [torch.zeros(3, 2, dtype=torch.long)]),
    ):
        with pytest.raises(ValueError, match=r"differ in shape \(\(2, 3\) vs \(3, 2\)\)"):
            mean_iou(predictions, references, num_labels=2)
    with pytest.raises(ValueError, match="number of images"):
        mean_iou([np.zeros((2, 2))] * 2, [np.zeros((2, 2))], num_labels=2)


@pytest.mark.parametrize("bad", [1.5, np.nan, np.inf])
def test_non_integer_predictions_are_a_clear_error(bad):
    reference = np.array([[0, 1], [1, 1]])
    prediction = np.array([[0.0, bad], [1.0, 1.0]])
    for predictions in ([prediction], prediction[None], torch.from_numpy(prediction)[None]):
        with pytest.raises(ValueError, match="predictions must be integer label ids"):
            mean_iou(predictions, [reference], num_labels=2)
    with pytest.raises(ValueError, match="references must be integer label ids"):
        mean_iou([reference], [prediction], num_labels=2)
    # Whole numbers stored as floats are label ids all the same.
    as_float = mean_iou([reference.astype(np.float32)], [reference], num_labels=2)
    assert as_float["mean_iou"] == 1.0


def test_evaluate_module_refuses_mismatched_shapes_and_non_integers(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    module = load_mean_iou()
    with pytest.raises(ValueError, match="differ in shape"):
        module.compute(
            predictions=[np.zeros((2, 3), dtype=np.int64)], references=[np.zeros((3, 2), dtype=np.int64)],
            num_labels=2, ignore_index=IGNORE,
        )
    # evaluate's uint16 features refuse fractional ids before the module computes anything.
    with pytest.raises(ValueError, match="expected format"):
        module.compute(
            predictions=[np.array([[0.0, 1.5]])], references=[np.array([[0, 1]])], num_labels=2, ignore_index=IGNORE
        )


def test_evaluate_module_loads_offline_and_agrees(monkeypatch):
    import evaluate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    predictions, references = random_batch(8)
    expected = reference_mean_iou(predictions, references, 6)
    module = load_mean_iou()
    assert_same_metrics(module.compute(predictions=predictions, references=references, num_labels=6, ignore_index=IGNORE), expected)
    # The same folder through evaluate.load directly, fed batch by batch, with the zero-shot figures.
    module = evaluate.load(str(MEAN_IOU_PATH))
    for prediction, reference in zip(predictions, references):
        module.add_batch(predictions=[prediction], references=[reference])
    result = module.compute(num_labels=6, ignore_index=IGNORE, unseen_classes=[5])
    assert_same_metrics(result, expected)
    assert "harmonic_mean_iou" in result
