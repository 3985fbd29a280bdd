"""ShapesWorld quality bars: prompt fidelity of the model, and DiffuMask mask IoU.

1. The judge: the geometric recogniser (:mod:`diffuseg.shapesworld.recognize`) reads rendered
   validation scenes; it must score ~100% there, or nothing below means anything. It also
   reads the VAE's reconstructions of those scenes: no generated image can beat that figure,
   since every one is decoded by the same VAE.
2. Prompt fidelity: the model draws every (colour, shape) prompt of its world, held-out
   pairings included, and pair prompts; an image is faithful when the recogniser finds every
   prompted colour with the prompted shape and no unprompted colour. Baseline measured in
   the same run: the same images judged against a *shuffled* prompt (what fidelity an image
   that ignores its prompt would get). Bar: ≥ 80%.
3. DiffuMask masks (Otsu) on the generated images vs the recogniser's colour regions of the
   prompted objects, per object; baseline: the all-image mask. Bar: IoU ≥ 0.5.
4. Empty scenes: the captions of scenes without objects ("a picture of a background", what
   counterfactual prompts ask for); an image is faithful when the recogniser finds no object.

    python benchmarks/shapesworld_quality.py                       # the embedded model
    python benchmarks/shapesworld_quality.py --model path/to/pipeline --images-per-prompt 4
    python benchmarks/shapesworld_quality.py --model shapesworld-dit       # the SD3-architecture model

Either architecture: a ``StableDiffusion3Pipeline`` folder (ShapesWorld-DiT) is judged the same way,
sampled with its flow-matching Euler scheduler and the zero "T5" tokens it was trained with. Its
DiffuMask masks need ``DiffuMaskSD3Pipeline`` (see :func:`mask_pipeline_class`); without it the
benchmark measures fidelity only and says so.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline
from tqdm.auto import tqdm

import diffuseg.pipelines
from diffuseg.commands import comma_separated_ints
from diffuseg.models import load_pipeline, resolve_model
from diffuseg.shapesworld.recognize import prompt_fidelity, recognize
from diffuseg.shapesworld.render import (
    CAPTION_TEMPLATES,
    HELD_OUT_PAIRS,
    model_world,
    render,
    scene_from_seed,
)
from diffuseg.shapesworld.render import sample_seed as row_seed

FIDELITY_BAR = 0.8
IOU_BAR = 0.5


def judge_renders(shapes, colors, n: int, size: int, vae) -> tuple[float, float]:
    """Fidelity of the recogniser on rendered validation scenes (held-out pairs allowed), and on
    their reconstructions by ``vae``: the most a generator decoding with this VAE can score."""
    hits = np.zeros(2)
    for index in tqdm(range(n), desc="judge on renders", mininterval=5):
        scene, _ = scene_from_seed(row_seed(0, "validation", index), "validation", shapes=shapes, colors=colors,
                                   n_objects=(1, 2))
        image, _ = render(scene, size, classes=shapes)
        pixels = torch.from_numpy(image).permute(2, 0, 1)[None].to(vae.dtype) / 127.5 - 1
        with torch.no_grad():
            decoded = vae.decode(vae.encode(pixels).latent_dist.mode()).sample
        reconstruction = ((decoded[0].float().permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
        prompted = [(o.color, o.shape) for o in scene.objects]
        for k, picture in enumerate((image, reconstruction)):
            hits[k] += prompt_fidelity(recognize(picture, shapes, colors), prompted)["faithful"]
    return hits[0] / n, hits[1] / n


def mask_pipeline_class(sd3: bool):
    """The DiffuMask pipeline of the model's family, or None when this install has none.

    The hook for the MM-DiT family: an SD3 folder is masked by ``diffuseg.pipelines.DiffuMaskSD3Pipeline``
    once it exists, called like ``DiffuMaskPipeline`` (``class_names``, ``threshold``, ``resolutions``).
    """
    if not sd3:
        return diffuseg.pipelines.DiffuMaskPipeline
    return getattr(diffuseg.pipelines, "DiffuMaskSD3Pipeline", None)


def prompt_set(shapes, colors, n_pairs: int, seed: int) -> list[tuple[str, list[tuple[str, str]]]]:
    """Every single (colour, shape) prompt, plus ``n_pairs`` two-object prompts (distinct colours and shapes)."""
    prompts = [(f"a {c} {s}", [(c, s)]) for s in shapes for c in colors]
    rng = np.random.default_rng(seed)
    while len(prompts) < len(shapes) * len(colors) + n_pairs:
        (s1, s2), (c1, c2) = rng.choice(shapes, 2, replace=False), rng.choice(colors, 2, replace=False)
        prompts.append((f"a {c1} {s1} and a {c2} {s2}", [(str(c1), str(s1)), (str(c2), str(s2))]))
    return prompts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="pipeline folder (default: the embedded ShapesWorld model)")
    parser.add_argument("--images-per-prompt", type=int, default=2, help="images generated per prompt (default 2)")
    parser.add_argument("--pairs", type=int, default=12, help="two-object prompts besides all single ones (default 12)")
    parser.add_argument("--steps", type=int, default=25, help="sampler steps, DDIM or flow-matching Euler (default 25)")
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (default 5)")
    parser.add_argument("--renders", type=int, default=40, help="rendered scenes to check the judge on (default 40)")
    parser.add_argument("--resolutions", type=comma_separated_ints, default=None,
                        help="cross-attention map heights to aggregate, e.g. 16 or 16,8 (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--save-grid", type=Path, default=None, help="write the generated images as one PNG grid")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model_dir = resolve_model(args.model)
    world = model_world(model_dir)
    shapes, colors, size = world.shapes, world.colors, world.image_size
    sd3 = json.loads((Path(model_dir) / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    print(f"model: {model_dir} ({'SD3 transformer' if sd3 else 'UNet'} step {world.unet_step}, "
          f"VAE PSNR {world.vae_psnr:.1f} dB)")
    print(f"world: shapes {list(shapes)}, colours {list(colors)}; held-out pairs "
          f"{sorted(p for p in HELD_OUT_PAIRS if p[0] in colors and p[1] in shapes)}")

    mask_class = mask_pipeline_class(sd3)
    plain_class = StableDiffusion3Pipeline if sd3 else StableDiffusionPipeline
    if mask_class is None:
        print("DiffuMask IoU: not measured (this install has no DiffuMaskSD3Pipeline); prompt fidelity only")
    pipe = load_pipeline(mask_class or plain_class, model_dir)
    pipe.set_progress_bar_config(disable=True)
    extra = {}
    if sd3:  # the zero "T5" tokens the model was trained with (the pipeline's default when not recorded)
        config = json.loads((Path(model_dir) / "training_state.json").read_text()).get("config", {}) \
            if (Path(model_dir) / "training_state.json").is_file() else {}
        extra["max_sequence_length"] = config.get("t5_tokens", 256)

    t0 = time.time()
    judge, ceiling = judge_renders(shapes, colors, args.renders, size, pipe.vae)
    print(f"judge on {args.renders} renders: {judge:.1%} faithful; on their VAE reconstructions (the ceiling of "
          f"any image this VAE decodes): {ceiling:.1%} ({time.time() - t0:.0f}s)")

    prompts = prompt_set(shapes, colors, args.pairs, args.seed)
    object_prompts = len(prompts)
    prompts += [(text, []) for text in CAPTION_TEMPLATES[0]]
    rows = []  # one per image: prompt kind, held-out, verdict, shuffled verdict, IoUs
    images_all = []
    t0 = time.time()
    for index, (prompt, objects) in enumerate(tqdm(prompts, desc="generate + judge", mininterval=5)):
        generator = torch.Generator().manual_seed(args.seed * 100003 + index)
        common = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, generator=generator,
                      num_images_per_prompt=args.images_per_prompt, output_type="np", height=size, width=size, **extra)
        if objects and mask_class is not None:
            out = pipe(prompt, class_names=[s for _, s in objects], threshold="otsu", resolutions=args.resolutions,
                       **common)
        else:  # nothing to mask: the plain text-to-image call
            out = plain_class.__call__(pipe, prompt, **common)
        images = (np.clip(out.images, 0, 1) * 255).round().astype(np.uint8)
        # the shuffled baseline: the prompt of another, fixed, index with a different set of objects
        other = prompts[(index + object_prompts // 2) % object_prompts][1]
        for k, image in enumerate(images):
            images_all.append(image)
            detections = recognize(image, shapes, colors)
            verdict = prompt_fidelity(detections, objects)
            shuffled = prompt_fidelity(detections, other)
            ious, whole = [], []
            found = {d.color: d.mask for d in detections}
            for class_id, (color, _) in enumerate(objects, start=1):
                if mask_class is None or color not in found:
                    continue  # no mask, or no reference mask: counted by fidelity, not by IoU
                ref, pred = found[color], out.masks[k] == class_id
                ious.append((ref & pred).sum() / max((ref | pred).sum(), 1))
                whole.append(ref.mean())
            rows.append({
                "kind": {0: "empty", 1: "single"}.get(len(objects), "pair"),
                "held_out": any(p in HELD_OUT_PAIRS for p in objects),
                **verdict, "shuffled": shuffled["faithful"], "ious": ious, "whole": whole,
            })
    seconds = time.time() - t0

    def rate(selected, key):
        return (sum(r[key] for r in selected) / len(selected), len(selected)) if selected else (float("nan"), 0)

    empty = [r for r in rows if r["kind"] == "empty"]
    rows = [r for r in rows if r["kind"] != "empty"]
    groups = {
        "all": rows,
        "single": [r for r in rows if r["kind"] == "single"],
        "pair": [r for r in rows if r["kind"] == "pair"],
        "held-out": [r for r in rows if r["held_out"]],
        "seen": [r for r in rows if not r["held_out"]],
    }
    sampler = "flow-matching Euler" if sd3 else "DDIM"
    print(f"\n{len(rows) + len(empty)} images in {seconds:.0f}s ({args.steps} {sampler} steps, guidance {args.guidance})")
    header = ("colours", "shapes", "no extra", "faithful", "shuffled")
    print(f"{'group':<10}{'n':>5}" + "".join(f"{h:>10}" for h in header) + f"{'ratio':>8}")
    for name, selected in groups.items():
        n = len(selected)
        if not n:
            continue
        values = [rate(selected, key)[0] for key in ("colors", "shapes", "no_extra", "faithful", "shuffled")]
        ratio = f"{values[3] / values[4]:.2f}" if values[4] else "n/a"
        print(f"{name:<10}{n:>5}" + "".join(f"{v:>10.1%}" for v in values) + f"{ratio:>8}")
    fidelity = rate(rows, "faithful")[0]
    print(f"prompt fidelity {fidelity:.1%} (bar {FIDELITY_BAR:.0%}): {'PASS' if fidelity >= FIDELITY_BAR else 'FAIL'}")
    if empty:
        print(f"empty scenes ({len(empty)} images of {', '.join(repr(t) for t in CAPTION_TEMPLATES[0])}): "
              f"{rate(empty, 'faithful')[0]:.1%} show no object")
    ious = [v for r in rows for v in r["ious"]]
    whole = [v for r in rows for v in r["whole"]]
    for name, selected in groups.items():
        values = [v for r in selected for v in r["ious"]]
        if values:
            print(f"DiffuMask IoU {name:<9} {np.mean(values):.3f} over {len(values)} objects")
    if ious:
        mean_iou, base = float(np.mean(ious)), float(np.mean(whole))
        maps = "all resolutions" if args.resolutions is None else f"resolutions {args.resolutions}"
        print(f"DiffuMask (Otsu, {maps}) IoU vs geometric reference: {mean_iou:.3f}; whole-image baseline "
              f"{base:.3f} (ratio {mean_iou / base:.2f}); bar {IOU_BAR}: {'PASS' if mean_iou >= IOU_BAR else 'FAIL'}")
    if args.save_grid is not None:
        from PIL import Image

        per_row = args.images_per_prompt * 6
        padded = images_all + [np.zeros_like(images_all[0])] * (-len(images_all) % per_row)
        grid = np.concatenate([np.concatenate(padded[i:i + per_row], 1) for i in range(0, len(padded), per_row)], 0)
        Image.fromarray(grid).save(args.save_grid)
        print(f"grid: {args.save_grid}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
