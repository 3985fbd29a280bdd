"""Speed of MaskDiffusionSegPipeline against its floor: one VAE encode + one UNet forward.

    python benchmarks/segment_speed.py                       # embedded ShapesWorld model (or a tiny one)
    python benchmarks/segment_speed.py --model PATH_OR_HUB_ID --size 512 --device cuda
    python benchmarks/segment_speed.py --model random-sd15 --size 256 --batch 1   # SD 1.5 shapes, no download

Both are timed on the same model, images, device and run: the baseline encodes the images
with the VAE and runs the full UNet once with the class prompt's embeddings (already
encoded) and the model's own attention processors; the pipeline does everything it does
for a user (prompt encoding, VAE, UNet with attention recording and feature hooks,
prototypes, upsampling, arg-max). Printed: seconds per image of each and their ratio
(target: <= 1.2), for one image per call and for a batch per call.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from diffuseg.models import load_pipeline, resolve_model
from diffuseg.pipelines.maskdiffusion import PROMPT_SEPARATOR, MaskDiffusionSegPipeline
from diffuseg.testing import random_sd15, tiny_stable_diffusion


def cast(pipe: MaskDiffusionSegPipeline, device: str, dtype: torch.dtype) -> MaskDiffusionSegPipeline:
    return pipe.to(device) if dtype == torch.float32 else pipe.to(device=device, dtype=dtype)


def load(model: str | None, device: str, dtype: torch.dtype) -> tuple[MaskDiffusionSegPipeline, str]:
    if model == "random-sd15":
        return cast(random_sd15(MaskDiffusionSegPipeline), device, dtype), "SD 1.5 architecture, random weights"
    if model is None:
        try:
            resolve_model()
        except FileNotFoundError:
            # No embedded model in this checkout: a tiny random SD with the ShapesWorld UNet's widths.
            pipe = tiny_stable_diffusion(pipeline_class=MaskDiffusionSegPipeline, block_out_channels=(64, 128))
            return cast(pipe, device, dtype), "tiny random SD (UNet 64/128, VAE /2)"
        model = "shapesworld"
    pipe = load_pipeline(MaskDiffusionSegPipeline, model, dtype=dtype, device=device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, model


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def baseline(pipe: MaskDiffusionSegPipeline, pixels: torch.Tensor, embeds: torch.Tensor, timestep: int) -> None:
    """What any method that reads a UNet pass must pay: VAE encode, one full UNet forward."""
    latents = pipe.encode_latents(pixels)
    pipe.unet(latents, timestep, encoder_hidden_states=embeds.expand(len(latents), -1, -1), return_dict=False)


def timed(fn, device: str, clock) -> float:
    synchronize(device)
    start = clock()
    fn()
    synchronize(device)
    return clock() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder, Hub id, or 'random-sd15' (SD 1.5's architecture, random weights) "
                        "(default: embedded ShapesWorld, else a tiny random SD)")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's native size)")
    parser.add_argument("--classes", default="circle,square,triangle", help="comma-separated class names")
    parser.add_argument("--batch", type=int, default=4, help="images per call in the batched measurement")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats (median reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall time, or this process's CPU time: steadier on a shared CPU (use with --threads 1)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.clock == "cpu" and args.device != "cpu":
        parser.error("--clock cpu measures CPU work: use it with --device cpu")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    pipe, name = load(args.model, args.device, getattr(torch, args.dtype))
    classes = [c.strip() for c in args.classes.split(",")]
    size = args.size or pipe.native_latent_size * pipe.vae_scale_factor
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(args.batch)]
    pixels = torch.stack([torch.from_numpy(i).permute(2, 0, 1).float() / 255 for i in images])
    embeds, _ = pipe.encode_prompt(PROMPT_SEPARATOR.join(classes), pipe._execution_device, 1, False)
    timestep = 50

    print(f"model: {name}  device: {args.device}  dtype: {args.dtype}  image: {size}x{size}  classes: {classes}  "
          f"clock: {args.clock}  threads: {torch.get_num_threads()}")
    print(f"{'images/call':>12} {'baseline s/img':>15} {'pipeline s/img':>15} {'ratio':>7}")
    for per_call in sorted({1, args.batch}):
        batch_pixels, batch_images = pixels[:per_call], images[:per_call]
        runs = {
            "baseline": lambda: baseline(pipe, batch_pixels, embeds, timestep),
            "pipeline": lambda: pipe(batch_images, classes, timesteps=timestep, batch_size=per_call),
        }
        for fn in runs.values():  # warm-up (allocations, kernels, caches)
            fn()
        times: dict[str, list[float]] = {key: [] for key in runs}
        for _ in range(args.repeats):  # interleaved, so load changes hit both alike
            for key, fn in runs.items():
                times[key].append(timed(fn, args.device, clock) / per_call)
        base, ours = statistics.median(times["baseline"]), statistics.median(times["pipeline"])
        print(f"{per_call:>12} {base:>15.5f} {ours:>15.5f} {ours / base:>7.2f}")


if __name__ == "__main__":
    main()
