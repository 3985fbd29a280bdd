"""``diffuseg segment``: training-free segmentation of real images (MaskDiffusion).

For each image it writes a label PNG (mode L) in the ids of diffuseg's datasets: 0 background,
k the k-th class of ``--classes`` counting from 1 (255 ignore, never written here), a colour
overlay with a legend, and ``labels.json`` naming every id. (The pipeline's own arrays count
classes from 0 and put background last; only these files are shifted.)
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from diffuseg.commands import comma_separated_ints
from diffuseg.outputs import check_writable, record_written

LABELS_FILE = "labels.json"
MAX_SIDE_WINDOWS = 8
"""Default --max-side in window sides: a 6000-px photo is not cut into thousands of windows."""

HELP = "segment images into named classes, training-free (MaskDiffusion)"
"""The command's line in ``diffuseg --help``."""


DESCRIPTION = """\
Segment images into the named classes with a frozen text-to-image diffusion model, without any
training (MaskDiffusion): one UNet pass per image with the class names as the prompt; each pixel
goes to the class whose attention-weighted prototype feature it is most similar to.

Writes, per image, OUT/<name>.png (labels as in diffuseg's datasets: 0 background, k the k-th
class of --classes counting from 1; background appears with --background or
--background-threshold) and OUT/<name>_overlay.png (colours and a legend), and
OUT/labels.json mapping ids to names; it refuses to replace a file of those names that it did not
write itself (a manifest, OUT/.diffuseg-files.json, lists its own). Without --classes, --clusters
segments into k-means clusters instead (unsupervised; cluster k gets id k, from 1)."""

EPILOG = """\
examples:
  diffuseg segment photo.jpg --classes cat,dog,sofa --out seg
  diffuseg segment scans/*.png --classes "circle,square,triangle" --background background --out seg
  diffuseg segment photo.jpg --clusters auto --out clusters
  diffuseg segment big.jpg --classes road,car,tree --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --max-side 1024 --device cuda --out seg"""


