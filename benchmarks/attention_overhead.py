"""What recording attention costs: DiffuMask (and Counterfactual) vs plain StableDiffusionPipeline.

Same model, settings and seed for every variant. Runs are interleaved (plain, DiffuMask,
..., plain, DiffuMask, ...) in one process, so machine noise hits all variants alike; the
median of each is reported. Time is this process's CPU time (one torch thread: the
machine is shared, and CPU time does not count the time other processes hold the core);
wall time is printed next to it. Peak memory is measured around every timed call, with
glibc's mmap threshold at 64 KiB (the script re-executes itself with it): the kernel's peak
resident size (VmHWM, reset just before the call) minus the resident size at that moment.
With that threshold every block of 64 KiB or more is its own mmap, returned on free, so
the peak follows live tensors (glibc's heap made it swing by +-10 MiB between runs).

Three modes:

    python benchmarks/attention_overhead.py                 # tiny 24M UNet, 128 px, decoded images
    python benchmarks/attention_overhead.py --sweep         # tiny UNet, 64...512 px, latents
    python benchmarks/attention_overhead.py --full-size     # SD 1.5 architecture, random weights, 512², latents

``--full-size``: UNet 320/640/1280/1280, CLIP-L text encoder, SD VAE (see
:func:`diffuseg.testing.random_sd15`), 512², 2 steps, ``output_type="latent"``. Variants:
plain; DiffuMask with its default resolutions (every level) and with DiffuMask's 16/32/64;
Counterfactual with ``difference_source="latent"`` (no VAE decode: the floor is 2× the
plain run, it denoises two images) and with its default ``"image"`` difference, which must
decode both images with the VAE even when latents are asked for.

The tiny mode adds ``store_every_map``, the baseline our running sums replace: a
prompt-to-prompt style controller that computes every attention layer explicitly and keeps
every map of every step.

Targets: DiffuMask / plain <= 1.05 for time and for memory at every size;
Counterfactual / plain <= 2.1.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from diffuseg.attention import AttentionController, attention_control
from diffuseg.pipelines import CounterfactualPipeline, DiffuMaskPipeline

PROMPT = "a photo of a dog on the grass in the park"
CLASSES = ["dog", "grass"]
MMAP_THRESHOLD = "65536"


class StoreEveryMap(AttentionController):
    """Prompt-to-prompt style: explicit attention on every layer, every map of every step kept.

    Like prompt-to-prompt's AttentionStore, maps with more than 32² positions are computed
    but not kept (a 64² self-attention map alone is 16M floats per head).
    """

    def __init__(self) -> None:
        super().__init__()
        self.maps: list[torch.Tensor] = []

    def wants(self, kind, size):
        return True

    def __call__(self, kind, size, probs, queries):
        if size[0] * size[1] <= 32**2:
            self.maps.append(probs.detach().clone())
        return None


def tiny(size: int, vae_scale_factor: int) -> DiffuMaskPipeline:
    """Three UNet levels with 2 layers each (24M parameters): the UNet dominates the step time, as in real SD."""
    from diffusers import AutoencoderKL

    from diffuseg.testing import tiny_stable_diffusion

    pipe = tiny_stable_diffusion(
        pipeline_class=DiffuMaskPipeline, seed=0, block_out_channels=(64, 128, 256), layers_per_block=2,
        sample_size=size // vae_scale_factor,
    )
    if vae_scale_factor == 8:  # SD's latent geometry (a 512-px image has a 64² latent) with a narrow VAE
        vae = AutoencoderKL(
            block_out_channels=(32,) * 4, latent_channels=4, norm_num_groups=32, sample_size=size,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        ).eval()
        pipe = DiffuMaskPipeline(**{**pipe.components, "vae": vae}, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe: DiffuMaskPipeline, variant: str, steps: int, size: int, output_type: str):
    common = dict(
        num_inference_steps=steps, height=size, width=size, guidance_scale=7.5,
        generator=torch.Generator().manual_seed(0), output_type=output_type,
    )
    plain_call = super(DiffuMaskPipeline, pipe).__call__
    if variant == "plain":
        return plain_call(PROMPT, **common)
    if variant == "diffumask":
        return pipe(PROMPT, class_names=CLASSES, **common)
    if variant == "diffumask_16_32_64":
        return pipe(PROMPT, class_names=CLASSES, resolutions=(16, 32, 64), **common)
    if variant.startswith("counterfactual"):
        counterfactual = CounterfactualPipeline(**pipe.components, requires_safety_checker=False)
        counterfactual.set_progress_bar_config(disable=True)
        source = "image" if variant == "counterfactual_image" else "latent"
        return counterfactual(PROMPT, class_names=CLASSES, difference_source=source, **common)
    with attention_control(pipe.unet, StoreEveryMap()):
        return plain_call(PROMPT, **common)


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure(pipe, variant: str, steps: int, size: int, output_type: str) -> tuple[float, float, float]:
    """(CPU seconds, wall seconds, peak MiB above the resident size before) of one call."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the kernel's peak-RSS counter (VmHWM) to the current RSS
    before = rss_kib("VmRSS")
    cpu, wall = time.process_time(), time.perf_counter()
    run(pipe, variant, steps, size, output_type)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return cpu, wall, max(rss_kib("VmHWM") - before, 0) / 1024


