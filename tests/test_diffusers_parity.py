"""Every text-to-image pipeline of the package behaves as the diffusers pipeline it extends.

Each case runs a pipeline of the package beside its plain diffusers counterpart on the same
tiny components and asserts that the images are equal (to float error) under the checks of
diffusers' own fast tests: string and per-prompt negative prompts, custom timesteps and
sigmas, every scheduler those tests use (stochastic ones included), step-end callbacks,
interrupts, dict/tuple outputs, and a save/load round trip.

A pipeline joins by one entry in ``CASES``: its class, its diffusers counterpart, a function
building tiny components, the arguments it needs beside the prompt (class words), and, for
another model family, that family's schedulers and custom schedules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    FluxPipeline,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from diffuseg.pipelines import (
    CounterfactualFluxPipeline,
    CounterfactualPipeline,
    CounterfactualSD3Pipeline,
    CounterfactualXLPipeline,
    DiffuMaskFluxPipeline,
    DiffuMaskPipeline,
    DiffuMaskSD3Pipeline,
    DiffuMaskXLPipeline,
    FreeMaskEditPipeline,
)
from diffuseg.testing import tiny_components, tiny_flux_components, tiny_sd3_components, tiny_sdxl_components

PROMPTS = ["a photo of a dog", "a cat on the grass"]
CLASS_WORDS = {"a photo of a dog": ["dog"], "a cat on the grass": ["cat", "grass"]}
FAST = dict(height=32, width=32, num_inference_steps=2)
ATOL = 1e-5  # images in [0, 1]: recorded layers compute attention explicitly, the others with SDPA
LATENT_ATOL = 1e-4  # latents are a few units large


@dataclass(frozen=True)
class SchedulerCase:
    """A scheduler built from the pipeline's scheduler config, and the call arguments that go with it."""

    name: str
    make: Callable[[Any], Any]
    call_kwargs: dict = field(default_factory=dict)


# The schedulers of diffusers' Stable Diffusion fast tests; DDIM with eta=1 so that it draws noise too.
SD_SCHEDULERS = (
    SchedulerCase("ddim-eta1", DDIMScheduler.from_config, {"eta": 1.0}),
    SchedulerCase("pndm", lambda config: PNDMScheduler.from_config(config, skip_prk_steps=True)),
    SchedulerCase("lms", LMSDiscreteScheduler.from_config),
    SchedulerCase("euler", EulerDiscreteScheduler.from_config),
    SchedulerCase("euler-ancestral", EulerAncestralDiscreteScheduler.from_config),
    SchedulerCase("dpm++", DPMSolverMultistepScheduler.from_config),
    SchedulerCase("lcm", LCMScheduler.from_config),
)
# Schedules given as such (e.g. Align-Your-Steps), with num_inference_steps=None as diffusers allows;
# Euler's custom sigmas end with the final one, so both are two steps.
SD_CUSTOM_SCHEDULES = (
    SchedulerCase(
        "timesteps", EulerDiscreteScheduler.from_config, {"num_inference_steps": None, "timesteps": [999, 499]}
    ),
    SchedulerCase(
        "sigmas", EulerDiscreteScheduler.from_config, {"num_inference_steps": None, "sigmas": [14.6, 1.5, 0.0]}
    ),
)

ALL_CHECKS = frozenset(
    {"negative_prompt", "negative_prompt_per_prompt", "custom_schedules", "schedulers", "callback", "interrupt",
     "outputs", "save_load"}
)


