"""Does writing the dataset cost memory or speed? Tiny offline model, measured in one run.

1. Peak memory (max RSS of a fresh process, median of a few) of ``generate_dataset`` for 50
   and for 500 samples: a streaming writer holds one shard at a time, so the ratio should
   stay ≤ 1.1. (Single peaks are noisy on a loaded machine: transient allocator spikes of
   the generation itself reach tens of MiB, hence the median.)
2. Throughput of ``generate_dataset`` (generation + filters' measurements + PNG encoding +
   Parquet shards + card) ÷ throughput of the same pipeline calls alone, on the same
   prompts and seeds: should stay ≥ 0.95. Runs alternate and the best of each is kept, so
   other load on the machine hits both alike.

    python benchmarks/writer.py                    # ~5 minutes on 2 idle CPU cores
    python benchmarks/writer.py --size 64 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def config_for(out: str, num_samples: int, size: int, steps: int):
    from diffuseg.generation import GenerationConfig, parse_classes

    classes = parse_classes("dog,cat,car,bird,sofa")
    return GenerationConfig(
        out=out, classes=classes, images_per_class=num_samples // len(classes.classes), model="tiny-random",
        height=size, width=size, num_inference_steps=steps, batch_size=10, samples_per_shard=50,
    )


def tiny_pipe():
    from diffuseg.pipelines import DiffuMaskPipeline
    from diffuseg.testing import tiny_stable_diffusion

    return tiny_stable_diffusion(pipeline_class=DiffuMaskPipeline)


def child(num_samples: int, size: int, steps: int) -> None:
    """Generate ``num_samples`` in this fresh process; print its peak RSS (MiB) as JSON."""
    from diffuseg.generation import generate_dataset

    pipe = tiny_pipe()
    with tempfile.TemporaryDirectory() as folder:
        summary = generate_dataset(config_for(str(Path(folder) / "ds"), num_samples, size, steps), pipe=pipe,
                                   progress=False)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"samples": summary.total_rows, "peak_mib": peak_mib}))


def peak_memory(num_samples: int, size: int, steps: int, repeats: int) -> tuple[int, list[float]]:
    """Rows written and the peak RSS (MiB) of ``repeats`` fresh processes."""
    command = [sys.executable, __file__, "--child", str(num_samples), "--size", str(size), "--steps", str(steps)]
    runs = []
    for _ in range(repeats):
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
    return runs[0]["samples"], [r["peak_mib"] for r in runs]


def throughput(num_samples: int, size: int, steps: int, rounds: int) -> tuple[float, float]:
    """Best samples/s of generation alone and of generate_dataset, alternating rounds."""
    from diffuseg.generation import GenerationConfig, TemplatePrompter, WorkPlan, generate_dataset, get_pipeline

    pipe = tiny_pipe()
    spec = get_pipeline("diffumask")
    alone, written = [], []
    with tempfile.TemporaryDirectory() as folder:
        for r in range(rounds):
            config = config_for(str(Path(folder) / f"ds{r}"), num_samples, size, steps)
            plan, prompter = WorkPlan(config), TemplatePrompter(config.classes)
            start = time.perf_counter()
            requests = [plan.request(i, prompter, pipe.tokenizer) for i in range(config.num_samples)]
            for b in range(0, len(requests), config.batch_size):
                spec.generate(pipe, requests[b : b + config.batch_size], config)
            alone.append(config.num_samples / (time.perf_counter() - start))

            start = time.perf_counter()
            generate_dataset(GenerationConfig(**config.__dict__), pipe=pipe, progress=False)
            written.append(config.num_samples / (time.perf_counter() - start))
    return max(alone), max(written)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64, help="image size in pixels (default: 64)")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps (default: 2)")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds (default: 3)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="processes per memory measurement; the median is kept (default: 3)")
    parser.add_argument("--samples", type=int, default=100, help="samples per throughput round (default: 100)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.size, args.steps)
        return

    (n_small, small), (n_large, large) = (peak_memory(n, args.size, args.steps, args.repeats) for n in (50, 500))
    ratio = statistics.median(large) / statistics.median(small)
    print(f"peak memory (median of {args.repeats} processes): {n_small} samples {statistics.median(small):.0f} MiB "
          f"{[round(m) for m in small]}, {n_large} samples {statistics.median(large):.0f} MiB "
          f"{[round(m) for m in large]}, ratio {ratio:.3f} (target <= 1.1)")
    alone, written = throughput(args.samples, args.size, args.steps, args.rounds)
    print(f"throughput ({args.samples} samples, {args.size} px, {args.steps} steps, best of {args.rounds}): "
          f"generation alone {alone:.1f} img/s, with writer {written:.1f} img/s, "
          f"ratio {written / alone:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
