"""The loop behind ``diffuseg generate``: stream samples into a :class:`~diffuseg.data.DatasetWriter`,
resume after any interruption, and split the work between ``accelerate`` processes."""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from diffuseg.data import IGNORE_INDEX, DatasetWriter, encode_png, split_files
from diffuseg.generation.card import MOSAIC_SKIPPED, collect_stats, describe
from diffuseg.generation.config import GenerationConfig
from diffuseg.generation.filters import SegmentationAgreement, agreement_iou, mask_stats
from diffuseg.generation.mosaic import mosaic
from diffuseg.generation.plan import WorkPlan, sample_seed
from diffuseg.generation.prompts import DescriptionPrompter, TemplatePrompter
from diffuseg.generation.registry import PipelineSpec, get_pipeline


@dataclass
class GenerationSummary:
    """What :func:`generate_dataset` did (in this process) and what the folder holds."""

    folder: str
    generated: int = 0
    kept: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    mosaics: int = 0
    total_rows: int = 0
    skipped_blocks: int = 0


def distributed_state():
    """accelerate's ``PartialState``, on CPU when there is no GPU (or ``ACCELERATE_USE_CPU`` is set).

    Without ``cpu=True`` accelerate treats CPU processes started by ``accelerate launch`` /
    ``torchrun`` as independent single processes; with it they form a gloo group.
    """
    import torch
    from accelerate import PartialState

    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
    return PartialState(cpu=use_cpu)


def _resolve_dtype(name: str, device):
    import torch

    if name == "auto":
        return torch.float16 if getattr(device, "type", str(device)) == "cuda" else torch.float32
    return getattr(torch, name)