@dataclass(frozen=True)
class ParityCase:
    """A pipeline of the package and the diffusers pipeline whose images it must reproduce.

    Attributes:
        name: test id.
        pipeline_class: the package's pipeline.
        plain_class: its diffusers counterpart, run on the same components.
        components: tiny components, built once per case.
        arguments: the package pipeline's arguments for a prompt (or list): the prompt under its
            own argument name, and the class words ``CLASS_WORDS`` gives each prompt.
        schedulers, custom_schedules: what the scheduler checks run (the model family's).
        checks: the names in ``ALL_CHECKS`` that apply (all, unless the pipeline lacks an argument).
        callback_batch: how many times the plain batch a step-end callback sees.
        init_kwargs: passed to both classes with the components.
    """

    name: str
    pipeline_class: type
    plain_class: type
    components: Callable[[], dict]
    arguments: Callable[[str | list[str]], dict]
    schedulers: tuple[SchedulerCase, ...] = SD_SCHEDULERS
    custom_schedules: tuple[SchedulerCase, ...] = SD_CUSTOM_SCHEDULES
    checks: frozenset[str] = ALL_CHECKS
    callback_batch: int = 1
    init_kwargs: dict = field(default_factory=dict)

    def pipelines(self, scheduler: SchedulerCase | None = None) -> tuple[Any, Any]:
        """The package pipeline and the plain one on this case's components, with ``scheduler``'s scheduler."""
        if self.name not in _COMPONENTS:
            _COMPONENTS[self.name] = self.components()
        components = _COMPONENTS[self.name]
        make_scheduler = scheduler.make if scheduler is not None else type(components["scheduler"]).from_config
        pipes = []
        for cls in (self.pipeline_class, self.plain_class):
            # Weights shared, a scheduler (stateful) each.
            own_scheduler = make_scheduler(components["scheduler"].config)
            pipe = cls(**{**components, "scheduler": own_scheduler}, **self.init_kwargs)
            pipe.set_progress_bar_config(disable=True)
            pipes.append(pipe)
        return pipes[0], pipes[1]


_COMPONENTS: dict[str, dict] = {}


def words_of(prompt: str | list[str]) -> list[str] | list[list[str]]:
    return CLASS_WORDS[prompt] if isinstance(prompt, str) else [CLASS_WORDS[p] for p in prompt]


def sd_components() -> dict:
    return tiny_components(seed=0)


SD = dict(components=sd_components, plain_class=StableDiffusionPipeline, init_kwargs={"requires_safety_checker": False})
CASES = [
    ParityCase("diffumask", DiffuMaskPipeline, arguments=lambda p: {"prompt": p, "class_names": words_of(p)}, **SD),
    ParityCase(
        "counterfactual",
        CounterfactualPipeline,
        arguments=lambda p: {"prompt": p, "class_names": words_of(p)},
        callback_batch=2,  # the step-end callback sees [positives, counterfactuals]
        **SD,
    ),
    # Free-Mask renders its base images with DiffuMask; with nothing to insert they are the output.
    ParityCase(
        "freemask-base",
        FreeMaskEditPipeline,
        arguments=lambda p: {
            "base_prompt": p, "base_classes": words_of(p), "class_names": ["dog", "cat", "grass"], "objects": [],
        },
        checks=frozenset({"negative_prompt", "schedulers", "outputs", "save_load"}),
        **SD,
    ),
]

# The other families: each DiffuMask variant beside its family's own pipeline, with that family's schedulers.
FLOW_SCHEDULERS = (
    SchedulerCase("flow-euler", FlowMatchEulerDiscreteScheduler.from_config),
    SchedulerCase("flow-heun", FlowMatchHeunDiscreteScheduler.from_config),
)
FLOW_CUSTOM_SCHEDULES = (
    SchedulerCase("sigmas", FlowMatchEulerDiscreteScheduler.from_config, {"num_inference_steps": None, "sigmas": [1.0, 0.6]}),
)
DIFFUMASK_ARGUMENTS = dict(arguments=lambda p: {"prompt": p, "class_names": words_of(p)})
CASES += [
    ParityCase("diffumask-sdxl", DiffuMaskXLPipeline, StableDiffusionXLPipeline, tiny_sdxl_components,
               **DIFFUMASK_ARGUMENTS),
    ParityCase("diffumask-sd3", DiffuMaskSD3Pipeline, StableDiffusion3Pipeline, tiny_sd3_components,
               schedulers=FLOW_SCHEDULERS, custom_schedules=FLOW_CUSTOM_SCHEDULES, **DIFFUMASK_ARGUMENTS),
    # FLUX-dev is guidance-distilled: a negative prompt counts only with true_cfg_scale, not checked here.
    ParityCase("diffumask-flux", DiffuMaskFluxPipeline, FluxPipeline, tiny_flux_components,
               schedulers=FLOW_SCHEDULERS[:1], custom_schedules=FLOW_CUSTOM_SCHEDULES,
               checks=ALL_CHECKS - {"negative_prompt", "negative_prompt_per_prompt"}, **DIFFUMASK_ARGUMENTS),
    # The counterfactual's positives, beside the family's own pipeline; its callbacks see both halves.
    ParityCase("counterfactual-sdxl", CounterfactualXLPipeline, StableDiffusionXLPipeline, tiny_sdxl_components,
               callback_batch=2, **DIFFUMASK_ARGUMENTS),
    ParityCase("counterfactual-sd3", CounterfactualSD3Pipeline, StableDiffusion3Pipeline, tiny_sd3_components,
               schedulers=FLOW_SCHEDULERS, custom_schedules=FLOW_CUSTOM_SCHEDULES, callback_batch=2,
               **DIFFUMASK_ARGUMENTS),
    ParityCase("counterfactual-flux", CounterfactualFluxPipeline, FluxPipeline, tiny_flux_components,
               schedulers=FLOW_SCHEDULERS[:1], custom_schedules=FLOW_CUSTOM_SCHEDULES, callback_batch=2,
               checks=ALL_CHECKS - {"negative_prompt", "negative_prompt_per_prompt"}, **DIFFUMASK_ARGUMENTS),
]


