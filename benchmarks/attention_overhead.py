"""What recording attention costs: DiffuMaskPipeline vs plain StableDiffusionPipeline.

Same tiny-but-UNet-dominated model, same settings, same seed. Times are interleaved
(plain, DiffuMask, store-every-map, plain, ...) in one process so machine noise hits all
three alike; the median of each is reported. Peak memory is measured in a fresh process
per variant, after a warm-up call, with glibc's mmap threshold at 64 KiB: the kernel's peak
resident size (VmHWM, reset just before the call) minus the resident size at that moment.

The third variant is the baseline our running sums replace: a prompt-to-prompt style
controller that computes every attention layer explicitly and keeps every map of every step.

    python benchmarks/attention_overhead.py [--steps 10] [--size 128] [--rounds 5]

Every family, on its full-width architecture with random weights (no checkpoint is reachable
on the machines this is built on), ``output_type="latent"``, DiffuMask's family pipeline
interleaved with the plain family pipeline:

    python benchmarks/attention_overhead.py --family sdxl --full-width --steps 2 [--device cuda]

``--family sd1 | sdxl | sd3 | flux`` with ``--full-width``: SD 1.5's UNet at 512², SDXL's UNet
at 1024², SD3-medium's transformer at 1024², FLUX.1's block width with 2 double- and 4
single-stream blocks (of 19 and 38) at 1024². Text encoders are one- or two-layer models of the
real output widths (they run once per call). Without ``--full-width``, the tiny test models at
64² (a smoke run). Peak memory: the CUDA allocator's peak on a GPU, else the process's as below.

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
    parser.add_argument("--family", choices=tuple(FAMILY_SIZES), help="benchmark DiffuMask on this family instead")
    parser.add_argument("--full-width", action="store_true", help="with --family: the real denoiser width")
    parser.add_argument("--device", default="cpu", help="with --family: cpu or cuda (default cpu)")
    args = parser.parse_args()
    if args.family:
        family_main(args)
        return
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
