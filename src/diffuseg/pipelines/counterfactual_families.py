"""Counterfactual pairs (MagicSeg) on SDXL and SD3/SD3.5: each family's own pipeline, plus masks and counterfactuals.

The method is the one of :mod:`diffuseg.pipelines.counterfactual`
(:class:`~diffuseg.pipelines.counterfactual.CounterfactualMixin`); a family contributes its
pipeline (how the denoiser is driven) and how its latents become pixels. SDXL's UNet is read
as SD's (:mod:`diffuseg.backends.unet`: both CLIP encoders share the 77 positions, so the
injection's token alignment is the first tokenizer's). SD3's joint attention is read and
edited by :mod:`diffuseg.backends.mmdit`: the counterfactual takes the positive's share of
each text token in the joint softmax (CLIP positions, then T5 positions, each aligned by its
own tokenizer), keeping its own text share per image token::

    pipe = CounterfactualXLPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0")
    out = pipe("a photo of a dog on the grass", class_names=["dog"])
    out.images, out.negative_images, out.masks
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusion3Pipeline, StableDiffusionXLPipeline

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
        latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
        image = self.vae.decode(latents, return_dict=False)[0]
        return self.image_processor.postprocess(image, output_type="pt")
