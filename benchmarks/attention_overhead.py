"""What recording attention costs: DiffuMaskPipeline vs plain StableDiffusionPipeline.

Same tiny-but-UNet-dominated model, same settings, same seed. Times are interleaved
(plain, DiffuMask, store-every-map, plain, ...) in one process so machine noise hits all
three alike; the median of each is reported. Peak memory is measured in a fresh process
per variant, after a warm-up call, with glibc's mmap threshold at 64 KiB: the kernel's peak
resident size (VmHWM, reset just before the call) minus the resident size at that moment.

The third variant is the baseline our running sums replace: a prompt-to-prompt style
controller that computes every attention layer explicitly and keeps every map of every step.

    python benchmarks/attention_overhead.py [--steps 10] [--size 128] [--rounds 5]

Targets: DiffuMask / plain <= 1.05 for time and for memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from diffuseg.attention import AttentionController, attention_control
from diffuseg.pipelines import DiffuMaskPipeline
from diffuseg.testing import tiny_stable_diffusion

PROMPT = "a photo of a dog on the grass in the park"
CLASSES = ["dog", "grass"]
VARIANTS = ("plain", "diffumask", "store_every_map")


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


def build(size: int):
    # Three levels with 2 layers each: the UNet dominates the step time, as in real SD.
    return tiny_stable_diffusion(
        pipeline_class=DiffuMaskPipeline, seed=0, block_out_channels=(64, 128, 256), layers_per_block=2,
        sample_size=size // 2,
    )


def run(pipe, variant: str, steps: int, size: int):
    common = dict(
        num_inference_steps=steps, height=size, width=size, guidance_scale=7.5,
        generator=torch.Generator().manual_seed(0), output_type="np",
    )
    plain_call = super(DiffuMaskPipeline, pipe).__call__
    if variant == "plain":
        return plain_call(PROMPT, **common)
    if variant == "diffumask":
        return pipe(PROMPT, class_names=CLASSES, **common)
    with attention_control(pipe.unet, StoreEveryMap()):
        return plain_call(PROMPT, **common)


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def memory_child(variant: str, steps: int, size: int) -> None:
    pipe = build(size)
    run(pipe, variant, 1, size)  # warm-up: first-touch library pages are not the variant's cost
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the kernel's peak-RSS counter (VmHWM) to the current RSS
    before = rss_kib("VmRSS")
    run(pipe, variant, steps, size)
    print(json.dumps({"variant": variant, "peak_delta_mib": max(rss_kib("VmHWM") - before, 0) / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="denoising steps per call (default 10)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (default 128: 64² latent)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default 5)")
    parser.add_argument("--memory-child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.steps, args.size)
        return

    pipe = build(args.size)
    print(f"model: UNet {sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.1f}M params, "
          f"{args.size}px ({args.size // 2}² latent), {args.steps} steps, CFG, torch threads {torch.get_num_threads()}")
    for variant in VARIANTS:  # warm-up
        run(pipe, variant, 1, args.size)
    times = {variant: [] for variant in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            start = time.perf_counter()
            run(pipe, variant, args.steps, args.size)
            times[variant].append(time.perf_counter() - start)

    memory = {}
    for variant in VARIANTS:
        out = subprocess.run(
            [sys.executable, __file__, "--memory-child", variant, "--steps", str(args.steps), "--size", str(args.size)],
            capture_output=True, text=True, check=True,
            # Every block of 64 KiB or more gets its own mmap, returned on free: the peak RSS then
            # follows live tensors, where glibc's heap made it swing by +-10 MiB between runs.
            env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
        )
        memory[variant] = json.loads(out.stdout.strip().splitlines()[-1])["peak_delta_mib"]

    plain_time = statistics.median(times["plain"])
    print(f"{'variant':<18}{'median s':>10}{'time ratio':>12}{'peak MiB':>10}{'mem ratio':>11}")
    for variant in VARIANTS:
        t = statistics.median(times[variant])
        print(f"{variant:<18}{t:>10.3f}{t / plain_time:>12.3f}{memory[variant]:>10.1f}"
              f"{memory[variant] / max(memory['plain'], 1e-9):>11.3f}")
    ratio_t = statistics.median(times["diffumask"]) / plain_time
    ratio_m = memory["diffumask"] / max(memory["plain"], 1e-9)
    print(f"DiffuMask / plain: time {ratio_t:.3f}x (target <= 1.05), memory {ratio_m:.3f}x (target <= 1.05)")


if __name__ == "__main__":
    main()
