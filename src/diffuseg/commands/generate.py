"""``diffuseg generate``: a synthetic segmentation dataset, written as it goes, resumable, distributable.

Runs the same under ``accelerate launch -m diffuseg generate ...``: each process takes its
share of the shards, the main process writes the card and ``id2label.json``.
"""

from __future__ import annotations

import argparse
import os
import sys

from diffuseg.commands import comma_separated_ints

HELP = "generate a synthetic segmentation dataset (resumable, distributed)"
"""The command's line in ``diffuseg --help``."""


DESCRIPTION = """\
Generate a synthetic semantic-segmentation dataset with a text-to-image pipeline and write it
in the Hugging Face Hub layout (data/train-*.parquet, id2label.json, README.md card), ready for
`datasets.load_dataset(FOLDER)` and `diffuseg push`.

Resumable: interrupt it at any moment (even kill -9) and rerun the same command to continue; the
result equals an uninterrupted run. A folder that holds a different dataset is refused, and so
is a folder another run is writing at the moment (an OS lock, gone when that run ends).
Distributed: `accelerate launch -m diffuseg generate ...` splits the shards between processes."""

EPILOG = """\
class syntax: a preset (voc20, coco80, shapes), a comma list such as "dog,cat=cat|kitten,sofa"
(name=synonym|synonym lists the words that may name the class in prompts), or a file with the same
entries one per line (# comments), or a .json file {"dog": {"synonyms": [...], "contexts": [...]}}.

templates: one per line; {class} (required) is the class word, {context} a context phrase of the
class, {a} the article "a"/"an" of the next word, e.g. "a photo of {a} {class} {context}".

examples:
  diffuseg generate --out shapes-synth --images-per-class 100
  diffuseg generate --classes voc20 --model CompVis/stable-diffusion-v1-4 --images-per-class 500 \\
      --height 512 --width 512 --threshold adaptive --out voc-synth
  accelerate launch -m diffuseg generate --classes voc20 ... --out voc-synth"""


def _threshold(value: str) -> str | float:
    try:
        return float(value)
    except ValueError:
        if value not in ("otsu", "adaptive"):
            raise argparse.ArgumentTypeError(f"expected otsu, adaptive or a number, got {value!r}") from None
        return value


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "generate",
        help=HELP,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = parser.add_argument_group("what to generate")
    what.add_argument("--out", "-o", required=True, metavar="FOLDER", help="dataset folder (created; rerun to resume)")
    what.add_argument("--classes", default="shapes", metavar="SPEC",
                      help="preset (voc20, coco80, shapes), comma list or file; see below (default: shapes)")
    what.add_argument("--images-per-class", type=int, default=10, metavar="N",
                      help="prompts generated per class; filters may remove some (default: 10)")
    what.add_argument("--pipeline", default="diffumask", metavar="NAME",
                      help="generation pipeline: diffumask, freemask or counterfactual (default: diffumask)")
    what.add_argument("--model", default="shapesworld", metavar="MODEL",
                      help="'shapesworld' (the embedded model), a local pipeline folder or a Hub id (default: shapesworld)")
    what.add_argument("--seed", type=int, default=0, help="run seed; sample i uses a seed derived from (seed, i) (default: 0)")

    prompts = parser.add_argument_group("prompts")
    prompts.add_argument("--templates", metavar="FILE", help="prompt templates, one per line (default: built-in)")
    prompts.add_argument("--prompt-model", metavar="FOLDER",
                         help="local causal language model (transformers) writing MagicSeg-style descriptions")
    prompts.add_argument("--prompt-max-new-tokens", type=int, default=24, metavar="N",
                         help="length limit of a description (default: 24)")
    prompts.add_argument("--counterfactual-replacement", metavar="TEXT",
                         help="--pipeline counterfactual: what the counterfactual prompt says in place of the objects "
                         "(default: the model's diffuseg.json: 'background' for shapesworld, whose empty scenes are "
                         "captioned so, with the colour before a shape removed too; 'nothing', as in MagicSeg, without one)")
    prompts.add_argument("--two-class-fraction", type=float, default=0.0, metavar="F",
                         help="share of prompts that also name a second, random class (default: 0)")

    gen = parser.add_argument_group("image and mask generation")
    gen.add_argument("--height", type=int, help="image height, a multiple of 8 (default: the model's)")
    gen.add_argument("--width", type=int, help="image width, a multiple of 8 (default: the model's)")
    gen.add_argument("--steps", type=int,
                     help="denoising steps (default: the model's diffuseg.json: 25 for shapesworld; 50 without one)")
    gen.add_argument("--guidance-scale", type=float,
                     help="classifier-free guidance (default: the model's diffuseg.json: 4.0 for shapesworld; 7.5 without one)")
    gen.add_argument("--negative-prompt", help="negative prompt for every image")
    gen.add_argument("--resolutions", type=comma_separated_ints, metavar="H,H,...",
                     help="heights of the cross-attention maps to average, e.g. 16,32,64 for SD at 512 (default: all)")
    gen.add_argument("--threshold", type=_threshold, default="otsu", metavar="METHOD",
                     help="mask threshold: otsu, adaptive (DiffuMask) or a number in [0, 1] (default: otsu)")
    gen.add_argument("--ignore-band", type=float, default=0.0, metavar="F",
                     help="pixels within F of the threshold are labelled 255 (ignore) (default: 0)")
    gen.add_argument("--refine", action="store_true", help="refine attention maps along self-attention (training-free)")
    gen.add_argument("--min-component-area", type=int, default=0, metavar="PX",
                     help="class components smaller than PX pixels become background (default: 0)")

    filters = parser.add_argument_group("quality filters (measurements are recorded per sample)")
    filters.add_argument("--min-mask-area", type=float, default=0.0, metavar="F",
                         help="reject samples whose smallest named class covers less than F of the image (default: 0)")
    filters.add_argument("--max-ignore-fraction", type=float, default=1.0, metavar="F",
                         help="reject samples with more than F ignore pixels (default: 1)")
    filters.add_argument("--agreement-model", metavar="MODEL",
                         help="transformers segmentation model (folder or Hub id) whose predictions the masks are compared with")
    filters.add_argument("--agreement-min-iou", type=float, metavar="F",
                         help="reject samples whose IoU with the agreement model is below F (Free-Mask: 0.5)")
    filters.add_argument("--counterfactual-min-agreement", type=float, metavar="F",
                         help="counterfactual pairs: reject those whose attention and pair difference agree less "
                              "than F (IoU): the object was not removed")
    filters.add_argument("--agreement-keep", type=float, metavar="F",
                         help="keep the best F of each shard by agreement IoU (DiffuMask's noise learning: 0.3)")

    gen.add_argument("--freemask-mode", choices=("edit", "paste"), default="edit",
                         help="--pipeline freemask: generate the object inside its region (edit) or alone, then "
                              "paste and harmonise it (paste, Free-Mask's own) (default: %(default)s)")

    aug = parser.add_argument_group("augmentation")
    aug.add_argument("--mosaic", type=int, choices=(2, 3), help="add 2x2 or 3x3 mosaics of kept samples (images and masks)")
    aug.add_argument("--mosaic-fraction", type=float, default=0.25, metavar="F",
                     help="mosaics per generated sample (default: 0.25)")

    run_group = parser.add_argument_group("running")
    run_group.add_argument("--batch-size", type=int, default=1, help="prompts per pipeline call (default: 1); part of the dataset's settings: batched float math differs in the last bits, so a resume must keep it")
    run_group.add_argument("--samples-per-shard", type=int, default=256, metavar="N",
                           help="generated samples per Parquet shard, also the unit of resumption (default: 256)")
    run_group.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
                           help="model dtype; auto: float16 on CUDA, float32 otherwise (default: auto)")
    run_group.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)
    return parser


