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

Every family, on its full-width architecture with random weights (no checkpoint is reachable
on the machines this is built on), ``output_type="latent"``, DiffuMask's family pipeline
interleaved with the plain family pipeline:

    python benchmarks/attention_overhead.py --family sdxl --full-width --steps 2 [--device cuda]

``--family sd1 | sdxl | sd3 | flux`` with ``--full-width``: SD 1.5's UNet at 512², SDXL's UNet
at 1024², SD3-medium's transformer at 1024², FLUX.1's block width with 2 double- and 4
single-stream blocks (of 19 and 38) at 1024². Text encoders are one- or two-layer models of the
real output widths (they run once per call). Without ``--full-width``, the tiny test models at
64² (a smoke run). Peak memory: the CUDA allocator's peak on a GPU, else the process's as below.

Targets: DiffuMask / plain <= 1.05 for time and for memory (every family, every size);
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


# ---------------------------------------------------------------- every family


FAMILY_SIZES = {"sd1": 512, "sdxl": 1024, "sd3": 1024, "flux": 1024}


def full_width_components(family: str) -> dict:
    """Random-weight components of ``family`` at the real denoiser's width (fewer FLUX blocks)."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from diffuseg.testing import build_clip_tokenizer, build_t5_tokenizer

    torch.manual_seed(0)
    clip_tokenizer = build_clip_tokenizer()

    def clip(hidden: int, projection: int | None = None):
        config = CLIPTextConfig(
            vocab_size=len(clip_tokenizer), hidden_size=hidden, intermediate_size=hidden, num_hidden_layers=2,
            num_attention_heads=8, max_position_embeddings=77, projection_dim=projection or hidden,
            bos_token_id=clip_tokenizer.bos_token_id, eos_token_id=clip_tokenizer.eos_token_id,
            pad_token_id=clip_tokenizer.pad_token_id,
        )
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()

    def t5(tokenizer):
        config = T5Config(vocab_size=len(tokenizer), d_model=4096, d_ff=256, d_kv=64, num_layers=1, num_heads=4)
        return T5EncoderModel(config).eval()

    def vae(latent_channels: int, flow: bool):
        # Four blocks (the real / 8) of few channels: with latent output it only sets the scale factor.
        extra = dict(shift_factor=0.0609, scaling_factor=1.5035) if flow else {}
        return AutoencoderKL(
            block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=latent_channels, norm_num_groups=8, **extra,
        ).eval()

    if family == "sd1":
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
        return dict(unet=unet.eval(), vae=vae(4, False), text_encoder=clip(768), tokenizer=clip_tokenizer,
                    scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None, image_encoder=None)
    if family == "sdxl":
        unet = UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
            cross_attention_dim=2048,
        )
        return dict(unet=unet.eval(), vae=vae(4, False), text_encoder=clip(768), text_encoder_2=clip(1280, 1280),
                    tokenizer=clip_tokenizer, tokenizer_2=build_clip_tokenizer(), scheduler=EulerDiscreteScheduler(),
                    image_encoder=None, feature_extractor=None)
    if family == "sd3":
        transformer = SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
            pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192,
        )
        tokenizer_3 = build_t5_tokenizer(model_max_length=256)
        return dict(transformer=transformer.eval(), vae=vae(16, True), text_encoder=clip(768, 768),
                    text_encoder_2=clip(1280, 1280), text_encoder_3=t5(tokenizer_3), tokenizer=clip_tokenizer,
                    tokenizer_2=build_clip_tokenizer(), tokenizer_3=tokenizer_3,
                    scheduler=FlowMatchEulerDiscreteScheduler(), image_encoder=None, feature_extractor=None)
    if family == "flux":
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        )
        tokenizer_2 = build_t5_tokenizer(model_max_length=512)
        return dict(transformer=transformer.eval(), vae=vae(16, True), text_encoder=clip(768),
                    text_encoder_2=t5(tokenizer_2), tokenizer=clip_tokenizer, tokenizer_2=tokenizer_2,
                    scheduler=FlowMatchEulerDiscreteScheduler(), image_encoder=None, feature_extractor=None)
    raise ValueError(f"unknown family {family!r}")


def build_family(family: str, full_width: bool, device: str, dtype: torch.dtype):
    """``(DiffuMask family pipeline, plain family pipeline)`` sharing one set of components."""
    import inspect

    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    from diffuseg.pipelines import DiffuMaskFluxPipeline, DiffuMaskSD3Pipeline, DiffuMaskXLPipeline
    from diffuseg.testing import tiny_pipeline

    classes = {
        "sd1": (DiffuMaskPipeline, StableDiffusionPipeline),
        "sdxl": (DiffuMaskXLPipeline, StableDiffusionXLPipeline),
        "sd3": (DiffuMaskSD3Pipeline, StableDiffusion3Pipeline),
        "flux": (DiffuMaskFluxPipeline, FluxPipeline),
    }[family]
    components = full_width_components(family) if full_width else tiny_pipeline(family, seed=0).components
    pipes = []
    for cls in classes:
        accepted = inspect.signature(cls.__init__).parameters
        pipe = cls(**{k: v for k, v in components.items() if k in accepted})
        pipe.to(device)
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        pipes.append(pipe)
    return pipes


def run_family(pipes, variant: str, family: str, steps: int, size: int):
    diffumask, plain = pipes
    common = dict(num_inference_steps=steps, height=size, width=size, output_type="latent",
                  generator=torch.Generator().manual_seed(0))
    if family in ("sd3", "flux"):
        common["max_sequence_length"] = 256 if family == "sd3" else 512
    if variant == "plain":
        return plain(PROMPT, **common)
    return diffumask(PROMPT, class_names=CLASSES, **common)


def family_peak_mib(pipes, variant, family, steps, size, device) -> float | None:
    if not device.startswith("cuda"):
        return None
    run_family(pipes, variant, family, 1, size)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    run_family(pipes, variant, family, steps, size)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def family_main(args) -> None:
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    size = FAMILY_SIZES[args.family] if args.full_width else 64
    pipes = build_family(args.family, args.full_width, args.device, dtype)
    denoiser = pipes[1].unet if args.family in ("sd1", "sdxl") else pipes[1].transformer
    print(f"{args.family}: denoiser {sum(p.numel() for p in denoiser.parameters()) / 1e6:.0f}M params "
          f"({'full width, random weights' if args.full_width else 'tiny'}), {size}², {args.steps} steps, "
          f"latent output, {args.device} {dtype}")
    variants = ("plain", "diffumask")
    for variant in variants:
        run_family(pipes, variant, args.family, 1, size)
    times = {variant: [] for variant in variants}
    for _ in range(args.rounds):
        for variant in variants:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            run_family(pipes, variant, args.family, args.steps, size)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times[variant].append(time.perf_counter() - start)
    memory = {variant: family_peak_mib(pipes, variant, args.family, args.steps, size, args.device) for variant in variants}
    plain_time = statistics.median(times["plain"])
    print(f"{'variant':<12}{'median s':>10}{'time ratio':>12}{'peak MiB':>10}{'mem ratio':>11}")
    for variant in variants:
        t, m = statistics.median(times[variant]), memory[variant]
        mem = "n/a" if m is None else f"{m:.1f}"
        ratio = "n/a" if m is None else f"{m / max(memory['plain'], 1e-9):.3f}"
        print(f"{variant:<12}{t:>10.3f}{t / plain_time:>12.3f}{mem:>10}{ratio:>11}")


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
    parser.add_argument("--family", choices=tuple(FAMILY_SIZES), help="DiffuMask's pipeline for this family vs the family's own")
    parser.add_argument("--full-width", action="store_true", help="with --family: the real denoiser width at its native size")
    parser.add_argument("--device", default="cpu", help="with --family: cpu or cuda (default cpu)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps per call (default 10; full size 2)")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default 128; full size 512)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; full size 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args()
    if args.family:
        args.steps, args.rounds = args.steps or 2, args.rounds or 3
        torch.set_num_threads(args.threads)
        family_main(args)
        return
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