def generate_dataset(config: GenerationConfig, pipe=None, progress: bool = True) -> GenerationSummary:
    """Generate (or resume) the dataset ``config`` describes, in this process's share of the work.

    Under ``accelerate launch`` each process takes every N-th unfinished shard block, writes
    its own shards, and the main process publishes the folder (``data/``, ``id2label.json``,
    the card) once all are done.

    Args:
        config: the settings.
        pipe: an already loaded pipeline for ``config.pipeline`` (default: load ``config.model``).
        progress: show a progress bar (main process only).

    Raises:
        DatasetMismatchError: ``config.out`` holds a different dataset.
    """
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    import torch

    config.validate()
    torch.set_num_threads(config.threads)  # the count the fingerprint records
    spec = get_pipeline(config.pipeline)
    plan = WorkPlan(config)
    state = distributed_state()
    with state.main_process_first():
        writer = DatasetWriter(
            config.out,
            config.classes.names,
            split="train",
            fingerprint=config.fingerprint(),
            samples_per_shard=plan.S + plan.M,
            extra_image_columns=spec.extra_image_columns,
            lock=state.is_main_process,  # one run per folder; its other processes write their own blocks
        )
    state.wait_for_everyone()  # every process has read the same finished blocks before anyone writes
    try:
        done = writer.completed_indices
        # Only blocks with a finished slot can be done: the plan is never walked block by block up front.
        finished = {b for b in {slot // (plan.S + plan.M) for slot in done} if plan.block_slots(b) <= done}
        todo = [b for b in range(plan.num_blocks) if b not in finished]
        mine = todo[state.process_index :: state.num_processes]
        summary = GenerationSummary(folder=str(config.out), skipped_blocks=len(finished))

        if mine:
            dtype = _resolve_dtype(config.dtype, state.device)
            if pipe is None:
                pipe = spec.load(config, state.device, dtype)
            tokenizer = getattr(pipe, "tokenizer", None)
            if config.prompt_model:
                prompter = DescriptionPrompter(
                    config.prompt_model, config.classes, config.templates, config.prompt_max_new_tokens, state.device
                )
            else:
                prompter = TemplatePrompter(config.classes, config.templates)
            agreement = (
                SegmentationAgreement(config.agreement_model, config.classes.names, state.device)
                if config.agreement_model
                else None
            )
            total = sum(len(plan.block_indices(b)) for b in mine)
            with tqdm(total=total, unit="img", desc="generate", disable=not (progress and state.is_main_process)) as bar:
                for block in mine:
                    rows = _make_block(block, plan, spec, pipe, prompter, tokenizer, agreement, summary, bar)
                    for slot, row, record in rows:
                        if slot in done:
                            continue
                        if row is None:
                            writer.skip(slot, record)
                        else:
                            writer.add(row, index=slot)
        writer.close(finalize=False)
        state.wait_for_everyone()
        if state.is_main_process:
            # One publication, description included: the card readers follow appears complete or not at all.
            writer.finalize(describe(config, collect_stats(writer)))
            summary.total_rows = sum(pq.read_metadata(p).num_rows for p in split_files(config.out).get("train", []))
    finally:
        writer.unlock()  # also on errors: the folder is free again in this process
    state.wait_for_everyone()
    if state.is_main_process and summary.total_rows == 0:
        raise ValueError(
            f"the filters rejected every sample ({config.num_samples} generated); loosen --min-mask-area, "
            "--max-ignore-fraction or the agreement filter"
        )
    return summary


def _make_block(block, plan: WorkPlan, spec: PipelineSpec, pipe, prompter, tokenizer, agreement, summary, bar):
    """All rows of one block: (writer slot, encoded row or None, skip record)."""
    config = plan.config
    requests = [plan.request(index, prompter, tokenizer) for index in plan.block_indices(block)]

    results = []  # (request, sample dict with arrays, stats)
    for start in range(0, len(requests), config.batch_size):
        batch = requests[start : start + config.batch_size]
        samples = spec.generate(pipe, batch, config)
        predictions = agreement.predict([np.asarray(s["image"]) for s in samples]) if agreement else None
        for k, (request, sample) in enumerate(zip(batch, samples)):
            label = np.asarray(sample["label"], dtype=np.uint8)
            stats = mask_stats(label, request.class_ids)
            if predictions is not None:
                stats["agreement_iou"] = agreement_iou(label, predictions[k], request.class_ids)
            stats.update({name: sample[name] for name in spec.scalar_columns})
            results.append((request, sample, stats))
        bar.update(len(batch))
    summary.generated += len(results)

    # Filters, in order; the first that fails is the recorded reason.
    rejected: dict[int, str] = {}
    for request, sample, stats in results:
        if stats["mask_area"] < config.min_mask_area:
            rejected[request.index] = "min_mask_area"
        elif stats["ignore_fraction"] > config.max_ignore_fraction:
            rejected[request.index] = "max_ignore_fraction"
        elif config.agreement_min_iou is not None and stats["agreement_iou"] < config.agreement_min_iou:
            rejected[request.index] = "agreement_min_iou"
        elif (config.counterfactual_min_agreement is not None
              and sample.get("counterfactual_agreement", 1.0) < config.counterfactual_min_agreement):
            rejected[request.index] = "counterfactual_min_agreement"
    if config.agreement_keep is not None:
        # DiffuMask's noise learning: keep the best-agreeing fraction (ranked within the block).
        passing = [(-stats["agreement_iou"], r.index) for r, _, stats in results if r.index not in rejected]
        keep = math.ceil(config.agreement_keep * len(passing) - 1e-9)
        for _, index in sorted(passing)[keep:]:
            rejected[index] = "agreement_keep"

    rows, kept = [], []
    for request, sample, stats in results:
        slot = plan.slot(request.index)
        if request.index in rejected:
            reason = rejected[request.index]
            summary.rejected[reason] = summary.rejected.get(reason, 0) + 1
            rows.append((slot, None, {"reason": reason, "seed": request.seed, **stats}))
            continue
        row = _encode_row(sample, request.prompt, request.seed, config, spec, stats)
        rows.append((slot, row, None))
        kept.append((request, row, stats))
    summary.kept += len(kept)

    for j in range(plan.mosaic_count(block)):
        slot = plan.mosaic_slot(block, j)
        grid = config.mosaic
        if len(kept) < grid * grid:
            rows.append((slot, None, {"reason": MOSAIC_SKIPPED}))
            continue
        # A mosaic's own seed picks its tiles; the tiles' seeds are recorded to regenerate them.
        seed = sample_seed(config.seed, slot, stream=1)
        rng = np.random.default_rng(seed)
        tiles = [kept[t] for t in rng.choice(len(kept), size=grid * grid, replace=False)]
        image, label = mosaic(
            [Image.open(io.BytesIO(row["image"])) for _, row, _ in tiles],
            [Image.open(io.BytesIO(row["label"])) for _, row, _ in tiles],
            grid,
        )
        class_ids = sorted({c for request, _, _ in tiles for c in request.class_ids})
        stats = mask_stats(label, [c for c in class_ids if (label == c).any()] or class_ids)
        if agreement is not None:
            stats["agreement_iou"] = float(np.mean([s["agreement_iou"] for _, _, s in tiles]))
        for name in spec.scalar_columns:  # the tiles' values together: counts add up, texts are joined
            values = [s[name] for _, _, s in tiles]
            stats[name] = ",".join(filter(None, values)) if isinstance(values[0], str) else sum(values)
        sample = {"image": image, "label": label}
        for name in spec.extra_image_columns:  # extra images are tiled like the images
            sample[name] = mosaic([Image.open(io.BytesIO(row[name])) for _, row, _ in tiles],
                                  [Image.open(io.BytesIO(row["label"])) for _, row, _ in tiles], grid)[0]
        prompt = " | ".join(row["prompt"] for _, row, _ in tiles)
        tile_seeds = ",".join(str(request.seed) for request, _, _ in tiles)
        rows.append((slot, _encode_row(sample, prompt, seed, config, spec, stats, grid, tile_seeds), None))
        summary.mosaics += 1
    return rows


def _encode_row(sample, prompt, seed, config, spec, stats, grid=0, tiles="") -> dict:
    label = np.asarray(sample["label"], dtype=np.uint8)
    row = {
        "image": encode_png(sample["image"], "RGB"),
        "label": encode_png(label, "L"),
        "classes": sorted(int(c) for c in np.unique(label) if c not in (0, IGNORE_INDEX)),
        "prompt": prompt,
        "seed": seed,
        "pipeline": spec.name,
        "model": config.model,
    }
    for name in spec.extra_image_columns:
        row[name] = encode_png(sample[name], "RGB")
    row.update(stats)
    if config.mosaic:
        row["mosaic"] = grid
        row["mosaic_tiles"] = tiles
    return row