def _clusters(value: str) -> int | None:
    if value == "auto":
        return None
    try:
        k = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {value!r}") from None
    if k < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {value!r}")
    return k


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "segment",
        help=HELP,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format and mode PIL reads)")
    parser.add_argument("--classes", metavar="A,B,C",
                        help="comma-separated class names, e.g. cat,dog,sofa (required unless --clusters is given)")
    parser.add_argument("--out", "-o", required=True, metavar="DIR", help="output folder (created if needed)")
    parser.add_argument("--model", default="shapesworld", metavar="MODEL",
                        help="'shapesworld' (the embedded model), a local pipeline folder or a Hub id (default: shapesworld)")
    parser.add_argument("--background", metavar="WORD",
                        help="a background word added to the prompt as one more class, e.g. 'background'")
    parser.add_argument("--prompt", metavar="TEXT",
                        help="a caption naming every class (and the --background word) as a whole word, e.g. "
                        "'a photo of a cat and a dog on a sofa' (default: the class names joined by ' and ')")
    parser.add_argument("--background-threshold", type=float, metavar="S",
                        help="pixels whose best class score (cosine similarity, -1..1) is below S become background")
    parser.add_argument("--clusters", type=_clusters, metavar="K|auto", default=False,
                        help="unsupervised mode (no --classes): k-means into K clusters, or 'auto' to choose K")
    parser.add_argument("--timesteps", type=comma_separated_ints, default=None, metavar="T[,T...]",
                        help="noise level(s) of the latent, 0..999; several are averaged (default: 50)")
    parser.add_argument("--noise-draws", type=int, default=1, metavar="N",
                        help="noise draws per timestep, averaged (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise (and k-means) (default: 0)")
    parser.add_argument("--window-size", type=int, metavar="PX",
                        help="sliding-window side for large images (default: the model's native size)")
    parser.add_argument("--window-overlap", type=float, default=0.25, metavar="F",
                        help="overlap of neighbouring windows, 0..1 (default: 0.25)")
    parser.add_argument("--max-side", type=int, metavar="PX",
                        help="downscale images whose longer side exceeds PX before segmenting (outputs keep the input "
                        f"size); 0: never (default: {MAX_SIDE_WINDOWS} window sides, at most ~100 windows per image)")
    parser.add_argument("--batch-size", type=int, default=4, metavar="N",
                        help="images per model call (the prompt is encoded once per call) (default: 4)")
    parser.add_argument("--alpha", type=float, default=0.5, help="opacity of the overlay colours (default: 0.5)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.set_defaults(run=run)
    return parser


def parse_classes(value: str | None) -> list[str] | None:
    """``"a, b,c"`` -> ``["a", "b", "c"]``; ``None`` stays None.

    Raises:
        ValueError: the list is empty.
    """
    if value is None:
        return None
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise ValueError(f"--classes {value!r} names no class: give comma-separated names, e.g. --classes cat,dog")
    return names


def check_images(paths: list[str]) -> list[Path]:
    """The image paths, each checked to exist and to be readable by PIL (header and structure)."""
    import PIL.Image

    checked = []
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {name}")
        try:
            with PIL.Image.open(path) as image:
                image.verify()
        except Exception as error:  # PIL raises many types for unreadable files
            raise ValueError(f"cannot read {name} as an image ({type(error).__name__}: {error})") from None
        checked.append(path)
    return checked


def read_image(path: Path):
    """The decoded PIL image at ``path``; an unreadable file is a ValueError naming it."""
    import PIL.Image

    try:
        with PIL.Image.open(path) as image:
            image.load()  # decoded now: the pixels stay usable after the file is closed
    except Exception as error:  # PIL raises many types for broken files
        raise ValueError(f"cannot read {path} as an image ({type(error).__name__}: {error})") from None
    return image


def output_stems(paths: list[Path]) -> list[str]:
    """A distinct file stem per input: ``photo``, and ``photo-2`` for a second ``photo.*``."""
    seen: dict[str, int] = {}
    stems = []
    for path in paths:
        count = seen.get(path.stem, 0) + 1
        seen[path.stem] = count
        stems.append(path.stem if count == 1 else f"{path.stem}-{count}")
    return stems


def run(args: argparse.Namespace) -> int:
    classes = parse_classes(args.classes)
    unsupervised = classes is None
    if unsupervised and args.clusters is False:
        raise ValueError("give --classes (e.g. --classes cat,dog,sofa), or --clusters K|auto for unsupervised clusters")
    if not unsupervised and args.clusters is not False:
        raise ValueError("--clusters is the unsupervised mode: use either --classes or --clusters, not both")
    if unsupervised and (args.prompt or args.background or args.background_threshold is not None):
        raise ValueError("--prompt, --background and --background-threshold need --classes")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.max_side is not None and args.max_side < 0:
        raise ValueError(f"--max-side must be 0 (no limit) or a number of pixels, got {args.max_side}")

    from diffuseg.pipelines.maskdiffusion import MaskDiffusionSegPipeline
    from diffuseg.tokens import find_word_spans

    if classes is not None:
        words = MaskDiffusionSegPipeline.check_class_names(classes, args.background)
        if len(words) > 255:
            raise ValueError(f"{len(words)} classes do not fit 8-bit label PNGs (at most 255)")
        missing = [word for word in words if args.prompt is not None and not find_word_spans(args.prompt, word)]
        if missing:
            raise ValueError(f"--prompt must name every class (and the --background word); it lacks {', '.join(missing)}")
    paths = check_images(args.images)
    out = Path(args.out)
    stems = output_stems(paths)
    written = [LABELS_FILE, *(name for stem in stems for name in (f"{stem}.png", f"{stem}_overlay.png"))]
    check_writable(out, written, "--out")  # files of the user's in the way: refused before the model loads

    import numpy as np
    import PIL.Image
    import torch
    from tqdm.auto import tqdm

    from diffuseg.families import pipeline_class_for
    from diffuseg.models import load_pipeline
    from diffuseg.pipelines.maskdiffusion import image_to_tensor
    from diffuseg.visualize import overlay

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(pipeline_class_for("maskdiffusion", args.model), args.model, device=device)
    pipe.set_progress_bar_config(desc="windows", unit="window", leave=False)
    max_side = MAX_SIDE_WINDOWS * pipe.check_window(args.window_size) if args.max_side is None else args.max_side
    options = dict(
        window_size=args.window_size,
        window_overlap=args.window_overlap,
        max_side=max_side or None,
        num_noise_draws=args.noise_draws,
        output_type="np",
    )
    if args.timesteps is not None:
        options["timesteps"] = args.timesteps
    if unsupervised:
        options["num_clusters"] = args.clusters
    else:
        options.update(prompt=args.prompt, background_prompt=args.background,
                       background_threshold=args.background_threshold)
    background = None if unsupervised or not (args.background or args.background_threshold is not None) else len(classes)

    record_written(out, written)  # before writing: a kill midway leaves only names the manifest owns
    # File ids are the datasets' (0 background, 1..C classes): the pipeline's id k is k + 1, its background 0.
    names: list[str] = [] if unsupervised else ["background", *classes]
    with tqdm(total=len(paths), desc="segmenting", unit="image") as bar:
        # Several images per call: the prompt is encoded once per call, not once per image.
        for start in range(0, len(paths), args.batch_size):
            images = [read_image(path) for path in paths[start : start + args.batch_size]]
            # Each image gets its own generator with the same seed: results do not depend on batching.
            generators = [torch.Generator().manual_seed(args.seed) for _ in images]
            result = pipe(images, classes, generator=generators, **options)
            for image, labels, scores, stem in zip(images, result.segmentation, result.scores, stems[start:]):
                if unsupervised:
                    clusters = int(np.isfinite(scores[:, 0, 0]).sum())
                    names = ["background", *(f"cluster {k}" for k in range(1, max(len(names) - 1, clusters) + 1))]
                labels = np.where(labels == (-1 if background is None else background), 0, labels + 1).astype(np.uint8)
                PIL.Image.fromarray(labels, mode="L").save(out / f"{stem}.png")
                rgb = (image_to_tensor(image).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
                overlay(rgb, labels, names, alpha=args.alpha, background_id=0).save(out / f"{stem}_overlay.png")
            bar.update(len(images))
    with open(out / LABELS_FILE, "w", encoding="utf-8") as f:
        # id 0 appears only with a background
        json.dump({str(i): name for i, name in enumerate(names) if i or background is not None}, f, indent=2)
    print(f"wrote {len(paths)} label maps and overlays to {os.fspath(out)} (<name>.png, <name>_overlay.png, "
          f"{LABELS_FILE}; other files there are left alone)")
    return 0