def cases_with(check: str) -> list:
    return [pytest.param(case, id=case.name) for case in CASES if check in case.checks]


def schedules_of(check: str) -> list:
    """``(case, scheduler)`` for the cases with ``check``, whose attribute of that name lists the schedulers."""
    return [
        pytest.param(case, schedule, id=f"{case.name}-{schedule.name}")
        for case in CASES
        if check in case.checks
        for schedule in getattr(case, check)
    ]


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images_of(output) -> np.ndarray:
    images = output[0] if isinstance(output, tuple) else output.images
    return images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)


def assert_same_images(ours, plain) -> None:
    np.testing.assert_allclose(images_of(ours), images_of(plain), rtol=0, atol=ATOL)


# ----------------------------------------------------------------------------- negative prompts
NEGATIVE_PROMPTS = [
    # (id, prompt, negative_prompt, num_images_per_prompt, check)
    ("one-prompt", PROMPTS[0], "blurry", 1, "negative_prompt"),
    ("one-negative-for-all", PROMPTS, "blurry", 1, "negative_prompt"),
    ("one-negative-per-prompt", PROMPTS, ["blurry", "dark"], 2, "negative_prompt_per_prompt"),
]


@pytest.mark.parametrize(
    "case, prompt, negative_prompt, images_per_prompt",
    [
        pytest.param(case, prompt, negative, images, id=f"{case.name}-{name}")
        for case in CASES
        for name, prompt, negative, images, check in NEGATIVE_PROMPTS
        if check in case.checks
    ],
)
def test_negative_prompts(case, prompt, negative_prompt, images_per_prompt):
    ours, plain = case.pipelines()
    extra = {"num_images_per_prompt": images_per_prompt} if images_per_prompt > 1 else {}
    out = ours(**case.arguments(prompt), negative_prompt=negative_prompt, generator=generator(), output_type="np",
               **extra, **FAST)
    # diffusers wants a list of negative prompts beside a list of prompts; the package takes either.
    as_plain = negative_prompt
    if isinstance(prompt, list) and isinstance(negative_prompt, str):
        as_plain = [negative_prompt] * len(prompt)
    expected = plain(prompt, negative_prompt=as_plain, generator=generator(), output_type="np", **extra, **FAST)
    assert_same_images(out, expected)
    without = plain(prompt, generator=generator(), output_type="np", **extra, **FAST)
    assert not np.allclose(images_of(expected), images_of(without), atol=1e-3)  # the negative prompt mattered


# ----------------------------------------------------------------------------- schedules and schedulers
@pytest.mark.parametrize("case, schedule", schedules_of("custom_schedules"))
def test_custom_timesteps_and_sigmas(case, schedule):
    ours, plain = case.pipelines(schedule)
    kwargs = {**FAST, "output_type": "np", **schedule.call_kwargs}
    out = ours(**case.arguments(PROMPTS[0]), generator=generator(), **kwargs)
    assert_same_images(out, plain(PROMPTS[0], generator=generator(), **kwargs))
    assert ours.num_timesteps == plain.num_timesteps == 2


