"""Train the embedded ShapesWorld models: Stable-Diffusion-architecture text-to-image models.

The recipe is SD's at toy scale, trained on rendered scenes and their captions only (never
on the label maps):

1. **VAE** (``AutoencoderKL``, 64² RGB → 16²×4 latents): L1 + L2 reconstruction and a small
   KL term on freshly rendered scenes; PSNR on a fixed validation batch is logged.
2. **Latent cache**: the frozen VAE encodes a few tens of thousands of rendered scenes once
   (mean and std of the posterior, fp16, with the caption's token ids), so the diffusion
   stage never runs the VAE encoder.
3. **Text encoder + UNet** (``CLIPTextModel`` with a tokenizer built from the world's words,
   ``UNet2DConditionModel`` with cross-attention at 16² and 8²), trained together: DDPM
   ε-prediction with scaled-linear betas and min-SNR-γ loss weighting, captions dropped
   10% of the time for classifier-free guidance, EMA of the weights. Curriculum: single
   objects first, then pairs mixed in; a share of empty scenes throughout.

``--architecture sd3`` trains the MM-DiT family instead (ShapesWorld-DiT): stage 3 becomes an
``SD3Transformer2DModel`` (joint attention over image and text tokens) with two
``CLIPTextModelWithProjection`` encoders, trained by flow matching (rectified flow, as SD3:
x_σ = (1-σ)·x₀ + σ·ε, target ε - x₀, σ logit-normal) and exported as a
``StableDiffusion3Pipeline`` folder without a T5 encoder. ``--init-from`` starts it from an exported
pipeline (the shipped UNet model): its VAE (kept frozen), its text encoder and its world config,
so both models share one latent space and the VAE stage is skipped.

Every ``save_minutes`` (config) the script writes a full resumable checkpoint (fp32 weights, EMA,
optimizer; safetensors and JSON only) into ``--output-dir`` and exports the EMA weights as
an fp16 ``StableDiffusionPipeline`` folder (DDIM scheduler, model card,
``training_state.json``) into ``--export-dir``. Runs are reproducible from the recorded seed
and config: every batch and every noise draw come from a generator seeded by (seed, step).

Resume:

* ``--resume`` continues from ``<output-dir>/checkpoint`` (same optimizer state and data order);
* when that folder is missing (a fresh clone has only what is committed), ``--resume``
  continues from the exported pipeline in ``--export-dir`` instead: the EMA weights and the
  recorded config and step are restored, the optimizer restarts (with its warm-up), and the
  latent cache is rebuilt deterministically from the seed.

Examples::

    python -m diffuseg.shapesworld.train --output-dir runs/shapesworld
    python -m diffuseg.shapesworld.train --architecture sd3 --init-from src/diffuseg/assets/shapesworld --threads 1
    nohup nice -n 19 python -m diffuseg.shapesworld.train --output-dir runs/shapesworld --resume \\
        > runs/shapesworld/train.log 2>&1 &
    accelerate launch -m diffuseg.shapesworld.train --output-dir runs/shapesworld --resume
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffuseg.models import MODEL_DEFAULTS_FILE
from diffuseg.shapesworld.render import EMPTY_SCENE_WORD, COLORS, SHAPES, caption, render, sample_scene, world_words

ASSET_DIR = Path(__file__).resolve().parents[1] / "assets" / "shapesworld"
DIT_ASSET_DIR = ASSET_DIR.with_name("shapesworld-dit")
ARCHITECTURES = ("unet", "sd3")
MEASUREMENTS = "MEASUREMENTS.md"
"""A file of measured quality figures in an export folder: written by hand, kept by every re-export."""
PIPELINE_T5_TOKENS = 256
"""``StableDiffusion3Pipeline``'s default ``max_sequence_length``: the zero "T5" tokens it appends without a T5 encoder."""


