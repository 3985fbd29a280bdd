"""Counterfactual pairs (MagicSeg) on SDXL, SD3/SD3.5 and FLUX.1: each family's own pipeline, plus masks and
counterfactuals.

The method is the one of :mod:`diffuseg.pipelines.counterfactual`
(:class:`~diffuseg.pipelines.counterfactual.CounterfactualMixin`); a family contributes its
pipeline (how the denoiser is driven) and how its latents become pixels. SDXL's UNet is read
as SD's (:mod:`diffuseg.backends.unet`: both CLIP encoders share the 77 positions, so the
injection's token alignment is the first tokenizer's). SD3's joint attention is read and
edited by :mod:`diffuseg.backends.mmdit`: the counterfactual takes the positive's share of
each text token in the joint softmax (CLIP positions, then T5 positions, each aligned by its
own tokenizer), keeping its own text share per image token; FLUX's likewise, over its T5
positions, on its 2×2-packed latents::

    pipe = CounterfactualXLPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0")
    out = pipe("a photo of a dog on the grass", class_names=["dog"])
    out.images, out.negative_images, out.masks
"""

from __future__ import annotations

import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionXLPipeline
from diffusers.utils.torch_utils import randn_tensor

from diffuseg.pipelines.counterfactual import CounterfactualMixin


class CounterfactualXLPipeline(CounterfactualMixin, StableDiffusionXLPipeline):
    """Stable Diffusion XL that returns each image with its mask and a counterfactual without the object.

    Accepts every argument of ``StableDiffusionXLPipeline`` (``prompt_2``, ``negative_prompt_2``,
    ``original_size``, ``denoising_end``, ...) and the counterfactual's (see
    :meth:`~diffuseg.pipelines.counterfactual.CounterfactualMixin.__call__`).
    ``CounterfactualXLPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0")`` or
    ``custom_pipeline=diffuseg.community_pipeline("counterfactual_xl")``.
    """

    def decode_to_pixels(self, latents: torch.Tensor, generator=None) -> torch.Tensor:
        """Decoded images ``(B, 3, H, W)`` in [0, 1], as ``StableDiffusionXLPipeline`` decodes them.

        The VAE runs in float32 where its config asks (SDXL's VAE overflows in float16), the
        latents are denormalised with the VAE's mean and std where it has them, and the
        pipeline's invisible watermark, if any, is applied.
        """
        needs_upcasting = self.vae.dtype == torch.float16 and self.vae.config.force_upcast
        if needs_upcasting:
            self.upcast_vae()
            latents = latents.to(next(iter(self.vae.post_quant_conv.parameters())).dtype)
        config = self.vae.config
        if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
            mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / config.scaling_factor + mean
        else:
            latents = latents / config.scaling_factor
        image = self.vae.decode(latents, return_dict=False)[0]
        if needs_upcasting:
            self.vae.to(dtype=torch.float16)
        if self.watermark is not None:
            image = self.watermark.apply_watermark(image)
        return self.image_processor.postprocess(image, output_type="pt")


class CounterfactualSD3Pipeline(CounterfactualMixin, StableDiffusion3Pipeline):
    """Stable Diffusion 3 / 3.5 that returns each image with its mask and a counterfactual without the object.

    Accepts every argument of ``StableDiffusion3Pipeline`` (``prompt_2``, ``prompt_3``,
    ``negative_prompt_2``, ``negative_prompt_3``, ``max_sequence_length``, ``sigmas``, ...) and the
    counterfactual's. The patch grid is the one map level, so the default injects no
    self-attention (``self_attention_resolutions`` names the grid's height to inject it);
    ``resolutions`` is not used. Works without the T5 encoder.
    ``CounterfactualSD3Pipeline.from_pretrained("stabilityai/stable-diffusion-3.5-medium")`` or
    ``custom_pipeline=diffuseg.community_pipeline("counterfactual_sd3")``.
    """

    def decode_to_pixels(self, latents: torch.Tensor, generator=None) -> torch.Tensor:
        """Decoded images ``(B, 3, H, W)`` in [0, 1], as ``StableDiffusion3Pipeline`` decodes them."""
        return decode_shifted_latents(self, latents)


class CounterfactualFluxPipeline(CounterfactualMixin, FluxPipeline):
    """FLUX.1 that returns each image with its mask and a counterfactual without the object.

    Accepts every argument of ``FluxPipeline`` (``prompt_2`` for T5, ``guidance_scale`` as the
    distilled guidance embedding, ``max_sequence_length``, ``sigmas``, ...) and the
    counterfactual's. FLUX runs guidance-distilled, one pass per step: true classifier-free
    guidance (``true_cfg_scale > 1`` with a ``negative_prompt``) runs the negative prompt as a
    separate pass, which the injection does not follow, and is refused. As on SD3, the patch
    grid is the one map level. ``latents`` are FLUX's packed ones.
    ``CounterfactualFluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev")`` or
    ``custom_pipeline=diffuseg.community_pipeline("counterfactual_flux")``.
    """

    def initial_noise(self, images, height, width, generator, latents) -> torch.Tensor:
        """The positives' packed initial latents, drawn as ``FluxPipeline`` draws them."""
        if latents is not None:
            return latents
        if isinstance(generator, list) and len(generator) != images:
            raise ValueError(f"got {len(generator)} generators for {images} images; give one per image, or one in all")
        channels = self.transformer.config.in_channels // 4
        # Packing needs even latent sides.
        latent_height = 2 * (int(height) // (self.vae_scale_factor * 2))
        latent_width = 2 * (int(width) // (self.vae_scale_factor * 2))
        dtype = self.text_encoder_2.dtype if self.text_encoder_2 is not None else self.transformer.dtype
        noise = randn_tensor(
            (images, channels, latent_height, latent_width),
            generator=generator,
            device=self._execution_device,
            dtype=dtype,
        )
        return self._pack_latents(noise, images, channels, latent_height, latent_width)

    def unpack_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return self._unpack_latents(latents, height, width, self.vae_scale_factor)

    def decode_to_pixels(self, latents: torch.Tensor, generator=None) -> torch.Tensor:
        """Decoded images ``(B, 3, H, W)`` in [0, 1], as ``FluxPipeline`` decodes them."""
        return decode_shifted_latents(self, latents)

    def check_family_inputs(self, negative_prompt, kwargs) -> None:
        if negative_prompt is not None and kwargs.get("true_cfg_scale", 1.0) > 1:
            raise ValueError(
                "CounterfactualFluxPipeline runs FLUX guidance-distilled (one pass per step); true_cfg_scale > 1 "
                "with a negative_prompt runs a separate negative pass the injection does not follow: leave "
                "true_cfg_scale at 1 or drop the negative_prompt"
            )


def decode_shifted_latents(pipe, latents: torch.Tensor) -> torch.Tensor:
    """SD3's and FLUX's decoding: latents unscaled and shifted, decoded, mapped to [0, 1]."""
    latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    image = pipe.vae.decode(latents, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="pt")
