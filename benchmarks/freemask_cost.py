"""Free-Mask rows against DiffuMask rows: CPU time and insertion acceptance, in one run.

    python benchmarks/freemask_cost.py                    # embedded ShapesWorld model, 16 prompts
    python benchmarks/freemask_cost.py --samples 32 --rounds 2

Both pipelines make the rows of ``diffuseg generate`` (the registry's samplers, the same
requests, seeds, steps and batch) on one thread; CPU time of this process (``time.process_time``)
is measured, so other load on the machine barely moves it, and the rounds alternate the two.
Printed: seconds per row of each and their ratio (target: <= 1.5), then Free-Mask's insertions:
how many were tried, accepted (target: >= 80%) and the rejections per check.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=16, help="prompts (rows) per pipeline and round (default: 16)")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds; the least time is kept (default: 1)")
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per pipeline call (default: 4)")
    parser.add_argument("--seed", type=int, default=1000, help="run seed: not the training seeds (default: 1000)")
    parser.add_argument("--model", default="shapesworld", help="model (default: the embedded ShapesWorld)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from diffuseg.generation import GenerationConfig, TemplatePrompter, WorkPlan, get_pipeline, parse_classes

    classes = parse_classes("shapes")
    configs, pipes = {}, {}
    for name in ("diffumask", "freemask"):
        configs[name] = GenerationConfig(
            out="unused", classes=classes, images_per_class=-(-args.samples // len(classes.classes)), pipeline=name,
            model=args.model, seed=args.seed, batch_size=args.batch_size,
        )
        pipes[name] = get_pipeline(name).load(configs[name], torch.device("cpu"), torch.float32)
    plan, prompter = WorkPlan(configs["diffumask"]), TemplatePrompter(classes)
    requests = [plan.request(i, prompter, pipes["diffumask"].tokenizer) for i in range(args.samples)]

    seconds = {name: [] for name in configs}
    insertions: Counter = Counter()
    for r in range(args.rounds):
        for name in configs:
            spec, config, pipe = get_pipeline(name), configs[name], pipes[name]
            start = time.process_time()
            samples = []
            for b in range(0, len(requests), config.batch_size):
                samples += spec.generate(pipe, requests[b : b + config.batch_size], config)
            seconds[name].append((time.process_time() - start) / len(requests))
            if name == "freemask" and r == 0:
                for sample in samples:
                    insertions["tried"] += sample["objects_inserted"] + sample["objects_rejected"]
                    insertions["accepted"] += sample["objects_inserted"]
                    for reason in filter(None, sample["rejection_reasons"].split(",")):
                        insertions[reason] += 1
    diffumask, freemask = min(seconds["diffumask"]), min(seconds["freemask"])
    steps, batch = configs["diffumask"].num_inference_steps, args.batch_size
    print(f"{args.samples} rows, {steps} steps, batch {batch}, 1 thread, CPU s/row (least of {args.rounds}): "
          f"DiffuMask {diffumask:.3f}, Free-Mask {freemask:.3f}, ratio {freemask / diffumask:.2f} (target <= 1.5)")
    reasons = ", ".join(f"{n} {k}" for k, n in sorted(insertions.items()) if k not in ("tried", "accepted")) or "none"
    print(f"Free-Mask insertions: {insertions['accepted']} of {insertions['tried']} accepted "
          f"({insertions['accepted'] / max(insertions['tried'], 1):.0%}, target >= 80%); rejected: {reasons}")


if __name__ == "__main__":
    main()
