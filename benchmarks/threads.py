"""Seconds per DiffuMask image on the embedded model: torch's own thread count vs diffuseg's default.

    python benchmarks/threads.py [--steps 5] [--images 2] [--rounds 3]

torch starts one thread per core; diffuseg's commands choose cores // local processes, at
most the cores the load average leaves idle (:func:`diffuseg.threads.choose_threads`). The
two settings run interleaved in one process (round r: torch's, then diffuseg's), so both see
the same load; the ratio of their medians is printed with the load average before and after.
Run it without OMP_NUM_THREADS: that variable would fix both settings.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from diffuseg.models import load_default_model
from diffuseg.threads import choose_threads, usable_cores


def seconds_per_image(pipe, threads: int, images: int, steps: int) -> float:
    torch.set_num_threads(threads)
    started = time.perf_counter()
    pipe(
        ["a picture of a red circle"] * images, class_names=["circle"], num_inference_steps=steps,
        guidance_scale=4.0, generator=torch.Generator().manual_seed(0), output_type="np",
    )
    return (time.perf_counter() - started) / images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="denoising steps per image (default: 5)")
    parser.add_argument("--images", type=int, default=2, help="images per timed call (default: 2)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    args = parser.parse_args()
    if os.environ.get("OMP_NUM_THREADS"):
        print(f"note: OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} is set; diffuseg's default follows it")

    torch_default = usable_cores()  # what torch.get_num_threads() starts with: one per core
    load_before = os.getloadavg()
    chosen = choose_threads()
    pipe = load_default_model()
    pipe.set_progress_bar_config(disable=True)
    seconds_per_image(pipe, chosen.threads, 1, 1)  # warm-up: first-call allocations
    times: dict[str, list[float]] = {"torch": [], "diffuseg": []}
    for _ in range(args.rounds):
        times["torch"].append(seconds_per_image(pipe, torch_default, args.images, args.steps))
        times["diffuseg"].append(seconds_per_image(pipe, chosen.threads, args.images, args.steps))
    load_after = os.getloadavg()

    torch_median, chosen_median = statistics.median(times["torch"]), statistics.median(times["diffuseg"])
    print(f"embedded ShapesWorld DiffuMask, 64 px, {args.steps} steps, {args.images} images per call, "
          f"{args.rounds} interleaved rounds; {usable_cores()} usable cores; "
          f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print(f"torch's default, {torch_default} thread(s): median {torch_median:.2f} s/image  "
          f"({', '.join(f'{t:.2f}' for t in times['torch'])})")
    print(f"diffuseg's default, {chosen.threads} thread(s) ({chosen.reason}): median {chosen_median:.2f} s/image  "
          f"({', '.join(f'{t:.2f}' for t in times['diffuseg'])})")
    print(f"ratio torch / diffuseg: {torch_median / chosen_median:.2f}x")


if __name__ == "__main__":
    main()
