"""Train a semantic segmentation model on real and synthetic diffuseg datasets with accelerate.

:func:`train` reads top to bottom like transformers' ``run_semantic_segmentation_no_trainer.py``:
datasets and one label space -> model (optionally LoRA) -> data loaders -> optimizer ->
``accelerator.prepare`` -> resume -> loop with periodic evaluation and checkpoints -> final
evaluation, ``save_pretrained``, model card. The same code runs on one CPU or many GPUs
(``accelerate launch -m diffuseg train ...``).

Two additions to the plain recipe:

- zero-shot protocol: ``unseen_classes`` are set to the ignore index in the *real* training
  sets (synthetic sets keep them: that is what they are for) and evaluation reports seen,
  unseen and harmonic mIoU;
- counterfactual loss: for sets with a ``negative_image`` (the same scene without the
  sample's objects, MagicSeg-style), ``counterfactual_weight`` times either MagicSeg's
  contrast of embeddings (``"embedding"``, the default: the cosine similarity, clamped at 0,
  of each object's pooled features and those of the same region of the counterfactual) or
  the pixel-absence form (``"absence"``: ``-log(1 - p_class)`` over the counterfactual's
  pixels).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from diffuseg.data import BACKGROUND, IGNORE_INDEX
from diffuseg.evaluation import evaluate_segmentation, format_report, metrics_report
from diffuseg.outputs import check_writable, record_written
from diffuseg.training_data import (
    MixtureSampler,
    SampleTransform,
    SegmentationSamples,
    SegmentationSource,
    build_label_space,
    label_lookup,
    load_source,
    looks_like_local_path,
    processor_normalisation,
    segmentation_loader,
    training_label_lookups,
)

DEFAULT_SEGMENTATION_MODEL = "nvidia/mit-b0"
"""SegFormer-B0 encoder pretrained on ImageNet-1k; its decode head is initialised for the labels."""
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # The SegFormer-B0 architecture (transformers' defaults), from scratch.
    "segformer-b0": {"model_type": "segformer"},
    # A 24k-parameter SegFormer: tests and CPU experiments on 32-128 px images (output stride 4).
    "segformer-tiny": {
        "model_type": "segformer",
        "num_encoder_blocks": 2,
        "depths": [1, 1],
        "sr_ratios": [2, 1],
        "hidden_sizes": [16, 32],
        "patch_sizes": [7, 3],
        "strides": [4, 2],
        "num_attention_heads": [1, 2],
        "mlp_ratios": [2, 2],
        "decoder_hidden_size": 32,
    },
}
"""Names accepted by ``config`` besides a config.json file, a model folder or a Hub id."""
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
"""Attention projections of transformers' SegFormer (and most ViT-style backbones)."""
CHECKPOINTS = "checkpoints"
TRACKER_RUN = "diffuseg-train"
"""Run name of the trackers: their logs go to ``output_dir/diffuseg-train``."""
COUNTERFACTUAL_LOSSES = {
    "embedding": "MagicSeg's contrast: cosine similarity, clamped at 0, of each object's region embedding "
    "in the positive and the same region's in the counterfactual",
    "absence": "-log(1 - p_class) over every pixel of the counterfactual",
}
"""Forms of the counterfactual loss (``--counterfactual-loss``) and what each computes."""


