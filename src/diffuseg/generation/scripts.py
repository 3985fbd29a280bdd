"""The command line of the ready dataset scripts (``dataset_scripts/*.py``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from diffuseg.generation.classes import parse_classes
from diffuseg.generation.config import GenerationConfig
from diffuseg.generation.runner import distributed_state, generate_dataset


def run_dataset_script(settings: Mapping[str, Any], description: str, argv: Sequence[str] | None = None) -> int:
    """Command line of a ready dataset script: fixed ``settings``, a few run-time options.

    ``settings`` are :class:`GenerationConfig` fields (``classes`` as a preset/spec string)
    written down in the script; the command line may change where the data goes, how much
    of it, the model location, the seed, and how the work runs; ``--push`` uploads the result.
    Works under ``accelerate launch``.
    """
    import argparse

    settings = dict(settings)
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=settings.pop("out"), help="dataset folder (default: %(default)s)")
    parser.add_argument("--images-per-class", type=int, default=settings.pop("images_per_class"),
                        help="prompts per class (default: %(default)s)")
    parser.add_argument("--model", default=settings.pop("model"), help="model id or folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=settings.pop("seed", 0), help="run seed (default: %(default)s)")
    parser.add_argument("--agreement-model", help="segmentation model for the agreement filter (optional)")
    parser.add_argument("--batch-size", type=int, default=settings.pop("batch_size", 8),
                        help="prompts per pipeline call (default: %(default)s)")
    parser.add_argument("--samples-per-shard", type=int, default=settings.pop("samples_per_shard", 256),
                        help="generated samples per shard (default: %(default)s)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16 (default: auto)")
    parser.add_argument("--push", metavar="REPO", help="upload the finished dataset to this Hub dataset repo")
    parser.add_argument("--private", action="store_true", help="with --push: create the repo as private")
    args = parser.parse_args(argv)
    agreement_keep = settings.pop("agreement_keep", None)
    config = GenerationConfig(
        out=args.out,
        classes=parse_classes(settings.pop("classes")),
        images_per_class=args.images_per_class,
        model=args.model,
        seed=args.seed,
        agreement_model=args.agreement_model,
        agreement_keep=agreement_keep if args.agreement_model else None,
        batch_size=args.batch_size,
        samples_per_shard=args.samples_per_shard,
        dtype=args.dtype,
        **settings,
    )
    summary = generate_dataset(config)
    if distributed_state().is_main_process:
        print(f"{summary.folder}: {summary.total_rows} rows")
        if args.push:
            from diffuseg.commands.push import plan_upload, push_dataset

            print(f"uploaded: {push_dataset(plan_upload(args.out, args.push, args.private))}")
    return 0