@pytest.mark.parametrize("case, scheduler", schedules_of("schedulers"))
def test_every_scheduler(case, scheduler):
    # Two images from one generator: the noise stochastic samplers draw at each step is drawn for the batch.
    ours, plain = case.pipelines(scheduler)
    kwargs = {**FAST, "output_type": "np", **scheduler.call_kwargs}
    out = ours(**case.arguments(PROMPTS), generator=generator(1), **kwargs)
    assert_same_images(out, plain(PROMPTS, generator=generator(1), **kwargs))


# ----------------------------------------------------------------------------- callbacks and interrupts
@pytest.mark.parametrize("case", cases_with("callback"))
def test_callback_on_step_end(case):
    ours, plain = case.pipelines()

    def recorder(seen):
        def callback(pipe, step, timestep, tensors):
            seen.append((step, int(timestep), tensors["latents"].clone()))
            # What a callback returns is used: halve the latents after the first step.
            return {"latents": tensors["latents"] * 0.5} if step == 0 else tensors

        return callback

    ours_seen, plain_seen = [], []
    out = ours(**case.arguments(PROMPTS), generator=generator(), output_type="np",
               callback_on_step_end=recorder(ours_seen), callback_on_step_end_tensor_inputs=["latents"], **FAST)
    expected = plain(PROMPTS, generator=generator(), output_type="np", callback_on_step_end=recorder(plain_seen),
                     callback_on_step_end_tensor_inputs=["latents"], **FAST)
    assert_same_images(out, expected)
    assert [(s, t) for s, t, _ in ours_seen] == [(s, t) for s, t, _ in plain_seen]
    for (_, _, latents), (_, _, reference) in zip(ours_seen, plain_seen):
        assert latents.shape[0] == case.callback_batch * reference.shape[0]
        torch.testing.assert_close(latents[: reference.shape[0]], reference, rtol=0, atol=LATENT_ATOL)


@pytest.mark.parametrize("case", cases_with("interrupt"))
def test_interrupt(case):
    ours, plain = case.pipelines()
    intermediate = []

    def keep(pipe, step, timestep, tensors):
        intermediate.append(tensors["latents"].clone())
        return tensors

    def interrupt(pipe, step, timestep, tensors):
        if step == 0:
            pipe._interrupt = True
        return tensors

    kwargs = dict(output_type="latent", **FAST)
    full = ours(**case.arguments(PROMPTS[0]), generator=generator(), callback_on_step_end=keep, **kwargs)
    out = ours(**case.arguments(PROMPTS[0]), generator=generator(), callback_on_step_end=interrupt, **kwargs)
    expected = plain(PROMPTS[0], generator=generator(), callback_on_step_end=interrupt, **kwargs)
    np.testing.assert_allclose(images_of(out), images_of(expected), rtol=0, atol=LATENT_ATOL)
    # The latents the step-end callback saw at the interrupted step, not those of the full run.
    np.testing.assert_allclose(images_of(out), intermediate[0][:1].numpy(), rtol=0, atol=LATENT_ATOL)
    assert not np.allclose(images_of(out), images_of(full), atol=1e-3)


# ----------------------------------------------------------------------------- outputs and loading
@pytest.mark.parametrize("case", cases_with("outputs"))
def test_dict_and_tuple_outputs(case):
    ours, plain = case.pipelines()
    kwargs = dict(output_type="np", **FAST)
    as_dict = ours(**case.arguments(PROMPTS[0]), generator=generator(), **kwargs)
    as_tuple = ours(**case.arguments(PROMPTS[0]), generator=generator(), return_dict=False, **kwargs)
    assert isinstance(as_tuple, tuple) and not isinstance(as_dict, tuple)
    expected = plain(PROMPTS[0], generator=generator(), **kwargs)
    assert_same_images(as_dict, expected)
    assert_same_images(as_tuple, expected)


@pytest.mark.parametrize("case", cases_with("save_load"))
def test_save_and_load_round_trip(case, tmp_path):
    ours, plain = case.pipelines()
    ours.save_pretrained(tmp_path, safe_serialization=True)
    loaded = case.pipeline_class.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is case.pipeline_class
    kwargs = dict(output_type="np", **FAST)
    expected = plain(PROMPTS[0], generator=generator(), **kwargs)
    assert_same_images(loaded(**case.arguments(PROMPTS[0]), generator=generator(), **kwargs), expected)