def config_from_args(args: argparse.Namespace):
    """The :class:`~diffuseg.generation.GenerationConfig` of parsed ``generate`` arguments."""
    from diffuseg.generation import GenerationConfig, parse_classes, read_templates

    return GenerationConfig(
        out=args.out,
        classes=parse_classes(args.classes),
        images_per_class=args.images_per_class,
        pipeline=args.pipeline,
        model=args.model,
        seed=args.seed,
        templates=read_templates(args.templates) if args.templates else None,
        prompt_model=args.prompt_model,
        prompt_max_new_tokens=args.prompt_max_new_tokens,
        counterfactual_replacement=args.counterfactual_replacement,
        two_class_fraction=args.two_class_fraction,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        negative_prompt=args.negative_prompt,
        resolutions=args.resolutions,
        threshold=args.threshold,
        ignore_band=args.ignore_band,
        refine=args.refine,
        min_component_area=args.min_component_area,
        min_mask_area=args.min_mask_area,
        max_ignore_fraction=args.max_ignore_fraction,
        agreement_model=args.agreement_model,
        agreement_min_iou=args.agreement_min_iou,
        agreement_keep=args.agreement_keep,
        counterfactual_min_agreement=args.counterfactual_min_agreement,
        freemask_mode=args.freemask_mode,
        mosaic=args.mosaic,
        mosaic_fraction=args.mosaic_fraction,
        batch_size=args.batch_size,
        samples_per_shard=args.samples_per_shard,
        dtype=args.dtype,
    )


def run(args: argparse.Namespace) -> int:
    from diffuseg.data import stored_fingerprint
    from diffuseg.generation import distributed_state, generate_dataset

    config = config_from_args(args)
    stored = stored_fingerprint(config.out) or {}
    if args.threads is None and not os.environ.get("OMP_NUM_THREADS") and stored.get("threads", config.threads) != config.threads:
        # A resume keeps the thread count the dataset was started with (float math differs in the last bits).
        config.threads = stored["threads"]
        print(f"diffuseg: resuming with {config.threads} CPU thread(s), as this dataset was started "
              "(pass --threads N to choose, if it is the same N)", file=sys.stderr)
    summary = generate_dataset(config, progress=not args.no_progress)
    if distributed_state().is_main_process:
        rejected = ", ".join(f"{n} {r}" for r, n in sorted(summary.rejected.items())) or "none"
        print(
            f"{summary.folder}: {summary.total_rows} rows; this process generated {summary.generated} "
            f"(kept {summary.kept}, rejected: {rejected}, mosaics {summary.mosaics}); "
            f"{summary.skipped_blocks} shard(s) were already done"
        )
    return 0