@dataclass
class TrainingArguments:
    """What :func:`train` does; each field is the ``diffuseg train`` option of the same name."""

    train: list[str]
    """Training datasets: local Hub-layout folders or Hub ids."""
    eval: list[str] = field(default_factory=list)
    """Evaluation datasets, each scored separately."""
    output_dir: str = "segmenter"
    model: str | None = None
    """Pretrained model (Hub id or folder) to fine-tune; default :data:`DEFAULT_SEGMENTATION_MODEL`."""
    config: str | None = None
    """Train from scratch: a preset of :data:`MODEL_PRESETS`, a config.json, or a model folder / Hub id whose config is used."""
    labels: list[str] | None = None
    """Class names of the model, in id order; default: those of the training sets."""
    train_weights: list[float] | None = None
    """Sampling weight of each training set; default: proportional to size."""
    train_split: str | None = None
    eval_split: str | None = None
    image_column: str = "image"
    label_column: str = "label"
    real_train: list[str] | None = None
    """Training sets that are real data (zero-shot: unseen classes ignored); default: those whose ``pipeline`` column is absent, empty or ``render`` (ground truth)."""
    unseen_classes: list[str] | None = None
    counterfactual_weight: float = 1.0
    counterfactual_loss: str = "embedding"
    """``"embedding"`` (MagicSeg's cosine contrast) or ``"absence"``; see :data:`COUNTERFACTUAL_LOSSES`."""
    image_size: int = 512
    crop_scale: tuple[float, float] = (0.5, 2.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_prob: float = 0.5
    batch_size: int = 8
    """Per process."""
    eval_batch_size: int | None = None
    learning_rate: float = 6e-5
    weight_decay: float = 0.01
    lr_scheduler: str = "linear"
    warmup_steps: int = 0
    max_grad_norm: float | None = None
    max_steps: int = 1000
    eval_steps: int | None = None
    """Evaluate every N steps (and always at the end)."""
    checkpoint_steps: int | None = None
    keep_checkpoints: int | None = 2
    resume: str | None = None
    """A checkpoint folder, or ``"latest"`` (the newest under ``output_dir``, if any)."""
    seed: int = 0
    num_workers: int = 0
    report_to: str | None = None
    """``"tensorboard"`` (or another accelerate tracker) to log losses and metrics under output_dir."""
    lora: bool = False
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))

    def validate(self) -> None:
        """Raise ValueError on arguments that cannot work, before anything is loaded."""
        if not self.train:
            raise ValueError("no training dataset: pass --train FOLDER_OR_HUB_ID")
        if self.model is not None and self.config is not None:
            raise ValueError("pass either --model (fine-tune pretrained weights) or --config (train from scratch), not both")
        for name in ("batch_size", "image_size", "max_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] or not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"crop scale and ratio must be positive (min, max) ranges, got {self.crop_scale} and {self.crop_ratio}")
        if self.counterfactual_loss not in COUNTERFACTUAL_LOSSES:
            raise ValueError(f"--counterfactual-loss must be one of {', '.join(COUNTERFACTUAL_LOSSES)}, got {self.counterfactual_loss!r}")
        if self.real_train and set(self.real_train) - set(self.train):
            raise ValueError(f"--real-train names {sorted(set(self.real_train) - set(self.train))}, which are not --train datasets")
        if self.report_to == "tensorboard" and not (
            importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")
        ):
            raise ValueError("--report-to tensorboard needs tensorboard: pip install 'diffuseg[train]'")


@dataclass
class TrainingResult:
    model: Any
    """The trained model (a ``PeftModel`` with LoRA), unwrapped from accelerate."""
    output_dir: Path
    steps: int
    losses: list[float]
    """Training loss of each step run by this call (this process's batch)."""
    eval_results: dict[str, dict[str, Any]]
    """Final :func:`~diffuseg.evaluation.metrics_report` of each evaluation set."""
    steps_per_second: float
    """Optimizer steps per second of this call's loop, evaluation and checkpoints excluded."""


def train(args: TrainingArguments) -> TrainingResult:
    """Train (or fine-tune) a segmentation model; see :class:`TrainingArguments`."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import AutoConfig, get_scheduler

    args.validate()
    output_dir = Path(args.output_dir)
    check_writable(output_dir, None, "--output-dir")  # a user's README.md there is never overwritten
    accelerator = Accelerator(log_with=args.report_to, project_dir=str(output_dir))
    if accelerator.is_main_process:
        record_written(output_dir, [CHECKPOINTS, "base", TRACKER_RUN])  # before a kill can leave them behind
    set_seed(args.seed)

    # Datasets, and one label space shared by all of them (matched by class name).
    with accelerator.main_process_first():
        train_sources = [
            load_source(name, args.train_split, ("train",), args.image_column, args.label_column) for name in args.train
        ]
        eval_sources = [
            load_source(name, args.eval_split, ("validation", "test"), args.image_column, args.label_column)
            for name in args.eval
        ]
    pretrained = None if args.config else args.model or DEFAULT_SEGMENTATION_MODEL
    pretrained_config = AutoConfig.from_pretrained(pretrained) if pretrained else None
    label_space = build_label_space(train_sources, args.labels, pretrained_config.id2label if pretrained_config else None)
    unseen = unseen_class_ids(args.unseen_classes or [], label_space)
    train_lookups, real = training_label_lookups(train_sources, label_space, args.unseen_classes or (), args.real_train)
    eval_lookups = [label_lookup(source, label_space) for source in eval_sources]

    # Model: pretrained weights with a new head for the label space, or from scratch.
    model = build_model(label_space, pretrained, pretrained_config, args.config)
    processor = build_image_processor(pretrained, model.config.model_type, args.image_size)
    mean, std = processor_normalisation(processor)
    if args.lora:
        if accelerator.is_main_process:  # the adapter needs its exact base to reload
            model.save_pretrained(output_dir / "base")
        model = add_lora(model, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_target_modules)

    # Data loaders: weighted mixture of the training sets, each evaluation set on its own.
    background = next((i for i, name in label_space.items() if name == BACKGROUND), None)
    train_samples = SegmentationSamples(
        train_sources,
        train_lookups,
        SampleTransform(
            args.image_size, mean, std, augment=True, crop_scale=args.crop_scale, crop_ratio=args.crop_ratio, hflip_prob=args.hflip_prob
        ),
        num_labels=len(label_space),
        background_id=background,
        with_negatives=args.counterfactual_weight > 0,
    )
    sampler = MixtureSampler([len(source.dataset) for source in train_sources], args.train_weights, args.seed)
    train_loader = segmentation_loader(train_samples, args.batch_size, args.num_workers, args.seed, sampler=sampler)
    eval_transform = SampleTransform(args.image_size, mean, std)
    eval_loaders = [
        segmentation_loader(
            SegmentationSamples([source], [lookup], eval_transform, len(label_space)),
            args.eval_batch_size or args.batch_size,
            args.num_workers,
            args.seed,
        )
        for source, lookup in zip(eval_sources, eval_lookups)
    ]

    optimizer = torch.optim.AdamW(
        [parameter for parameter in model.parameters() if parameter.requires_grad],
        lr=args.learning_rate,
        weight_decay=args.weight_decay,
        # One fused kernel for all parameters: 5x faster steps than the per-tensor loop on CPU.
        fused=accelerator.device.type in ("cpu", "cuda"),
    )
    # Stepped once per optimizer step by hand (a prepared scheduler steps once per process).
    scheduler = get_scheduler(args.lr_scheduler, optimizer, args.warmup_steps, args.max_steps)
    model, optimizer, train_loader, *eval_loaders = accelerator.prepare(model, optimizer, train_loader, *eval_loaders)
    # The scheduler is not registered with accelerate: its custom states are pickles loaded with
    # weights_only=False, i.e. code a checkpoint could carry. save_checkpoint keeps it as JSON.
    steps_per_epoch = len(train_loader)
    if args.report_to:
        accelerator.init_trackers(TRACKER_RUN, config=_tracker_config(args))

    step = 0
    checkpoint = find_checkpoint(output_dir, args.resume)
    if checkpoint is not None:
        step = load_checkpoint(accelerator, checkpoint, scheduler)
        accelerator.print(f"resumed from {checkpoint} at step {step}")
    elif args.resume:
        accelerator.print(f"no checkpoint under {output_dir / CHECKPOINTS} yet: starting from step 0")

    def evaluate_all() -> dict[str, dict[str, Any]]:
        reports = {}
        for source, loader in zip(eval_sources, eval_loaders):
            metrics, images = evaluate_segmentation(model, loader, accelerator, len(label_space), unseen or None, f"eval {source.name}")
            reports[source.name] = metrics_report(metrics, label_space, images, source.split)
            accelerator.log({f"eval/{source.name}/{key}": value for key, value in reports[source.name].items() if isinstance(value, float)}, step=step)
        return reports

    losses: list[float] = []
    steps_run, loop_seconds = 0, 0.0
    model.train()
    progress = tqdm(total=args.max_steps, initial=step, desc="train", disable=not accelerator.is_local_main_process)
    while step < args.max_steps:
        train_loader.set_epoch(step // steps_per_epoch)
        skip = step % steps_per_epoch
        batches = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        started = time.perf_counter()
        for batch in batches:
            loss = training_loss(model, batch, args.counterfactual_weight, args.counterfactual_loss)
            accelerator.backward(loss)
            if args.max_grad_norm is not None:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            steps_run += 1
            losses.append(loss.item())
            progress.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)  # shown at tqdm's own pace
            progress.update(1)
            accelerator.log({"train/loss": losses[-1], "train/lr": scheduler.get_last_lr()[0]}, step=step)
            evaluate_now = bool(args.eval_steps) and step % args.eval_steps == 0 and step < args.max_steps
            checkpoint_now = bool(args.checkpoint_steps) and step % args.checkpoint_steps == 0
            if evaluate_now or checkpoint_now:
                loop_seconds += time.perf_counter() - started
                if evaluate_now:  # the final evaluation comes after the loop
                    for name, report in evaluate_all().items():
                        accelerator.print(f"step {step} {name}: mIoU {100 * (report['mean_iou'] or 0):.2f}")
                if checkpoint_now:
                    save_checkpoint(accelerator, output_dir, step, args.keep_checkpoints, scheduler)
                started = time.perf_counter()
            if step >= args.max_steps:
                break
        loop_seconds += time.perf_counter() - started
    progress.close()

    eval_results = evaluate_all()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        before = set(os.listdir(output_dir)) if output_dir.is_dir() else set()
        save_model(accelerator.unwrap_model(model), processor, label_space, output_dir)
        (output_dir / "eval_results.json").write_text(json.dumps(eval_results, indent=2) + "\n")
        write_model_card(output_dir, args, label_space, train_sources, real, eval_results, pretrained, accelerator.num_processes)
        record_written(output_dir, set(os.listdir(output_dir)) - before)
        for name, report in eval_results.items():
            print(f"\n{name}, {report['split']} split (step {step})\n{format_report(report, args.unseen_classes or ())}")
    accelerator.end_training()
    steps_per_second = steps_run / loop_seconds if loop_seconds else 0.0
    return TrainingResult(accelerator.unwrap_model(model), output_dir, step, losses, eval_results, steps_per_second)


def unseen_class_ids(names: Sequence[str], label_space: Mapping[int, str]) -> list[int]:
    """Ids of the unseen class ``names`` in ``label_space``; ValueError naming those it lacks."""
    ids = {label: label_id for label_id, label in label_space.items()}
    missing = [name for name in names if name not in ids]
    if missing:
        raise ValueError(f"unseen classes {missing} are not in the label space {list(ids)}: check their spelling")
    return [ids[name] for name in names]


def build_model(label_space: Mapping[int, str], pretrained: str | None, pretrained_config=None, config: str | None = None):
    """An ``AutoModelForSemanticSegmentation`` for ``label_space``: ``pretrained`` weights (head
    re-initialised when its size differs) or, with ``config``, from scratch. Safetensors only."""
    from transformers import AutoModelForSemanticSegmentation

    labels = {
        "num_labels": len(label_space),
        "id2label": dict(label_space),
        "label2id": {name: label_id for label_id, name in label_space.items()},
        "semantic_loss_ignore_index": IGNORE_INDEX,
    }
    if config is not None:
        return AutoModelForSemanticSegmentation.from_config(model_config(config, labels))
    for key, value in labels.items():
        setattr(pretrained_config, key, value)
    return AutoModelForSemanticSegmentation.from_pretrained(
        pretrained, config=pretrained_config, ignore_mismatched_sizes=True, use_safetensors=True
    )


def model_config(config: str, overrides: Mapping[str, Any]):
    """A transformers config from a :data:`MODEL_PRESETS` name, a config.json, or a folder / Hub id."""
    from transformers import AutoConfig

    path = Path(config).expanduser()
    if config in MODEL_PRESETS or path.is_file():
        values = dict(MODEL_PRESETS[config]) if config in MODEL_PRESETS else json.loads(path.read_text())
        if "model_type" not in values:
            raise ValueError(f"config {config!r} has no model_type: cannot tell which architecture to build")
        return AutoConfig.for_model(values.pop("model_type"), **{**values, **overrides})
    if looks_like_local_path(config) and not path.exists():
        raise FileNotFoundError(f"config {config!r} does not exist; presets: {', '.join(MODEL_PRESETS)}")
    return AutoConfig.from_pretrained(config, **overrides)


def build_image_processor(pretrained: str | None, model_type: str, image_size: int):
    """The pretrained model's image processor, else a new one for ``model_type``, resizing to
    ``image_size`` (what training feeds the model); None when transformers has none."""
    from transformers import AutoImageProcessor
    from transformers.models.auto.image_processing_auto import (
        IMAGE_PROCESSOR_MAPPING_NAMES,
        get_image_processor_class_from_name,
    )

    size = {"height": image_size, "width": image_size}
    if pretrained is not None:
        try:
            return AutoImageProcessor.from_pretrained(pretrained, size=size)
        except OSError:  # no preprocessor_config.json: build the default one below
            pass
    names = IMAGE_PROCESSOR_MAPPING_NAMES.get(model_type)
    if isinstance(names, Mapping):  # transformers 5: {backend: class name}; pil needs no torchvision
        names = [names.get("pil"), *names.values()]
    class_name = next((name for name in names or () if name), None)
    return get_image_processor_class_from_name(class_name)(size=size) if class_name else None


def add_lora(model, rank: int, alpha: int, dropout: float, target_modules: Sequence[str]):
    """LoRA adapters on the backbone layers named ``target_modules``; every other top-level
    module (the decode head) is trained fully and saved with the adapter."""
    from peft import LoraConfig, get_peft_model

    children = [name for name, _ in model.named_children()]
    backbone = [name for name in children if name in (model.base_model_prefix, "backbone")]
    if not backbone:
        raise ValueError(f"cannot tell the backbone of {type(model).__name__} (its modules: {children}) for LoRA")
    heads = [name for name in children if name not in backbone]
    pattern = rf"(?:{'|'.join(map(re.escape, backbone))})\.(?:.*\.)?(?:{'|'.join(map(re.escape, target_modules))})"
    try:
        return get_peft_model(
            model,
            LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern, modules_to_save=heads),
        )
    except ValueError as error:
        raise ValueError(
            f"--lora-target-modules {list(target_modules)} match no layer of the backbone {backbone[0]!r} ({error})"
        ) from error


def counterfactual_absence_loss(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Mean over (image, class) pairs of the pixel mean of ``-log(1 - p_class)``.

    ``logits`` (N, C, h, w) of counterfactual images, ``classes`` (N, C) multi-hot: the
    classes of the positive sample, which the counterfactual image no longer shows.
    """
    probabilities = logits.float().softmax(1).clamp(max=1 - 1e-6)
    absence = -torch.log1p(-probabilities).mean((2, 3))
    return (absence * classes).sum() / classes.sum().clamp(min=1)


def counterfactual_embedding_loss(
    positive_features: torch.Tensor,
    negative_features: torch.Tensor,
    labels: torch.Tensor,
    classes: torch.Tensor,
    label_sizes: torch.Tensor | None = None,
) -> torch.Tensor:
    """MagicSeg's contrast: mean over (image, class) pairs of ``max(0, cos(e+, e-))``.

    ``e+`` is the positive image's feature map ``(N, D, h, w)`` averaged over the class's region
    (its pixels in ``labels`` (N, H, W), area-weighted onto the feature grid), ``e-`` the
    counterfactual's features averaged over the *same* region, where it shows the background
    that replaced the object. ``classes`` (N, C) multi-hot names the removed classes;
    ``label_sizes`` (N, 2), when labels were padded, their true sizes. Pairs whose region
    is empty (the class lost to the crop) are skipped; 0 when none is left.
    """
    height, width = positive_features.shape[-2:]
    pairs = classes.nonzero().tolist()
    positives, negatives = [], []
    for image, class_id in pairs:
        label = labels[image]
        if label_sizes is not None:
            label = label[: int(label_sizes[image, 0]), : int(label_sizes[image, 1])]
        region = (label == class_id).float()[None, None]
        weights = torch.nn.functional.interpolate(region, size=(height, width), mode="area")[0, 0]
        if weights.sum() <= 0:
            continue
        weights = weights / weights.sum()
        positives.append((positive_features[image].float() * weights).sum((1, 2)))
        negatives.append((negative_features[image].float() * weights).sum((1, 2)))
    if not positives:
        return positive_features.sum() * 0.0  # keeps the graph (DDP wants every parameter used)
    similarity = torch.nn.functional.cosine_similarity(torch.stack(positives), torch.stack(negatives), dim=-1)
    return similarity.clamp(min=0).mean()


def feature_map(outputs) -> torch.Tensor:
    """The deepest encoder feature map ``(N, D, h, w)`` of a segmentation model's outputs
    (called with ``output_hidden_states=True``): what MagicSeg's embedding contrast pools."""
    hidden = getattr(outputs, "hidden_states", None)
    if not hidden or hidden[-1].dim() != 4:
        raise ValueError(
            "--counterfactual-loss embedding needs a model whose hidden_states are (N, D, h, w) feature maps "
            "(SegFormer's are); use --counterfactual-loss absence with this model"
        )
    return hidden[-1]


def training_loss(
    model, batch: Mapping[str, torch.Tensor], counterfactual_weight: float, counterfactual_loss: str = "embedding"
) -> torch.Tensor:
    """The model's own loss, plus the weighted counterfactual term when the batch has negatives."""
    pixel_values, labels = batch["pixel_values"], batch["labels"]
    negatives = batch.get("negative_pixel_values")
    if negatives is None or counterfactual_weight == 0:
        return model(pixel_values=pixel_values, labels=labels).loss
    # One forward pass for both (DDP expects one per step). Counterfactual labels are all
    # ignored, so the model's loss is exactly that of the positive images.
    ignored = torch.full((len(negatives), *labels.shape[1:]), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
    embedding = counterfactual_loss == "embedding"
    outputs = model(
        pixel_values=torch.cat([pixel_values, negatives]),
        labels=torch.cat([labels, ignored]),
        output_hidden_states=embedding,
    )
    classes = batch["negative_classes"]
    if embedding:
        features = feature_map(outputs)
        index = batch.get("negative_index", torch.arange(len(negatives), device=features.device))
        sizes = batch.get("label_sizes")
        counterfactual = counterfactual_embedding_loss(
            features[index], features[len(pixel_values) :], labels[index], classes, None if sizes is None else sizes[index]
        )
    else:
        counterfactual = counterfactual_absence_loss(outputs.logits[len(pixel_values) :], classes)
    return outputs.loss + counterfactual_weight * counterfactual


def checkpoint_folders(output_dir: Path) -> list[Path]:
    """Checkpoints under ``output_dir``, oldest first."""
    folders = (output_dir / CHECKPOINTS).glob("step-*/trainer_state.json")
    return sorted((state.parent for state in folders), key=lambda folder: int(folder.name.split("-")[1]))


def find_checkpoint(output_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from: None, ``"latest"`` (None when there is none yet) or a folder."""
    if resume is None:
        return None
    if resume == "latest":
        folders = checkpoint_folders(output_dir)
        return folders[-1] if folders else None
    folder = Path(resume).expanduser()
    if not (folder / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{resume!r} is not a diffuseg checkpoint folder (no trainer_state.json)")
    return folder


def save_checkpoint(accelerator, output_dir: Path, step: int, keep: int | None, scheduler) -> Path:
    """Model, optimizer, scheduler and RNG states at ``step``; the oldest beyond ``keep`` are deleted.

    The model is safetensors, the optimizer and RNG states plain tensors (read back with
    ``weights_only=True``), the step and the scheduler's state JSON: nothing in a checkpoint
    runs code when it is loaded.
    """
    folder = output_dir / CHECKPOINTS / f"step-{step:08d}"
    accelerator.save_state(str(folder))
    if accelerator.is_main_process:
        # Written last: a folder without it is an interrupted save and is never resumed from.
        state = {"step": step, "scheduler": scheduler.state_dict()}
        (folder / "trainer_state.json").write_text(json.dumps(state) + "\n")
        for old in checkpoint_folders(output_dir)[:-keep] if keep else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return folder


def load_checkpoint(accelerator, folder: Path, scheduler) -> int:
    """Restore the states :func:`save_checkpoint` wrote; return the step.

    Raises:
        ValueError: the checkpoint holds a file that is not plain tensor data (a pickle
            that would run code is refused by ``weights_only=True``, never executed), or was
            written by a diffuseg that kept the scheduler as a pickle.
    """
    import pickle

    state = json.loads((folder / "trainer_state.json").read_text())
    if "scheduler" not in state:
        raise ValueError(f"checkpoint {folder} has no scheduler state in trainer_state.json (an older diffuseg kept it "
                         "as a pickle, which is not loaded): start a new run in a new --output-dir")
    planted = sorted(p.name for p in folder.glob("custom_checkpoint_*.pkl"))
    if planted:
        raise ValueError(f"checkpoint {folder} holds {', '.join(planted)}: pickles, which diffuseg never loads (they can "
                         "run code); resume from a checkpoint diffuseg wrote, or delete them if you trust the rest")
    try:
        accelerator.load_state(str(folder))
    except pickle.UnpicklingError as error:
        raise ValueError(f"checkpoint {folder} holds a file that is not plain tensor data, refused unread "
                         f"({str(error).splitlines()[0]}); resume from a checkpoint you trust") from None
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"])


def save_model(model, processor, label_space: Mapping[int, str], output_dir: Path) -> None:
    """``save_pretrained`` (safetensors) of the model or LoRA adapter, image processor and id2label.json."""
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    if processor is not None:
        processor.save_pretrained(output_dir)
    (output_dir / "id2label.json").write_text(json.dumps({str(k): v for k, v in label_space.items()}, indent=2) + "\n")


def _tracker_config(args: TrainingArguments) -> dict[str, Any]:
    # Trackers (tensorboard hparams) take scalars only.
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value) for key, value in asdict(args).items()}


def write_model_card(
    output_dir: Path,
    args: TrainingArguments,
    label_space: Mapping[int, str],
    train_sources: Sequence[SegmentationSource],
    real: Sequence[bool],
    eval_results: Mapping[str, Mapping[str, Any]],
    pretrained: str | None,
    num_processes: int = 1,
) -> None:
    """README.md: YAML metadata, training data (with weights), labels, metrics, how to load."""
    from huggingface_hub import ModelCardData

    hub_ids = [name for name in [*args.train, *args.eval] if not Path(name).expanduser().exists()]
    data = ModelCardData(
        library_name="peft" if args.lora else "transformers",
        pipeline_tag="image-segmentation",
        tags=["diffuseg", "semantic-segmentation", "synthetic-data"],
        datasets=hub_ids or None,
        metrics=["mean_iou"],
        base_model=pretrained if pretrained and not Path(pretrained).expanduser().exists() else None,
    )
    weights = args.train_weights or [len(source.dataset) for source in train_sources]
    total = sum(weights)
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        "# Semantic segmentation model trained with diffuseg",
        "",
        f"{'LoRA adapter on ' if args.lora else ''}{pretrained or f'{args.config} (from scratch)'}, "
        f"{args.max_steps} steps, batch {args.batch_size} per process on {num_processes} process(es), {args.image_size} px, "
        f"learning rate {args.learning_rate} ({args.lr_scheduler}), seed {args.seed}.",
        "",
        "## Training data",
        "",
        "| dataset | split | images | kind | share of samples |",
        "|---|---|---|---|---|",
    ]
    for source, is_real, weight in zip(train_sources, real, weights):
        kind = "real" if is_real else "synthetic"
        kind += ", with counterfactuals" if source.has_negatives and args.counterfactual_weight > 0 else ""
        lines.append(f"| {source.name} | {source.split} | {len(source.dataset)} | {kind} | {weight / total:.1%} |")
    if args.unseen_classes:
        lines += ["", f"Zero-shot protocol: unseen classes {', '.join(args.unseen_classes)} were ignored in the real training data."]
    if any(source.has_negatives for source in train_sources) and args.counterfactual_weight > 0:
        lines += ["", f"Counterfactual loss: {args.counterfactual_loss}, weight {args.counterfactual_weight}."]
    lines += ["", "## Labels", "", ", ".join(f"{label_id}: {name}" for label_id, name in label_space.items()), ""]
    if eval_results:
        lines += ["## Evaluation", ""]
        for name, report in eval_results.items():
            lines += [f"### {name} ({report['split']} split)", "", "```", format_report(report, args.unseen_classes or ()), "```", ""]
    loader = (
        "from diffuseg.evaluation import load_segmentation_model\nmodel = load_segmentation_model(\"PATH\")"
        if args.lora
        else "from transformers import AutoModelForSemanticSegmentation\nmodel = AutoModelForSemanticSegmentation.from_pretrained(\"PATH\")"
    )
    lines += ["## Use", "", "```python", loader, "```", ""]
    (output_dir / "README.md").write_text("\n".join(lines))
