"""Mean IoU for semantic segmentation, with seen / unseen / harmonic mIoU for zero-shot runs.

Same arguments and results as the Hub's ``mean_iou`` metric, computed from one confusion
matrix over the whole batch (see ``diffuseg.metrics``). Load it offline with
``diffuseg.metrics.load_mean_iou()`` or ``evaluate.load(<this folder>)``.
"""

# evaluate.load parses these lines to check what is installed: one import per line.
import datasets
import evaluate
from diffuseg.metrics import mean_iou

_DESCRIPTION = """
IoU of a class is the area of overlap between predicted and reference masks divided by the
area of their union; mean IoU averages it over the classes present in references or
predictions. Also returns per-class accuracy, mean accuracy and overall (pixel) accuracy,
and, given `unseen_classes`, the mean IoU over seen classes, over unseen classes, and their
harmonic mean (the zero-shot segmentation protocol).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`List[ndarray]`): predicted label maps, each of shape (height, width).
    references (`List[ndarray]`): reference label maps, same shapes as `predictions`.
    num_labels (`int`): number of classes.
    ignore_index (`int`): reference id that is not counted (e.g. 255).
    nan_to_num (`int`, *optional*): value that replaces NaN (a class absent from both).
    label_map (`dict`, *optional*): old reference id -> new id, applied first.
    reduce_labels (`bool`, defaults to `False`): reference 0 becomes ignored, the others drop by 1.
    unseen_classes (`List[int]`, *optional*): class ids held out in training.

Returns:
    `mean_iou`, `mean_accuracy`, `overall_accuracy` (float), `per_category_iou`,
    `per_category_accuracy` (ndarray of shape (num_labels,)), and with `unseen_classes`:
    `mean_iou_seen`, `mean_iou_unseen`, `harmonic_mean_iou`.

Examples:
    >>> import numpy as np
    >>> from diffuseg.metrics import load_mean_iou
    >>> metric = load_mean_iou()
    >>> predicted = [np.array([[0, 1], [1, 1]])]
    >>> ground_truth = [np.array([[0, 1], [255, 0]])]
    >>> results = metric.compute(predictions=predicted, references=ground_truth, num_labels=2, ignore_index=255)
    >>> round(float(results["mean_iou"]), 4)
    0.5
"""

_CITATION = """
@software{diffuseg_mean_iou,
  title = {diffuseg mean IoU},
  note = {Same definitions as the Hugging Face evaluate mean_iou metric (MMSegmentation's eval_metrics).}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MeanIoU(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("uint16"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("uint16"))),
                }
            ),
        )

    def _compute(
        self,
        predictions,
        references,
        num_labels,
        ignore_index,
        nan_to_num=None,
        label_map=None,
        reduce_labels=False,
        unseen_classes=None,
    ):
        return mean_iou(
            predictions,
            references,
            num_labels=num_labels,
            ignore_index=ignore_index,
            nan_to_num=nan_to_num,
            label_map=label_map,
            reduce_labels=reduce_labels,
            unseen_classes=unseen_classes,
        )