@dataclass
class TrainConfig:
    """Everything that determines a training run (recorded with every checkpoint and export)."""

    seed: int = 0
    shapes: tuple[str, ...] = SHAPES[:3]
    colors: tuple[str, ...] = tuple(COLORS)[:6]
    image_size: int = 64
    radius_px: tuple[float, float] = (12.0, 24.0)
    max_rotation: float = 0.0
    textured_prob: float = 0.5
    # tokenizer and text encoder
    max_length: int = 16
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    # VAE
    vae_channels: tuple[int, ...] = (32, 64, 64)
    vae_norm_groups: int = 32
    vae_batch: int = 32
    vae_lr: float = 5e-4
    vae_kl_weight: float = 1e-6
    vae_max_steps: int = 6000
    vae_max_cpu_minutes: float = 40.0
    vae_target_psnr: float = 32.0
    vae_eval_every: int = 200
    # latent cache
    cache_empty: int = 2000
    cache_singles: int = 20000
    cache_pairs: int = 20000
    cache_batch: int = 256
    # UNet
    unet_channels: tuple[int, ...] = (64, 128)
    unet_layers_per_block: int = 1
    unet_heads: int = 4
    unet_norm_groups: int = 32
    batch: int = 64
    lr: float = 4e-4
    warmup_steps: int = 300
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    caption_dropout: float = 0.1
    context_dropout: float = 0.5
    min_snr_gamma: float | None = 5.0
    ema_decay: float = 0.999
    max_steps: int = 30000
    single_only_steps: int = 1500
    pair_ramp_steps: int = 3000
    max_pair_fraction: float = 0.5
    # Scenes without objects, captioned "a picture of a background": the model must be able to
    # draw a scene without its object, or a counterfactual prompt has nothing to ask for.
    empty_fraction: float = 0.2
    # Captions naming shapes without their colours ("a picture of a circle"): otherwise a shape word
    # never follows "a picture of a" and a caption naming only shapes (MaskDiffusion's) reads badly.
    colorless_caption_fraction: float = 0.2
    # denoiser: "unet" (SD 1.x UNet, DDPM ε-prediction) or "sd3" (MM-DiT, flow matching)
    architecture: str = "unet"
    # SD3 transformer (architecture "sd3"): patch size 1 keeps the 16² latent grid, so every
    # attention map has the UNet's finest resolution (the masks are read from them)
    dit_patch_size: int = 1
    dit_layers: int = 6
    dit_heads: int = 4
    dit_head_dim: int = 32
    flow_shift: float = 1.0  # SD3's resolution shift; 1.0 (none) for 16² latents
    sigma_sampling: str = "logit_normal"  # SD3's logit-normal(0, 1) noise levels, or "uniform"
    # Without a T5 encoder the SD3 pipeline appends max_sequence_length zero tokens to the CLIP ones.
    # Training sees t5_tokens of them, and PIPELINE_T5_TOKENS (the pipeline's default) in a share
    # long_t5_fraction of the steps, so a call with either max_sequence_length is in distribution.
    t5_tokens: int = 16
    long_t5_fraction: float = 0.1
    # bookkeeping
    log_every: int = 25
    save_minutes: float = 12.0

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        if self.sigma_sampling not in ("logit_normal", "uniform"):
            raise ValueError(f"sigma_sampling must be 'logit_normal' or 'uniform', got {self.sigma_sampling!r}")

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """A config from a JSON-like dict (lists become tuples, unknown keys are an error)."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


MICRO = dict(
    shapes=("circle", "square"),
    colors=("red", "blue"),
    image_size=32,
    radius_px=(6.0, 12.0),
    text_width=16,
    text_layers=1,
    text_heads=2,
    vae_channels=(8, 8, 8),
    vae_norm_groups=4,
    vae_batch=4,
    vae_max_steps=3,
    vae_eval_every=2,
    cache_empty=4,
    cache_singles=16,
    cache_pairs=16,
    cache_batch=16,
    unet_channels=(16, 32),
    unet_heads=2,
    unet_norm_groups=8,
    batch=4,
    warmup_steps=2,
    max_steps=4,
    single_only_steps=1,
    pair_ramp_steps=2,
    dit_layers=1,
    dit_heads=2,
    dit_head_dim=8,
    t5_tokens=4,
    log_every=1,
)
"""A config small enough to run every stage in seconds (tests, smoke runs)."""

PRESETS = {"default": {}, "micro": MICRO}


# ---------------------------------------------------------------------------------------
# models


def build_tokenizer(config: TrainConfig):
    """The CLIP tokenizer: every word of the world (all shapes and colours, so the world can grow) is one token."""
    from diffuseg.testing import build_clip_tokenizer

    return build_clip_tokenizer(world_words(SHAPES, tuple(COLORS)), model_max_length=config.max_length)


def build_models(config: TrainConfig, tokenizer) -> dict:
    """Fresh models for ``config`` (initialised from ``config.seed``): the VAE first, then the trained
    ones in optimizer order: UNet and text encoder, or (``sd3``) transformer and two text encoders."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    latent_size = config.image_size // 2 ** (len(config.vae_channels) - 1)
    torch.manual_seed(config.seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=config.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(config.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(config.vae_channels),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=config.vae_norm_groups,
        sample_size=config.image_size,
    )
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.text_width,
        intermediate_size=4 * config.text_width,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        max_position_embeddings=config.max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="quick_gelu",
        projection_dim=config.text_width,
    )
    if config.architecture == "sd3":
        # SD3's text side without T5: two CLIP encoders whose penultimate hidden states are concatenated
        # (the joint-attention context) and whose pooled projections are concatenated (the AdaLN input)
        encoders = {}
        for offset, name in ((1, "text_encoder"), (3, "text_encoder_2")):
            torch.manual_seed(config.seed + offset)
            encoders[name] = CLIPTextModelWithProjection(text_config)
        torch.manual_seed(config.seed + 2)
        transformer = SD3Transformer2DModel(
            sample_size=latent_size,
            patch_size=config.dit_patch_size,
            in_channels=4,
            out_channels=4,
            num_layers=config.dit_layers,
            attention_head_dim=config.dit_head_dim,
            num_attention_heads=config.dit_heads,
            joint_attention_dim=2 * config.text_width,
            caption_projection_dim=config.dit_heads * config.dit_head_dim,
            pooled_projection_dim=2 * config.text_width,
            pos_embed_max_size=latent_size // config.dit_patch_size,
        )
        return {"vae": vae, "transformer": transformer, **encoders}
    torch.manual_seed(config.seed + 1)
    text_encoder = CLIPTextModel(text_config)
    torch.manual_seed(config.seed + 2)
    blocks = len(config.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=config.unet_channels,
        layers_per_block=config.unet_layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * blocks,
        up_block_types=("CrossAttnUpBlock2D",) * blocks,
        cross_attention_dim=config.text_width,
        attention_head_dim=config.unet_heads,
        norm_num_groups=config.unet_norm_groups,
    )
    return {"vae": vae, "text_encoder": text_encoder, "unet": unet}