def compare(pipe, variants, steps: int, size: int, output_type: str, rounds: int, warm_up: bool) -> dict:
    """Median (cpu s, wall s, peak MiB) per variant over interleaved rounds."""
    if warm_up:  # first-touch library pages and kernels are no variant's cost
        for variant in variants:
            run(pipe, variant, 1, size, output_type)
    results = {variant: [] for variant in variants}
    for _ in range(rounds):
        for variant in variants:
            results[variant].append(measure(pipe, variant, steps, size, output_type))
    return {v: tuple(statistics.median(r[i] for r in runs) for i in range(3)) for v, runs in results.items()}


def table(medians: dict, label: str = "") -> None:
    cpu0, _, mem0 = medians["plain"]
    print(f"{label}{'variant':<22}{'cpu s':>9}{'wall s':>9}{'time ratio':>12}{'peak MiB':>10}{'mem ratio':>11}")
    for variant, (cpu, wall, mem) in medians.items():
        print(f"{label}{variant:<22}{cpu:>9.2f}{wall:>9.2f}{cpu / cpu0:>12.3f}{mem:>10.1f}{mem / max(mem0, 1e-9):>11.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full-size", action="store_true", help="SD 1.5 architecture, random weights, 512², latents")
    parser.add_argument("--sweep", action="store_true", help="tiny UNet at 64, 128, 256, 512 px (SD's /8 latents)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps per call (default 10; full size 2)")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default 128; full size 512)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; full size 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args()
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_THRESHOLD:
        os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]],
                  {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD})
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores; "
          f"torch threads {torch.get_num_threads()}; times are CPU seconds of this process (median)")

    if args.full_size:
        from diffuseg.testing import random_sd15

        steps, size, rounds = args.steps or 2, args.size or 512, args.rounds or 3
        pipe = random_sd15(DiffuMaskPipeline)
        print(f"model: SD 1.5 architecture, random weights: UNet {sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.0f}M, "
              f"text encoder {sum(p.numel() for p in pipe.text_encoder.parameters()) / 1e6:.0f}M, "
              f"VAE {sum(p.numel() for p in pipe.vae.parameters()) / 1e6:.0f}M; {size}², {steps} steps, CFG, latents")
        variants = ("plain", "diffumask", "diffumask_16_32_64", "counterfactual", "counterfactual_image")
        # The first round is the warm-up's stand-in at this size: a separate one would double the run.
        medians = compare(pipe, variants, steps, size, "latent", rounds, warm_up=False)
        table(medians)
        summary(medians)
    elif args.sweep:
        steps, rounds = args.steps or 4, args.rounds or 5
        for size in (64, 128, 256, 512):
            pipe = tiny(size, vae_scale_factor=8)
            medians = compare(pipe, ("plain", "diffumask"), steps, size, "latent", rounds, warm_up=True)
            table(medians, label=f"{size:>4}px ({size // 8:>2}² latent)  ")
        print(f"sweep: tiny UNet 64/128/256 (24M), VAE /8, {steps} steps, CFG, latents, {rounds} rounds per size")
    else:
        steps, size, rounds = args.steps or 10, args.size or 128, args.rounds or 5
        pipe = tiny(size, vae_scale_factor=2)
        print(f"model: UNet {sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.1f}M params, "
              f"{size}px ({size // 2}² latent), {steps} steps, CFG, decoded images")
        medians = compare(pipe, ("plain", "diffumask", "store_every_map"), steps, size, "np", rounds, warm_up=True)
        table(medians)
        summary(medians)


def summary(medians: dict) -> None:
    cpu0, _, mem0 = medians["plain"]
    for variant, target in (("diffumask", 1.05), ("diffumask_16_32_64", 1.05), ("counterfactual", 2.1)):
        if variant in medians:
            cpu, _, mem = medians[variant]
            print(f"{variant} / plain: time {cpu / cpu0:.3f}x, memory {mem / max(mem0, 1e-9):.3f}x (target <= {target})")


if __name__ == "__main__":
    main()