def noise_schedulers():
    """The training (DDPM) and the shipped sampling (DDIM) schedulers: SD's scaled-linear betas, ε-prediction."""
    from diffusers import DDIMScheduler, DDPMScheduler

    common = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ddpm = DDPMScheduler(**common, prediction_type="epsilon", clip_sample=False)
    ddim = DDIMScheduler(**common, prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return ddpm, ddim


def flow_scheduler(config: TrainConfig):
    """The SD3 sampler (and training convention): flow-matching Euler, 1000 train timesteps = σ·1000."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=config.flow_shift)


class EMA:
    """Exponential moving average of a model's parameters (fp32), with the usual warm-up."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.params = [p.detach().clone().float() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.params, [p.detach().float() for p in model.parameters()], 1 - decay)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for target, value in zip(model.parameters(), self.params):
            target.copy_(value)

    def state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {name: value for (name, _), value in zip(model.named_parameters(), self.params)}

    def load_state_dict(self, model: torch.nn.Module, values: dict[str, torch.Tensor]) -> None:
        self.params = [values[name].clone().float() for name, _ in model.named_parameters()]


# ---------------------------------------------------------------------------------------
# data


def scene_kwargs(config: TrainConfig) -> dict:
    return dict(
        shapes=config.shapes,
        colors=config.colors,
        radius=(config.radius_px[0] / 64, config.radius_px[1] / 64),
        max_rotation=config.max_rotation,
        textured_prob=config.textured_prob,
        held_out="exclude",  # the model is trained on the train split only
    )


def render_batch(
    config: TrainConfig, seeds: Sequence[int], n_objects: int | tuple[int, int]
) -> tuple[torch.Tensor, list[str]]:
    """Rendered training scenes for ``seeds`` as a (B, 3, H, W) tensor in [-1, 1], and their captions."""
    images, captions = [], []
    for s in seeds:
        rng = np.random.default_rng(s)
        scene = sample_scene(rng, n_objects=n_objects, **scene_kwargs(config))
        images.append(render(scene, config.image_size, classes=SHAPES)[0])
        # drawn only when asked for, so configs without colourless captions keep their captions
        name_colors = config.colorless_caption_fraction <= 0 or rng.random() >= config.colorless_caption_fraction
        captions.append(caption(scene, rng, name_colors=name_colors))
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return batch, captions


def tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids exactly as ``StableDiffusionPipeline`` makes them (padded to the tokenizer's max length)."""
    return tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two image batches in [-1, 1]."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).mean().item()
    return 10 * math.log10(1 / max(mse, 1e-12))


# ---------------------------------------------------------------------------------------
# checkpoints (safetensors + JSON, never pickle)


def _swap_in(staging: Path, target: Path) -> None:
    """Replace folder ``target`` by ``staging`` so that a reader never sees a half-written folder for long."""
    old = target.with_name(target.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        target.rename(old)
    staging.rename(target)
    if old.exists():
        shutil.rmtree(old)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


class Trainer:
    """One training run: owns the models, the optimizers, the state and the files."""

    def __init__(
        self, config: TrainConfig, output_dir: Path, export_dir: Path | None, accelerator, threads: int | None
    ):
        self.config = config
        self.output_dir = output_dir
        self.export_dir = export_dir
        self.accelerator = accelerator
        self.threads = threads
        self.tokenizer = build_tokenizer(config)
        models = build_models(config, self.tokenizer)
        self.vae = models.pop("vae")
        # the trained models by their pipeline component names, in optimizer order
        self.models: dict[str, torch.nn.Module] = models
        # the name of stage 3 in the state (and the logs): what it trains
        self.denoiser_stage = "unet" if config.architecture == "unet" else "transformer"
        self.ddpm, self.ddim = noise_schedulers()
        self.state = {"stage": "vae", "vae_step": 0, "step": 0, "vae_psnr": None, "scaling_factor": None,
                      "loss_avg": None, "seconds_per_step": None, "train_seconds": 0.0, "resumed_from": []}
        self.vae_opt = torch.optim.Adam(self.vae.parameters(), lr=config.vae_lr)
        self.opt = torch.optim.AdamW(self.trained_parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.emas = {name: EMA(model, config.ema_decay) for name, model in models.items()}
        self.cache: dict[str, torch.Tensor] | None = None
        self.stop_requested = False
        self.log_file = output_dir / "log.jsonl"

    def trained_parameters(self) -> list[torch.nn.Parameter]:
        return [p for model in self.models.values() for p in model.parameters()]

    def unwrapped(self) -> dict[str, torch.nn.Module]:
        return {name: self.accelerator.unwrap_model(model) for name, model in self.models.items()}

    # -- persistence ------------------------------------------------------------------

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoint"

    def log(self, **record) -> None:
        record = {"time": round(time.time(), 1), **record}
        if self.accelerator.is_main_process:
            with open(self.log_file, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            shown = {"time": time.strftime("%H:%M:%S"), **{k: v for k, v in record.items() if k != "time"}}
            tqdm.write(" ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()))

    def save_checkpoint(self) -> None:
        """Full resumable state into ``<output-dir>/checkpoint`` (fp32 weights, EMA, optimizers)."""
        from safetensors.torch import save_file

        if not self.accelerator.is_main_process:
            return
        staging = self.output_dir / "checkpoint.tmp"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        weights = {f"vae.{k}": v for k, v in self.vae.state_dict().items()}
        for name, model in self.unwrapped().items():
            weights.update({f"{name}.{k}": v for k, v in model.state_dict().items()})
            weights.update({f"ema.{name}.{k}": v for k, v in self.emas[name].state_dict(model).items()})
        save_file({k: v.detach().contiguous() for k, v in weights.items()}, staging / "models.safetensors")
        meta = {}
        for name, optimizer in (("vae_optimizer", self.vae_opt), ("optimizer", self.opt)):
            tensors, meta[name] = _optimizer_tensors(optimizer)
            save_file(tensors, staging / f"{name}.safetensors")
        (staging / "state.json").write_text(
            json.dumps({"state": self.state, "config": self.config.to_dict(), "optimizers": meta}, indent=1)
        )
        _swap_in(staging, self.checkpoint_dir)

    def load_checkpoint(self, folder: Path) -> None:
        from safetensors.torch import load_file

        saved = json.loads((folder / "state.json").read_text())
        self.state.update(saved["state"])
        weights = load_file(folder / "models.safetensors")

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}

        self.vae.load_state_dict(part("vae."))
        for name, model in self.unwrapped().items():
            model.load_state_dict(part(f"{name}."))
            self.emas[name].load_state_dict(model, part(f"ema.{name}."))
        for name, optimizer in (("vae_optimizer", self.vae_opt), ("optimizer", self.opt)):
            _load_optimizer(optimizer, load_file(folder / f"{name}.safetensors"), saved["optimizers"][name])
        if self.state["scaling_factor"] is not None:
            self.vae.register_to_config(scaling_factor=self.state["scaling_factor"])

    def load_export(self, folder: Path) -> None:
        """Continue from a shipped pipeline folder: EMA weights become the weights; the optimizer restarts."""
        from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline

        saved = json.loads((folder / "training_state.json").read_text())
        if self.config.architecture == "sd3":
            pipe = StableDiffusion3Pipeline.from_pretrained(folder, dtype=torch.float32, use_safetensors=True,
                                                            text_encoder_3=None, tokenizer_3=None)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(
                folder, dtype=torch.float32, use_safetensors=True, safety_checker=None, requires_safety_checker=False
            )
        self.vae.load_state_dict(pipe.vae.state_dict())
        self.vae.register_to_config(scaling_factor=pipe.vae.config.scaling_factor)
        for name, model in self.unwrapped().items():
            model.load_state_dict(getattr(pipe, name).state_dict())
            self.emas[name] = EMA(model, self.config.ema_decay)
        self.state.update(saved["state"])
        self.state["stage"] = self.denoiser_stage
        self.state["warmup_from"] = self.state["step"]  # fresh optimizer: warm up again

    def init_from(self, folder: Path) -> None:
        """Start the denoiser stage on another exported ShapesWorld pipeline's VAE (frozen from now on) and
        text encoder (the start of every text encoder here); the VAE stage is skipped."""
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel

        saved = json.loads((folder / "training_state.json").read_text())["state"]
        vae = AutoencoderKL.from_pretrained(folder / "vae", dtype=torch.float32, use_safetensors=True)
        self.vae.load_state_dict(vae.state_dict())
        self.vae.register_to_config(scaling_factor=vae.config.scaling_factor)
        text = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch.float32, use_safetensors=True)
        for name, model in self.unwrapped().items():
            if name.startswith("text_encoder"):
                # a CLIPTextModelWithProjection is a CLIPTextModel (its text_model) plus a fresh projection
                model.text_model.load_state_dict(text.state_dict())
            self.emas[name] = EMA(model, self.config.ema_decay)
        for key in ("vae_step", "vae_psnr", "vae_cpu_seconds"):
            self.state[key] = saved.get(key)
        self.state.update(scaling_factor=vae.config.scaling_factor, stage="cache",
                          init_from=f"{folder.name}@{saved.get('step')}")

    def export(self) -> None:
        """Write the EMA model as an fp16 ``StableDiffusionPipeline`` (``sd3``: ``StableDiffusion3Pipeline``)
        folder into ``--export-dir``."""
        from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline

        from diffuseg.testing import save_clip_tokenizer

        if self.export_dir is None or not self.accelerator.is_main_process:
            return
        models = {name: copy.deepcopy(model) for name, model in self.unwrapped().items()}
        for name, model in models.items():
            self.emas[name].copy_to(model)
        vae = copy.deepcopy(self.vae)
        if self.config.architecture == "sd3":
            # the SD3 pipeline decodes latents / scaling_factor + shift_factor; this VAE's latents are not shifted
            vae.register_to_config(shift_factor=0.0)
            pipe = StableDiffusion3Pipeline(
                vae=vae, **models, tokenizer=self.tokenizer, tokenizer_2=self.tokenizer, scheduler=flow_scheduler(self.config),
                text_encoder_3=None, tokenizer_3=None,
            )
        else:
            pipe = StableDiffusionPipeline(
                vae=vae, **models, tokenizer=self.tokenizer, scheduler=self.ddim, safety_checker=None,
                feature_extractor=None, requires_safety_checker=False,
            )
        pipe.to(torch.float16)
        # the text encoders are tiny and transformers loads them in their saved dtype (diffusers models
        # load in fp32): fp32 here keeps a plain from_pretrained() consistent on CPU
        for name, model in models.items():
            if name.startswith("text_encoder"):
                model.to(torch.float32)
        staging = self.export_dir.with_name("." + self.export_dir.name + ".tmp")
        if staging.exists():
            shutil.rmtree(staging)
        pipe.save_pretrained(staging, safe_serialization=True)
        for name in ("tokenizer", "tokenizer_2"):
            if (staging / name).is_dir():
                save_clip_tokenizer(self.tokenizer, staging / name)
        (staging / "training_state.json").write_text(
            json.dumps({"state": self.state, "config": self.config.to_dict()}, indent=1)
        )
        card = model_card if self.config.architecture == "unet" else dit_model_card
        (staging / "README.md").write_text(card(self.config, self.state))
        # measurements of earlier snapshots are written by hand (benchmarks), not by this script: keep them
        if (self.export_dir / MEASUREMENTS).is_file():
            shutil.copy2(self.export_dir / MEASUREMENTS, staging / MEASUREMENTS)
        (staging / MODEL_DEFAULTS_FILE).write_text(json.dumps(model_settings(self.config), indent=1) + "\n")
        self.export_dir.parent.mkdir(parents=True, exist_ok=True)
        _swap_in(staging, self.export_dir)

    def save(self, reason: str) -> None:
        t0 = time.time()
        self.save_checkpoint()
        if self.state["stage"] in (self.denoiser_stage, "done"):
            self.export()
        self.log(event="saved", reason=reason, stage=self.state["stage"], step=self.state["step"],
                 seconds=round(time.time() - t0, 1))

    # -- stage 1: VAE ---------------------------------------------------------------------

    def train_vae(self) -> None:
        config = self.config
        val_seeds = [int(s) for s in np.random.SeedSequence([config.seed, 99]).generate_state(64)]
        val_images, _ = render_batch(config, val_seeds, (1, 2))
        first_step = self.state["vae_step"]
        start_time, start_cpu = time.time(), time.process_time() - self.state.get("vae_cpu_seconds", 0.0)
        last_save = time.time()
        progress = tqdm(total=config.vae_max_steps, initial=self.state["vae_step"], desc="VAE", mininterval=20,
                        disable=not self.accelerator.is_main_process)
        self.vae.train()
        while self.state["vae_step"] < config.vae_max_steps and not self.stop_requested:
            step = self.state["vae_step"]
            t0 = time.time()
            seeds = [int(s) for s in np.random.SeedSequence([config.seed, 1, step]).generate_state(config.vae_batch)]
            images, _ = render_batch(config, seeds, (1, 2))
            posterior = self.vae.encode(images).latent_dist
            recon = self.vae.decode(posterior.sample()).sample
            loss = F.l1_loss(recon, images) + F.mse_loss(recon, images) + config.vae_kl_weight * posterior.kl().mean()
            self.vae_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.vae_opt.step()
            self.state["vae_step"] = step = step + 1
            self.state["train_seconds"] += time.time() - t0
            progress.update(1)
            # a CPU-time budget, so a busy machine (other jobs, nice 19) gets the same VAE as an idle one
            self.state["vae_cpu_seconds"] = time.process_time() - start_cpu
            done = step >= config.vae_max_steps or self.state["vae_cpu_seconds"] / 60 >= config.vae_max_cpu_minutes
            if step % config.vae_eval_every == 0 or done:
                self.vae.eval()
                with torch.no_grad():
                    value = psnr(self.vae(val_images, sample_posterior=False).sample, val_images)
                self.vae.train()
                self.state["vae_psnr"] = value
                self.log(stage="vae", step=step, loss=loss.item(), psnr=value,
                         cpu_minutes=round(self.state["vae_cpu_seconds"] / 60, 1),
                         seconds_per_step=round((time.time() - start_time) / max(step - first_step, 1), 3))
                progress.set_postfix(psnr=f"{value:.1f}")
                done = done or value >= config.vae_target_psnr
            if done:
                break
            if (time.time() - last_save) / 60 >= config.save_minutes:
                self.save("interval")
                last_save = time.time()
        progress.close()
        if self.stop_requested:
            return
        self.vae.eval()
        # SD's convention: latents are multiplied by 1/std so the diffusion sees unit variance
        with torch.no_grad():
            latents = self.vae.encode(val_images).latent_dist.sample(torch.Generator().manual_seed(config.seed))
        self.state["scaling_factor"] = float(1 / latents.std())
        self.vae.register_to_config(scaling_factor=self.state["scaling_factor"])
        self.state["stage"] = "cache"
        self.log(stage="vae", event="done", psnr=self.state["vae_psnr"], scaling_factor=self.state["scaling_factor"])
        self.save("vae done")

    # -- stage 2: latent cache --------------------------------------------------------------

    def build_cache(self) -> dict[str, torch.Tensor]:
        """Encode the cached scenes with the frozen VAE (deterministic from the seed; rebuilt when missing)."""
        from safetensors.torch import load_file, save_file

        config = self.config
        path = self.output_dir / "latent_cache.safetensors"
        key = {"seed": config.seed, "empty": config.cache_empty, "singles": config.cache_singles,
               "pairs": config.cache_pairs, "colorless_captions": config.colorless_caption_fraction,
               "scaling_factor": self.state["scaling_factor"], "vae_step": self.state["vae_step"],
               "scene": {k: v for k, v in scene_kwargs(config).items()}}
        key_path = path.with_suffix(".json")
        if path.is_file() and key_path.is_file() and json.loads(key_path.read_text()) == json.loads(json.dumps(key)):
            return load_file(path)
        parts: dict[str, list[torch.Tensor]] = {"mean": [], "std": [], "ids": [], "objects": []}
        jobs = [(0, config.cache_empty), (1, config.cache_singles), (2, config.cache_pairs)]
        progress = tqdm(total=sum(n for _, n in jobs), desc="latent cache", mininterval=20,
                        disable=not self.accelerator.is_main_process)
        self.vae.eval()
        for objects, count in jobs:
            for start in range(0, count, config.cache_batch):
                seeds = [int(np.random.SeedSequence([config.seed, 2, objects, i]).generate_state(1)[0])
                         for i in range(start, min(start + config.cache_batch, count))]
                images, captions = render_batch(config, seeds, objects)
                with torch.no_grad():
                    posterior = self.vae.encode(images).latent_dist
                parts["mean"].append(posterior.mean.half())
                parts["std"].append(posterior.std.half())
                parts["ids"].append(tokenize(self.tokenizer, captions).int())
                parts["objects"].append(torch.full((len(seeds),), objects, dtype=torch.int8))
                progress.update(len(seeds))
        progress.close()
        cache = {k: torch.cat(v).contiguous() for k, v in parts.items()}
        if self.accelerator.is_main_process:
            save_file(cache, path)
            key_path.write_text(json.dumps(key))
        return cache

    # -- stage 3: text encoder(s) + UNet or transformer ---------------------------------------

    def pair_fraction(self, step: int) -> float:
        config = self.config
        if step < config.single_only_steps:
            return 0.0
        ramp = min(1.0, (step - config.single_only_steps) / max(config.pair_ramp_steps, 1))
        return config.max_pair_fraction * ramp

    def learning_rate(self, step: int) -> float:
        since = step - self.state.get("warmup_from", 0)
        return self.config.lr * min(1.0, (since + 1) / max(self.config.warmup_steps, 1))

    def hide_after_text(self, hidden: torch.Tensor, ids: torch.Tensor, hide: torch.Tensor,
                        empty_hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` with the end-of-text token and the padding after it replaced by the empty caption's
        (``empty_hidden``, one row) in the rows where ``hide`` is set.

        They see the whole caption (the text encoder is causal): the denoiser can draw every object from
        them, and then the words' attention marks the background, not their objects (measured on the
        UNet at step 3454: 8² maps of every word correlated -0.85 with the object, of the first pads
        +0.87). For a share of the batch they are the empty caption's, so the words must carry their
        objects, as in Stable Diffusion.
        """
        end_of_text = (ids == self.tokenizer.eos_token_id).int().argmax(dim=1, keepdim=True)
        after_text = torch.arange(ids.shape[1], device=ids.device)[None] >= end_of_text
        return torch.where((after_text & hide[:, None].to(ids.device))[..., None], empty_hidden, hidden)

    def unet_loss(self, latents: torch.Tensor, ids: torch.Tensor, empty_ids: torch.Tensor,
                  g: torch.Generator) -> torch.Tensor:
        """DDPM ε-prediction loss (min-SNR-γ weighted) of the UNet on one batch."""
        config = self.config
        text_encoder, unet = self.models["text_encoder"], self.models["unet"]
        noise = torch.randn(latents.shape, generator=g)
        timesteps = torch.randint(0, self.ddpm.config.num_train_timesteps, (len(ids),), generator=g)
        a = self.ddpm.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        hidden = text_encoder(ids)[0]
        hide = torch.rand(len(ids), generator=g) < config.context_dropout
        if hide.any():
            hidden = self.hide_after_text(hidden, ids, hide, text_encoder(empty_ids[None].to(ids.device))[0])
        pred = unet(noisy, timesteps, hidden).sample
        if config.min_snr_gamma:
            # min-SNR-γ weighting (Hang et al. 2023): easy low-noise steps stop dominating, which
            # speeds convergence per step; for ε-prediction the weight is min(SNR, γ) / SNR
            snr = (a / (1 - a)).flatten()
            weight = snr.clamp(max=config.min_snr_gamma) / snr
            return (weight * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        return F.mse_loss(pred, noise)

    def sd3_context(self, ids: torch.Tensor, hide: torch.Tensor, empty_ids: torch.Tensor,
                    t5_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The transformer's text tokens and pooled projection, exactly as ``StableDiffusion3Pipeline``
        builds them without a T5 encoder: both CLIPs' penultimate hidden states side by side, then
        ``t5_tokens`` zero tokens; the two pooled projections side by side."""
        hidden, pooled = [], []
        for name in ("text_encoder", "text_encoder_2"):
            encoder = self.models[name]
            out = encoder(ids, output_hidden_states=True)
            h, p = out.hidden_states[-2], out.text_embeds
            if hide.any():
                empty = encoder(empty_ids[None].to(ids.device), output_hidden_states=True)
                h = self.hide_after_text(h, ids, hide, empty.hidden_states[-2])
                # the pooled projection is read at the end-of-text token: it too sees every object, and it
                # reaches every image token through AdaLN, so it is hidden with the end-of-text token
                p = torch.where(hide[:, None].to(p.device), empty.text_embeds, p)
            hidden.append(h)
            pooled.append(p)
        clip = torch.cat(hidden, dim=-1)
        context = torch.cat([clip, clip.new_zeros(len(ids), t5_tokens, clip.shape[-1])], dim=1)
        return context, torch.cat(pooled, dim=-1)

    def flow_loss(self, latents: torch.Tensor, ids: torch.Tensor, empty_ids: torch.Tensor,
                  g: torch.Generator) -> torch.Tensor:
        """Flow-matching loss of the SD3 transformer on one batch (SD3's rectified flow, unweighted):
        x_σ = (1-σ)·x₀ + σ·ε, target ε - x₀, the velocity ``FlowMatchEulerDiscreteScheduler`` integrates."""
        config = self.config
        n = len(ids)
        noise = torch.randn(latents.shape, generator=g)
        if config.sigma_sampling == "logit_normal":
            # SD3 (Esser et al. 2024): logit-normal(0, 1) puts the steps where the velocity is hardest, mid-σ
            sigmas = torch.sigmoid(torch.randn(n, generator=g))
        else:
            sigmas = torch.rand(n, generator=g)
        # the scheduler's resolution shift, so training and sampling see the same σ distribution
        sigmas = config.flow_shift * sigmas / (1 + (config.flow_shift - 1) * sigmas)
        s = sigmas.view(-1, 1, 1, 1)
        noisy = (1 - s) * latents + s * noise
        hide = torch.rand(n, generator=g) < config.context_dropout
        long_t5 = bool(torch.rand((), generator=g) < config.long_t5_fraction)
        context, pooled = self.sd3_context(ids, hide, empty_ids, PIPELINE_T5_TOKENS if long_t5 else config.t5_tokens)
        pred = self.models["transformer"](noisy, context, pooled, sigmas * 1000).sample
        return F.mse_loss(pred, noise - latents)

    def train_denoiser(self) -> None:
        config = self.config
        cache = self.build_cache()
        singles = torch.nonzero(cache["objects"] == 1).flatten()
        pairs = torch.nonzero(cache["objects"] == 2).flatten()
        empties = torch.nonzero(cache["objects"] == 0).flatten()
        empty_ids = tokenize(self.tokenizer, [""])[0]
        rank = self.accelerator.process_index
        for model in self.models.values():
            model.train()
        loss_fn = self.unet_loss if config.architecture == "unet" else self.flow_loss
        last_save = time.time()
        window_loss, window_start, window_steps = 0.0, time.time(), 0
        progress = tqdm(total=config.max_steps, initial=self.state["step"], desc=self.denoiser_stage, mininterval=30,
                        disable=not self.accelerator.is_main_process)
        while self.state["step"] < config.max_steps and not self.stop_requested:
            step = self.state["step"]
            t0 = time.time()
            # (seed, step, rank) fixes the batch and the noise, so a resumed run continues identically
            step_seed = np.random.SeedSequence([config.seed, 3, step, rank]).generate_state(1)[0]
            g = torch.Generator().manual_seed(int(step_seed))
            n_pairs = int(torch.binomial(torch.tensor(float(config.batch)), torch.tensor(self.pair_fraction(step)),
                                         generator=g).item()) if self.pair_fraction(step) > 0 else 0
            # drawn only when asked for, so runs without empty scenes keep their random stream
            n_empty = int(torch.binomial(torch.tensor(float(config.batch - n_pairs)),
                                         torch.tensor(config.empty_fraction), generator=g).item()
                          ) if config.empty_fraction > 0 and len(empties) else 0
            index = torch.cat([singles[torch.randint(len(singles), (config.batch - n_pairs - n_empty,), generator=g)],
                               pairs[torch.randint(len(pairs), (n_pairs,), generator=g)],
                               empties[torch.randint(len(empties), (n_empty,), generator=g)]])
            mean, std = cache["mean"][index].float(), cache["std"][index].float()
            latents = (mean + std * torch.randn(mean.shape, generator=g)) * self.state["scaling_factor"]
            ids = cache["ids"][index].long()
            drop = torch.rand(len(index), generator=g) < config.caption_dropout
            ids[drop] = empty_ids
            for group in self.opt.param_groups:
                group["lr"] = self.learning_rate(step)
            loss = loss_fn(latents, ids, empty_ids, g)
            if not torch.isfinite(loss):
                self.log(stage=self.denoiser_stage, step=step, event="non-finite loss, batch skipped")
                self.opt.zero_grad(set_to_none=True)
                self.state["step"] = step + 1
                continue
            self.opt.zero_grad(set_to_none=True)
            self.accelerator.backward(loss)
            self.accelerator.clip_grad_norm_(self.trained_parameters(), config.max_grad_norm)
            self.opt.step()
            for name, model in self.unwrapped().items():
                self.emas[name].update(model, step)
            self.state["step"] = step = step + 1
            elapsed = time.time() - t0
            self.state["train_seconds"] += elapsed
            window_loss += loss.item()
            window_steps += 1
            progress.update(1)
            if step % config.log_every == 0:
                avg = window_loss / window_steps
                self.state["loss_avg"] = avg
                self.state["seconds_per_step"] = round((time.time() - window_start) / window_steps, 3)
                self.log(stage=self.denoiser_stage, step=step, loss=avg, lr=self.learning_rate(step),
                         pair_fraction=round(self.pair_fraction(step), 3),
                         seconds_per_step=self.state["seconds_per_step"])
                progress.set_postfix(loss=f"{avg:.4f}")
                window_loss, window_start, window_steps = 0.0, time.time(), 0
            if (time.time() - last_save) / 60 >= config.save_minutes:
                self.save("interval")
                last_save = time.time()
        progress.close()
        if self.state["step"] >= config.max_steps:
            self.state["stage"] = "done"

    def run(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        *prepared, self.opt = self.accelerator.prepare(*self.models.values(), self.opt)
        self.models = dict(zip(self.models, prepared))
        self.log(event="start", stage=self.state["stage"], step=self.state["step"], vae_step=self.state["vae_step"],
                 architecture=self.config.architecture,
                 **{f"{name}_params": sum(p.numel() for p in model.parameters()) for name, model in self.models.items()},
                 vae_params=sum(p.numel() for p in self.vae.parameters()))
        if self.state["stage"] == "done" and self.state["step"] < self.config.max_steps:
            self.state["stage"] = self.denoiser_stage  # resumed with a larger max_steps
        if self.state["stage"] == "vae":
            self.train_vae()
        if self.state["stage"] in ("cache", self.denoiser_stage) and not self.stop_requested:
            self.state["stage"] = self.denoiser_stage
            self.train_denoiser()
        self.save("stop requested" if self.stop_requested else "finished")


SAMPLING_STEPS, SAMPLING_GUIDANCE = 25, 4.0
"""Sampling settings of an export: what its card shows and its ``diffuseg.json`` gives every command."""
SEGMENT_ITEM, SEGMENT_SEPARATOR, SEGMENT_PROMPT, SEGMENT_BACKGROUND = "a {}", " and ", "a picture of {classes}", " on a {}"
"""MaskDiffusion's default caption: "a picture of a circle and a square and a triangle on a background".
Chosen on 120 validation renders (``benchmarks/maskdiffusion_eval.py --split validation``, step-22273
model, background scored): mIoU 38.5, vs 3.1 for the names joined by " and " (the paper's form),
36.2 for "a picture of a circle, a square and a triangle on a background", 33.1 without
"a picture of", 34.5 "a circle with a square and ...", 10.2 with the background as a fourth item."""


def model_settings(config: TrainConfig) -> dict:
    """The export's ``diffuseg.json`` (see :class:`diffuseg.models.ModelDefaults`): settings in the world's grammar.

    MaskDiffusion names the classes the way captions name objects ("a picture of a circle and a
    square on a background", see :data:`SEGMENT_PROMPT`); a counterfactual says "background", the caption of empty scenes,
    and removes an object's colour with its shape ("a red circle" → "a background").
    """
    return {
        "num_inference_steps": SAMPLING_STEPS,
        "guidance_scale": SAMPLING_GUIDANCE,
        "segment_item": SEGMENT_ITEM,
        "segment_separator": SEGMENT_SEPARATOR,
        "segment_prompt": SEGMENT_PROMPT,
        "segment_background": SEGMENT_BACKGROUND,
        "counterfactual_replacement": EMPTY_SCENE_WORD,
        "object_modifiers": list(config.colors),
    }


def model_card(config: TrainConfig, state: dict) -> str:
    """The README.md of the exported pipeline folder: what it is, how it was trained, how to continue."""
    psnr_text = f"{state['vae_psnr']:.1f} dB" if state.get("vae_psnr") is not None else "n/a"
    loss_text = f"{state['loss_avg']:.4f}" if state.get("loss_avg") is not None else "n/a"
    return f"""---
library_name: diffusers
pipeline_tag: text-to-image
tags: [stable-diffusion, shapesworld, diffuseg, tiny]
license: apache-2.0
---

# ShapesWorld tiny Stable Diffusion (embedded default of `diffuseg`)

A Stable-Diffusion-architecture text-to-image model at toy scale, trained by
`python -m diffuseg.shapesworld.train` on rendered ShapesWorld scenes and their captions
only (never on the label maps). It draws {', '.join(config.colors)} {', '.join(config.shapes)}s
at {config.image_size}×{config.image_size} px, one or two per image, or none ("a picture of a background").
The (colour, shape) pairs in `diffuseg.shapesworld.HELD_OUT_PAIRS` never occurred in training.

```python
from diffusers import StableDiffusionPipeline
from diffuseg.models import load_default_model
pipe = load_default_model(StableDiffusionPipeline)          # offline
image = pipe("a red circle and a blue square", num_inference_steps={SAMPLING_STEPS}, guidance_scale={SAMPLING_GUIDANCE},
             height={config.image_size}, width={config.image_size}).images[0]
```

## Recipe

| part | value |
|---|---|
| VAE | `AutoencoderKL` {list(config.vae_channels)}, {config.image_size}² → {config.image_size // 2 ** (len(config.vae_channels) - 1)}²×4, L1+L2+{config.vae_kl_weight:g}·KL, {state.get('vae_step')} steps, PSNR {psnr_text}, scaling factor {state.get('scaling_factor')} |
| text encoder | `CLIPTextModel`, width {config.text_width}, {config.text_layers} layers; CLIP BPE tokenizer of the world's words, max length {config.max_length} |
| UNet | `UNet2DConditionModel` {list(config.unet_channels)}, {config.unet_layers_per_block} layer(s) per block, cross-attention at every resolution |
| objective | DDPM ε-prediction, 1000 steps, scaled-linear betas 0.00085–0.012, min-SNR-γ weighting γ={config.min_snr_gamma}; caption dropout {config.caption_dropout}; end-of-text and padding replaced by the empty caption's for a share {config.context_dropout} of each batch (so the words, not the padding, carry the objects); EMA {config.ema_decay} |
| optimisation | AdamW lr {config.lr}, batch {config.batch}, warm-up {config.warmup_steps}, grad-norm clip {config.max_grad_norm} |
| curriculum | single objects for {config.single_only_steps} steps, then pairs ramped to {config.max_pair_fraction:.0%} over {config.pair_ramp_steps} steps; empty scenes {config.empty_fraction:.0%} of the rest; captions without colours {config.colorless_caption_fraction:.0%}; radius {config.radius_px[0]:g}–{config.radius_px[1]:g} px |
| progress | **{state.get('step')} UNet steps** of {config.max_steps}; recent loss {loss_text}; {state.get('train_seconds', 0) / 3600:.2f} h wall-clock in training steps (shared CPU) |
| weights | EMA weights, safetensors: UNet and VAE fp16 (loaded as fp32), text encoder fp32; sampler: DDIM |
| seed | {config.seed} (full config in `training_state.json`) |

## Continue training

```bash
python -m diffuseg.shapesworld.train --output-dir runs/shapesworld --resume
```

With no checkpoint in `runs/shapesworld`, `--resume` starts from this folder: weights, step
and config from here, a fresh optimizer (warmed up again) and a latent cache rebuilt from
the seed. The script re-exports here every {config.save_minutes:g} minutes.
"""


def dit_model_card(config: TrainConfig, state: dict) -> str:
    """The README.md of an exported ShapesWorld-DiT (``sd3``) folder."""
    loss_text = f"{state['loss_avg']:.4f}" if state.get("loss_avg") is not None else "n/a"
    latent = config.image_size // 2 ** (len(config.vae_channels) - 1)
    width = config.dit_heads * config.dit_head_dim
    return f"""---
library_name: diffusers
pipeline_tag: text-to-image
tags: [stable-diffusion-3, mm-dit, flow-matching, shapesworld, diffuseg, tiny]
license: apache-2.0
---

# ShapesWorld-DiT: a tiny Stable-Diffusion-3-architecture model (embedded in `diffuseg`)

The MM-DiT family at toy scale, trained by `python -m diffuseg.shapesworld.train --architecture sd3`
on rendered ShapesWorld scenes and their captions only, in the latent space of the embedded
ShapesWorld UNet model (same VAE, same world). It draws {', '.join(config.colors)}
{', '.join(config.shapes)}s at {config.image_size}×{config.image_size} px, one or two per image, or none
("a picture of a background"). The (colour, shape) pairs in `diffuseg.shapesworld.HELD_OUT_PAIRS`
never occurred in training.

```python
from diffuseg.models import load_default_model
from diffusers import StableDiffusion3Pipeline
pipe = load_default_model(StableDiffusion3Pipeline, model="shapesworld-dit")   # offline
image = pipe("a red circle and a blue square", num_inference_steps=25, guidance_scale=5.0,
             max_sequence_length={config.t5_tokens}).images[0]
```

## Recipe

| part | value |
|---|---|
| VAE | the embedded UNet model's, frozen ({state.get('init_from') or 'trained here'}): `AutoencoderKL` {list(config.vae_channels)}, {config.image_size}² → {latent}²×4, scaling factor {state.get('scaling_factor')}, shift factor 0 |
| text encoders | `text_encoder` and `text_encoder_2`: `CLIPTextModelWithProjection`, width {config.text_width}, {config.text_layers} layers, both started from the UNet model's text encoder (fresh projections) and trained with the transformer; one CLIP BPE tokenizer of the world's words, max length {config.max_length} |
| no T5 | `text_encoder_3=None`: a T5 adds nothing a world of {len(config.shapes) + len(config.colors)} content words needs (CLIP already gives every word its own token and the pipeline's joint attention sees them all), would be the largest part of the folder, and `StableDiffusion3Pipeline` supports it: it appends `max_sequence_length` zero tokens instead. Training saw {config.t5_tokens} zero tokens, and the pipeline's default {PIPELINE_T5_TOKENS} in {config.long_t5_fraction:.0%} of the steps; pass `max_sequence_length={config.t5_tokens}` (faster) |
| transformer | `SD3Transformer2DModel`: {config.dit_layers} joint-attention blocks, width {width} ({config.dit_heads} heads × {config.dit_head_dim}), patch size {config.dit_patch_size} ({(latent // config.dit_patch_size) ** 2} image tokens, attention maps {latent // config.dit_patch_size}²), joint-attention dim {2 * config.text_width}, pooled dim {2 * config.text_width} |
| objective | flow matching (rectified flow, as SD3): x_σ = (1-σ)·x₀ + σ·ε, velocity target ε - x₀, unweighted MSE; σ {'logit-normal(0, 1)' if config.sigma_sampling == 'logit_normal' else 'uniform'}, shift {config.flow_shift:g}; caption dropout {config.caption_dropout}; end-of-text, padding and pooled projection replaced by the empty caption's for a share {config.context_dropout} of each batch (so the words, not the padding, carry the objects); EMA {config.ema_decay} |
| optimisation | AdamW lr {config.lr}, batch {config.batch}, warm-up {config.warmup_steps}, grad-norm clip {config.max_grad_norm} |
| data | a latent cache of {config.cache_empty} empty, {config.cache_singles} one-object and {config.cache_pairs} two-object scenes of the train split (rebuilt from the seed when missing) |
| curriculum | single objects for {config.single_only_steps} steps, then pairs ramped to {config.max_pair_fraction:.0%} over {config.pair_ramp_steps} steps; empty scenes {config.empty_fraction:.0%} of the rest; captions without colours {config.colorless_caption_fraction:.0%}; radius {config.radius_px[0]:g}–{config.radius_px[1]:g} px |
| progress | **{state.get('step')} transformer steps** of {config.max_steps}; recent loss {loss_text} (flow-matching MSE; not comparable with the UNet's ε loss); {state.get('train_seconds', 0) / 3600:.2f} h wall-clock in training steps (shared CPU, {state.get('seconds_per_step')} s/step) |
| weights | EMA weights, safetensors: transformer and VAE fp16 (loaded as fp32), text encoders fp32; sampler: `FlowMatchEulerDiscreteScheduler` (shift {config.flow_shift:g}) |
| seed | {config.seed} (full config in `training_state.json`) |

## Measured quality

Only what was measured, with the step it was measured at: see `{MEASUREMENTS}` in this folder
(absent: not measured yet). Measure with `python benchmarks/shapesworld_quality.py --model <this folder>`.

## Continue training

```bash
python -m diffuseg.shapesworld.train --architecture sd3 --resume --threads 1
```

With no checkpoint in `runs/shapesworld-dit`, `--resume` starts from this folder: weights, step
and config from here, a fresh optimizer (warmed up again) and a latent cache rebuilt from
the seed. The script re-exports here every {config.save_minutes:g} minutes.
"""


def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    if args.init_from is not None:  # the world, VAE, text encoder and recipe of the model started from
        values = json.loads((args.init_from / "training_state.json").read_text())["config"]
    else:
        values = dict(PRESETS[args.preset])
    if args.architecture is not None:
        values["architecture"] = args.architecture
    if args.config:
        values.update(json.loads(Path(args.config).read_text()))
    for item in args.set or []:
        key, _, raw = item.partition("=")
        values[key] = json.loads(raw)
    return TrainConfig.from_dict(values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m diffuseg.shapesworld.train",
        description=__doc__.split("\n\n")[0],
        epilog="Resuming: --resume continues from <output-dir>/checkpoint, or, if it is missing, from the "
        "pipeline in --export-dir (its training_state.json holds the step and config).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--architecture", choices=ARCHITECTURES, default=None,
                        help="denoiser: 'unet' (SD 1.x, the default) or 'sd3' (MM-DiT, flow matching); "
                        "a resumed run keeps its recorded architecture")
    parser.add_argument("--init-from", type=Path, default=None, metavar="PIPELINE_DIR",
                        help="start a fresh run from this exported ShapesWorld pipeline: its config (the world), "
                        "VAE (frozen; the VAE stage is skipped) and text encoder, e.g. src/diffuseg/assets/shapesworld")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="where checkpoints, the latent cache and log.jsonl go "
                        "(default: runs/shapesworld, or runs/shapesworld-dit for sd3)")
    parser.add_argument("--export-dir", type=Path, default=None,
                        help="where the fp16 pipeline is exported (default: the package's embedded model folder, "
                        f"{ASSET_DIR.name} or, for sd3, {DIT_ASSET_DIR.name})")
    parser.add_argument("--no-export", action="store_true", help="never write the exported pipeline")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="base config: 'default' (the shipped model) or 'micro' (seconds, for tests)")
    parser.add_argument("--config", help="JSON file of config values applied over the preset")
    parser.add_argument("--set", action="append", metavar="KEY=JSON",
                        help="override one config value, e.g. --set max_steps=20000 --set 'shapes=[\"circle\"]'")
    parser.add_argument("--resume", action="store_true",
                        help="continue a run (see below); the recorded config wins over --preset/--config, "
                        "except values given with --set")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice); on a CPU shared with other jobs use 1: "
                        "here 2 OpenMP threads under contention made a VAE step 10x slower than 1 thread")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from accelerate import Accelerator

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.init_from is not None and args.resume:
        parser.error("--init-from starts a fresh run; --resume continues one: pass only one of them")
    config = _config_from_args(args)
    sd3 = (args.architecture or config.architecture) == "sd3"
    output_dir: Path = args.output_dir or Path("runs/shapesworld-dit" if sd3 else "runs/shapesworld")
    export_dir = None if args.no_export else args.export_dir or (DIT_ASSET_DIR if sd3 else ASSET_DIR)
    checkpoint = output_dir / "checkpoint" / "state.json"
    shipped = export_dir / "training_state.json" if export_dir is not None else None
    source = None
    if args.resume:
        if checkpoint.is_file():
            source = ("checkpoint", checkpoint.parent)
        elif shipped is not None and shipped.is_file():
            source = ("export", shipped.parent)
        else:
            raise FileNotFoundError(
                f"--resume: neither {checkpoint} nor {shipped} exists; run once without --resume to start training"
            )
        recorded = json.loads((source[1] / ("state.json" if source[0] == "checkpoint" else "training_state.json"))
                              .read_text())["config"]
        overrides = {item.partition("=")[0]: json.loads(item.partition("=")[2]) for item in args.set or []}
        config = TrainConfig.from_dict({**recorded, **overrides})
        if args.architecture is not None and args.architecture != config.architecture:
            raise ValueError(f"--architecture {args.architecture}: the run in {source[1]} is {config.architecture!r}")
    elif checkpoint.is_file():
        raise FileExistsError(f"{checkpoint} exists: pass --resume to continue it, or choose another --output-dir")
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=1))
        return 0

    output_dir.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator()
    trainer = Trainer(config, output_dir, export_dir, accelerator, args.threads)
    if source is not None:
        (trainer.load_checkpoint if source[0] == "checkpoint" else trainer.load_export)(source[1])
        trainer.state["resumed_from"] = [*trainer.state.get("resumed_from", []), f"{source[0]}@{trainer.state['step']}"]
    elif args.init_from is not None:
        trainer.init_from(args.init_from)
    if accelerator.is_main_process:
        (output_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=1))

    def request_stop(signum, frame):  # finish the current step, save, exit
        trainer.stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    trainer.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
