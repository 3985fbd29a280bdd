"""diffuseg Space: the four pipelines and a dataset browser in one Gradio app.

Every tab is one small function over its pipeline. All pipelines share one set of model
components (``Pipeline.from_pipe``), loaded once per model. The default model is the
embedded ShapesWorld model, so the Space runs on a free CPU Space without network; any
other Stable Diffusion checkpoint comes from ``--model``, the ``DIFFUSEG_MODEL``
environment variable or the Model box.

    python spaces/app.py                                   # http://127.0.0.1:7860
    python spaces/app.py --model path/to/sd-folder --port 8000 --dataset my-synth-set

A public Space must not be a window onto its server: the dataset browser opens only the
datasets it was started with (``--dataset``, repeatable; Hub ids too with
``--allow-hub-datasets``), the Model box offers only the models it was started with
(``--model``, ``--models``), every input is bounded (sizes, steps, text, uploads), a
generation stops at a deadline, and error messages name no server file.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the Space must not need the network

import gradio as gr
import numpy as np
import PIL.Image
import torch

from diffuseg.models import DEFAULT_MODEL, load_pipeline
from diffuseg.pipelines import (
    CounterfactualPipeline,
    DiffuMaskPipeline,
    FreeMaskEditPipeline,
    FreeMaskObject,
    MaskDiffusionSegPipeline,
)
from diffuseg.shapesworld import make_sample
from diffuseg.visualize import overlay, palette

logger = logging.getLogger("diffuseg.space")

BACKGROUND = "background"
# Every event that runs the model shares one queue: the pipelines share one UNet, whose
# attention processors a run swaps in and out.
MODEL_QUEUE = "model"
MAX_BROWSER_SAMPLES = 48
MIN_DISPLAY_SIDE = 256  # overlays of smaller images are enlarged so that their legend is readable
IMAGE_HEIGHT = 320  # display height of image boxes
# Bounds of every request: what one user may ask of the shared model queue.
MAX_SIZE = 1024  # image side, px
MAX_STEPS = 100
MAX_GUIDANCE = 30.0
MAX_TEXT = 1000  # characters of any text input
MAX_UPLOAD_PIXELS = 4096 * 4096
MAX_UPLOAD = "25mb"  # request bodies (Gradio's max_file_size)
MAX_QUEUE = 32  # waiting requests; more are turned away at once
REQUEST_SECONDS = 300.0  # a generation past this many seconds stops between denoising steps
# Small model outputs (64 px) fill their boxes, with crisp pixels, rather than sitting in a corner.
CSS = ".enlarge img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }"


@dataclass
class Recipe:
    """Defaults and pre-filled examples that suit a model."""

    steps: int
    guidance: float
    diffumask: list[list]  # [prompt, class words]
    freemask: list[list]  # [base prompt, base class words, objects]
    counterfactual: list[list]  # [prompt, class words, phrases removed with them, replacement]
    maskdiffusion: list[list[str]]  # [class names, caption naming them ("" for the names joined by " and ")]


SHAPES_RECIPE = Recipe(
    steps=25,
    guidance=4.0,
    diffumask=[["a red circle and a blue square", "circle, square"], ["a green triangle", "triangle"],
               ["a yellow square next to a purple circle", "square, circle"]],
    freemask=[["a red circle", "circle", "square: a blue square"],
              ["a green triangle", "triangle", "circle: a yellow circle\nsquare: an orange square"]],
    # the colour goes with the shape, and "background" is how the model's empty scenes are captioned
    counterfactual=[["a picture of a green triangle", "triangle", "green triangle", "background"],
                    ["a red circle", "circle", "red circle", "background"]],
    maskdiffusion=[["circle, square, triangle, background",
                    "a picture of a circle and a square and a triangle on a background"],
                   ["circle, square, triangle", "a picture of a circle and a square and a triangle"],
                   ["circle, square, triangle, background", ""]],
)
PHOTO_RECIPE = Recipe(
    steps=30,
    guidance=7.5,
    diffumask=[["a photo of a dog on the grass", "dog, grass"], ["a photo of a cat on a sofa", "cat, sofa"]],
    freemask=[["a photo of a dog on the grass", "dog", "cat: a photo of a cat"],
              ["a photo of a car on a road", "car", "dog: a photo of a dog\nbird: a photo of a bird"]],
    counterfactual=[["a photo of a dog on the grass", "dog", "", "nothing"],
                    ["a photo of a red car on a road", "car", "red car", "empty road"]],
    maskdiffusion=[["dog, cat, grass", "a photo of a dog and a cat on the grass"], ["dog, cat, background", ""]],
)


def recipe_for(model: str) -> Recipe:
    """ShapesWorld's captions for the embedded model, everyday photos for any other checkpoint."""
    return SHAPES_RECIPE if model == DEFAULT_MODEL else PHOTO_RECIPE


# --------------------------------------------------------------------------- models
@dataclass
class Pipelines:
    """The four pipelines of one model, sharing its components."""

    diffumask: DiffuMaskPipeline
    freemask: FreeMaskEditPipeline
    counterfactual: CounterfactualPipeline
    maskdiffusion: MaskDiffusionSegPipeline

    @property
    def native_size(self) -> int:
        """The image side the model was trained at."""
        return self.diffumask.unet.config.sample_size * self.diffumask.vae_scale_factor


class ModelCache:
    """Loads a model once and builds every pipeline from its components; keeps the last model used."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._name: str | None = None
        self._pipelines: Pipelines | None = None

    def get(self, model: str) -> Pipelines:
        with self._lock:
            if model != self._name:
                self._name, self._pipelines = None, None  # free the previous model before loading
                device = "cuda" if torch.cuda.is_available() else "cpu"
                base = load_pipeline(DiffuMaskPipeline, model, device=device)
                self._pipelines = Pipelines(
                    diffumask=base,
                    freemask=FreeMaskEditPipeline.from_pipe(base),
                    counterfactual=CounterfactualPipeline.from_pipe(base),
                    maskdiffusion=MaskDiffusionSegPipeline.from_pipe(base),
                )
                self._name = model
            return self._pipelines


# --------------------------------------------------------------------------- helpers
def readable_errors(fn: Callable) -> Callable:
    """Turn any exception of a handler into a ``gr.Error``: the page shows a message, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except torch.cuda.OutOfMemoryError:
            raise gr.Error("out of memory: choose a smaller image size or fewer objects") from None
        except TimeoutError as error:
            raise gr.Error(str(error)) from None
        except OSError:  # files of the server: their names and existence stay in the log
            logger.exception("handler %s failed", fn.__name__)
            raise gr.Error("a file this request needs is not available on this server") from None
        except (ValueError, KeyError) as error:  # bad input: the message says what to change
            logger.info("rejected input: %s", error)
            raise gr.Error(str(error).strip("'\"")) from None
        except Exception:
            logger.exception("handler %s failed", fn.__name__)  # the traceback goes to the log only
            raise gr.Error("internal error (the server's log has the details)") from None

    return wrapper


def check_request(names: Sequence[str], values: Sequence) -> None:
    """Refuse inputs beyond the Space's bounds (sliders bound the page, not a scripted request)."""
    bounds = {"size": (32, MAX_SIZE), "steps": (1, MAX_STEPS), "guidance": (0.0, MAX_GUIDANCE)}
    for name, value in zip(names, values):
        if name in bounds and value is not None and not bounds[name][0] <= float(value) <= bounds[name][1]:
            raise ValueError(f"{name} must be between {bounds[name][0]} and {bounds[name][1]}, got {value}")
        if isinstance(value, str) and len(value) > MAX_TEXT:
            raise ValueError(f"{name} is {len(value)} characters long; at most {MAX_TEXT}")
        if isinstance(value, np.ndarray) and value.ndim >= 2 and value.shape[0] * value.shape[1] > MAX_UPLOAD_PIXELS:
            raise ValueError(f"the image has {value.shape[1]}x{value.shape[0]} pixels; at most {MAX_UPLOAD_PIXELS:,}")


def request_deadline(seconds: float = REQUEST_SECONDS) -> Callable:
    """A ``callback_on_step_end`` that stops a generation once ``seconds`` have passed."""
    end = time.monotonic() + seconds

    def callback(pipe, step, timestep, tensors):
        if time.monotonic() > end:
            raise TimeoutError(f"stopped after {seconds:.0f} s: choose fewer steps or a smaller image")
        return tensors

    return callback


def parse_words(text: str | None) -> list[str]:
    """Comma-separated class words, stripped, empty ones dropped, duplicates removed in order."""
    return list(dict.fromkeys(w.strip() for w in (text or "").split(",") if w.strip()))


def parse_objects(text: str | None) -> list[FreeMaskObject]:
    """One object per line: ``word`` or ``word: prompt``."""
    objects = []
    for line in (text or "").splitlines():
        word, _, prompt = line.partition(":")
        if word.strip():
            objects.append(FreeMaskObject(word.strip(), prompt=prompt.strip() or None))
    if not objects:
        raise ValueError("name at least one object to insert, one per line: `word` or `word: prompt`")
    return objects


def seeded(seed: float | None) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed or 0))


def fit_to_size(image: np.ndarray, size: int) -> PIL.Image.Image:
    """``image`` resized so that its longer side is ``size``, both sides multiples of 8."""
    picture = PIL.Image.fromarray(np.asarray(image)).convert("RGB")
    scale = size / max(picture.size)
    width, height = (max(8, round(side * scale / 8) * 8) for side in picture.size)
    return picture.resize((width, height), PIL.Image.Resampling.LANCZOS)


def legend_overlay(
    image, label_map: np.ndarray, names: Sequence[str], background_id: int | None = 0
) -> PIL.Image.Image:
    """:func:`diffuseg.visualize.overlay` of an image enlarged (nearest) to at least 256 px, so the legend fits."""
    picture, labels = PIL.Image.fromarray(np.asarray(image)).convert("RGB"), np.asarray(label_map)
    factor = -(-MIN_DISPLAY_SIDE // max(picture.size))
    if factor > 1:
        picture = picture.resize((picture.width * factor, picture.height * factor), PIL.Image.Resampling.NEAREST)
        labels = labels.repeat(factor, axis=0).repeat(factor, axis=1)
    return overlay(picture, labels, names, background_id=background_id)


def hex_colour(rgb: np.ndarray) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(c) for c in rgb))


def annotated(image, label_map: np.ndarray, names: Sequence[str], skip: Sequence[int] = (0,)) -> gr.AnnotatedImage:
    """``image`` with a mask per id present in ``label_map`` (id ``k`` is ``names[k]``; ``skip``: not shown).

    Colours are :func:`diffuseg.visualize.palette`'s, as in :func:`diffuseg.visualize.overlay`.
    """
    labels = np.asarray(label_map)
    present = [int(k) for k in np.unique(labels) if k < len(names) and k not in skip]
    masks = [((labels == k).astype(np.float32), names[k]) for k in present]
    colours = {name: hex_colour(rgb) for name, rgb in zip(names, palette(len(names)))}
    return gr.AnnotatedImage((image, masks), color_map=colours)


_HEAT = np.array([[13, 8, 135], [126, 3, 168], [204, 71, 120], [248, 149, 64], [240, 249, 33]], dtype=np.float32)


def heatmap(values: np.ndarray | torch.Tensor, normalise: bool = False) -> PIL.Image.Image:
    """A ``(H, W)`` map in [0, 1] (or any range with ``normalise``) as a dark-blue-to-yellow picture."""
    values = np.asarray(values, dtype=np.float32)
    if normalise:
        low, high = float(values.min()), float(values.max())
        values = (values - low) / (high - low) if high > low else np.zeros_like(values)
    stops = np.linspace(0.0, 1.0, len(_HEAT))
    v = np.clip(values, 0.0, 1.0)
    rgb = np.stack([np.interp(v, stops, _HEAT[:, c]) for c in range(3)], axis=-1)
    return PIL.Image.fromarray(rgb.round().astype(np.uint8))


# --------------------------------------------------------------------------- the tabs
def diffumask_tab(pipes: Pipelines, prompt: str, words: str, size: int, steps: int, guidance: float, seed: float,
                  threshold: str, refine: bool):
    """Prompt and class words → image with its label mask, a legend overlay, and each word's soft map."""
    names = parse_words(words)
    out = pipes.diffumask(
        prompt, class_names=names, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
        generator=seeded(seed), threshold=threshold, refine=refine, callback_on_step_end=request_deadline(),
    )
    image, mask = out.images[0], np.asarray(out.masks[0])
    legend = [BACKGROUND, *names]
    soft = [(heatmap(out.attention_maps[0][k]), word) for k, word in enumerate(names)]
    return annotated(image, mask, legend), legend_overlay(image, mask, legend), soft


def freemask_tab(pipes: Pipelines, source: str, base_prompt: str, base_words: str, upload, objects_text: str,
                 mode: str, check: bool, size: int, steps: int, guidance: float, seed: float):
    """A base image (generated or uploaded) and objects → edited image, instances, label overlay, report."""
    objects = parse_objects(objects_text)
    if source == "generate":
        base_names = parse_words(base_words)
        names = list(dict.fromkeys([*base_names, *(o.class_name for o in objects)]))
        base = dict(base_prompt=base_prompt, base_classes=base_names, height=size, width=size)
    else:
        if upload is None:
            raise ValueError("upload a base image, or choose `generate` as the base")
        names = list(dict.fromkeys(o.class_name for o in objects))
        picture = fit_to_size(upload, size)
        base = dict(image=picture, label_map=np.zeros((picture.height, picture.width), dtype=np.uint8))
    out = pipes.freemask(
        objects=objects, class_names=names, mode=mode, num_inference_steps=steps, guidance_scale=guidance,
        generator=seeded(seed), **base, **({} if check else dict(min_coverage=0.0, max_leak=1.0, max_retries=0)),
    )
    image, labels = out.images[0], np.asarray(out.masks[0])
    instances = [
        (mask.astype(np.float32), f"{record.class_name} {k + 1}")
        for k, (mask, record) in enumerate(zip(out.instance_masks[0], out.inserted[0]))
    ]
    lines = [f"**{len(out.inserted[0])} inserted, {len(out.rejected[0])} rejected**"]
    lines += [f"- inserted {r.class_name} after {r.attempts} attempt(s), box {r.box}" for r in out.inserted[0]]
    lines += [f"- rejected {r.class_name}: {r.reason}" for r in out.rejected[0]]
    legend = [BACKGROUND, *names]
    return (image, instances), legend_overlay(image, labels, legend), "\n".join(lines)


def counterfactual_tab(pipes: Pipelines, prompt: str, words: str, phrases: str, replacement: str, size: int,
                       steps: int, guidance: float, seed: float):
    """Prompt and class words → the image, the same scene without them, the mask and where they differ."""
    names = parse_words(words)
    out = pipes.counterfactual(
        prompt, class_names=names, remove_phrases=parse_words(phrases) if phrases.strip() else None,
        replacement=replacement or None, height=size, width=size,
        num_inference_steps=steps, guidance_scale=guidance, generator=seeded(seed),
        callback_on_step_end=request_deadline(),
    )
    image, mask = out.images[0], np.asarray(out.masks[0])
    agreement = f"Agreement of the two mask signals (IoU of attention and difference): **{out.agreement[0]:.2f}**"
    return image, out.negative_images[0], annotated(image, mask, [BACKGROUND, *names]), \
        heatmap(out.difference_maps[0]), agreement


def maskdiffusion_tab(pipes: Pipelines, image, words: str, caption: str, size: int, seed: float):
    """A real image, class names and an optional caption naming them → segmentation overlay,
    per-class score maps and a score table."""
    if image is None:
        raise ValueError("upload an image to segment")
    names = parse_words(words)
    background = BACKGROUND in names
    classes = [n for n in names if n != BACKGROUND]  # "background" becomes the pipeline's background prompt
    out = pipes.maskdiffusion(
        image, classes, prompt=caption.strip() or None, background_prompt=BACKGROUND if background else None,
        generator=seeded(seed),
        max_side=size,
    )
    segmentation, scores = np.asarray(out.segmentation[0]), np.asarray(out.scores[0])
    legend = [*classes, BACKGROUND] if background else classes
    picture = PIL.Image.fromarray(np.asarray(image)).convert("RGB")
    table = [
        [name, round(100.0 * float((segmentation == k).mean()), 1),
         round(float(scores[k][segmentation == k].mean()), 3) if (segmentation == k).any() else None]
        for k, name in enumerate(legend)
    ]
    maps = [(heatmap(scores[k], normalise=True), name) for k, name in enumerate(legend)]
    return annotated(picture, segmentation, legend, skip=()), maps, table


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class DatasetCatalog:
    """The datasets the browser may open: folders and Hub ids given at start, by name.

    A folder is listed under its own name, never its path; with ``allow_hub`` any Hub id
    (``owner/name``) opens too, but never a path of the server (a Hub id that is also a
    local path is refused).
    """

    def __init__(self, datasets: Sequence[str] = (), allow_hub: bool = False) -> None:
        self.allow_hub = allow_hub
        self.sources: dict[str, str] = {}
        for source in datasets:
            base = source if HUB_ID.match(source) and not os.path.exists(source) else os.path.basename(
                os.path.normpath(os.path.expanduser(source)))
            name, k = base, 2
            while name in self.sources:
                name, k = f"{base}-{k}", k + 1
            self.sources[name] = os.path.expanduser(source)

    @property
    def names(self) -> list[str]:
        return list(self.sources)

    def resolve(self, name: str) -> str:
        """The folder or Hub id behind ``name``; ``ValueError`` (naming only what is offered) otherwise."""
        name = (name or "").strip()
        if name in self.sources:
            return self.sources[name]
        if self.allow_hub and HUB_ID.match(name) and ".." not in name and not os.path.exists(name):
            return name
        offered = ", ".join(self.names) or "none"
        hub = " or a Hub id (owner/name)" if self.allow_hub else ""
        raise ValueError(f"this Space does not offer that dataset; choose one of: {offered}{hub}")


def browse_dataset(catalog: DatasetCatalog, name: str, split: str, count: int):
    """A dataset the catalog offers → overlays of its first samples, and how often each class occurs."""
    from datasets import load_dataset

    path = catalog.resolve(name)
    split = (split or "").strip() or "train"
    if not re.fullmatch(r"\w+", split):
        raise ValueError(f"split names are letters, digits and underscores, got {split!r}")
    try:
        dataset = load_dataset(path, split=split)
    except Exception:  # the reason may name server files: it goes to the log only
        logger.exception("could not load dataset %r split %r", name, split)
        raise ValueError(f"could not open split {split!r} of dataset {name!r}") from None
    missing = {"image", "label", "classes"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"{name!r} is not a diffuseg dataset: it has no {sorted(missing)} column(s)")
    names = dataset.features["classes"].feature.names  # ["background", *classes]: ids equal label values
    images_per_class = np.bincount(
        np.concatenate([np.asarray(c, dtype=np.int64) for c in dataset["classes"]] or [np.zeros(0, np.int64)]),
        minlength=len(names),
    )
    shown = dataset.select(range(min(int(count), len(dataset), MAX_BROWSER_SAMPLES)))
    gallery, pixels = [], np.zeros(len(names), dtype=np.int64)
    negatives = "negative_image" in dataset.column_names
    for row in shown:
        labels = np.asarray(row["label"])
        pixels += np.bincount(labels[labels < len(names)].ravel(), minlength=len(names))
        gallery.append((legend_overlay(row["image"], labels, names), row.get("prompt") or ""))
        if negatives:
            gallery.append((row["negative_image"], f"counterfactual of: {row.get('prompt') or ''}"))
    table = [
        [name, int(images_per_class[k]) if k else None, round(100.0 * pixels[k] / max(1, pixels.sum()), 1)]
        for k, name in enumerate(names)
    ]
    summary = (f"**{len(dataset)}** samples in split `{split}`, {len(names) - 1} classes; showing {len(shown)} "
               "(pixel shares are over the samples shown).")
    return gallery, table, summary


# --------------------------------------------------------------------------- the app
def image_box(label: str, elem_id: str, *, enlarge: bool = False, **kwargs) -> gr.Image:
    """An image box of the page's height; ``enlarge``: small images fill it (see ``CSS``)."""
    kwargs.setdefault("format", "png")  # results are shown losslessly
    return gr.Image(label=label, height=IMAGE_HEIGHT, elem_id=elem_id, elem_classes="enlarge" if enlarge else None,
                    **kwargs)


def annotated_box(label: str, elem_id: str) -> gr.AnnotatedImage:
    return gr.AnnotatedImage(label=label, format="png", elem_id=elem_id)


def gallery_box(label: str, elem_id: str, **kwargs) -> gr.Gallery:
    return gr.Gallery(label=label, columns=6, height="auto", fit_columns=False, elem_id=elem_id, **kwargs)


def build_demo(
    model: str | None = None,
    *,
    size: int | None = None,
    steps: int | None = None,
    dataset: str | Sequence[str] | None = None,
    models: Sequence[str] = (),
    allow_hub_datasets: bool = False,
    cache: ModelCache | None = None,
) -> gr.Blocks:
    """The Space's ``gr.Blocks``.

    Args:
        model: the model to start with: ``"shapesworld"`` (embedded), a pipeline folder or a
            Hub id (default: ``$DIFFUSEG_MODEL``, else the embedded model).
        size: default image side (default: the model's native size).
        steps: default number of denoising steps (default: the model's recipe).
        dataset: the dataset folder(s) or Hub id(s) the browser offers, the first pre-selected;
            it opens no other.
        models: further models the Model box offers (the start model and the embedded one
            always are); it loads no other.
        allow_hub_datasets: the browser also opens any Hub dataset id.
        cache: where models are loaded (default: a new :class:`ModelCache`); the model is
            loaded now, and a failure is shown on the page rather than raised.

    Launch it with ``css=CSS`` (as :func:`main` does) for enlarged small images.
    """
    model = model or os.environ.get("DIFFUSEG_MODEL") or DEFAULT_MODEL
    allowed_models = list(dict.fromkeys([model, DEFAULT_MODEL, *models]))
    catalog = DatasetCatalog([dataset] if isinstance(dataset, str) else list(dataset or ()), allow_hub_datasets)
    cache = cache or ModelCache()
    recipe = recipe_for(model)
    try:
        native, problem = cache.get(model).native_size, None
    except Exception:  # the page still opens: another model can be chosen there
        logger.exception("the start model %r could not be loaded", model)
        native = 512
        problem = "⚠️ The start model could not be loaded (see the server log). Choose another in the Model box."
    size = size or native

    def with_model(tab: Callable) -> Callable:
        """``tab`` with the model box's value as its first input, loaded into pipelines, and a progress bar.

        Gradio finds a ``gr.Progress`` default only among named positional parameters, so the
        handler declares ``(model, <tab's inputs>, progress)`` as its signature and receives
        the progress tracker positionally, last.
        """

        def handler(model_name: str, *args):
            *inputs, progress = args
            if model_name not in allowed_models:
                raise ValueError(f"this Space does not offer that model; choose one of: {', '.join(allowed_models)}")
            check_request(names, inputs)
            progress(0, desc=f"loading {model_name}")
            pipes = cache.get(model_name)
            progress(0, desc="running")
            return tab(pipes, *inputs)

        parameters = list(inspect.signature(tab).parameters.values())[1:]
        names = [parameter.name for parameter in parameters]
        handler.__signature__ = inspect.Signature([
            inspect.Parameter("model_name", inspect.Parameter.POSITIONAL_OR_KEYWORD),
            *parameters,
            inspect.Parameter(
                "progress", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=gr.Progress(track_tqdm=True)
            ),
        ])
        handler.__name__ = handler.__qualname__ = tab.__name__
        return readable_errors(handler)

    # A validation render (never a test image) with two shapes that the embedded model's MaskDiffusion labels
    # right with its default caption (a blue square and an orange circle); it still calls many squares circles.
    examples_image = np.asarray(make_sample("validation", 6, size=size)["image"])
    with gr.Blocks(title="diffuseg") as demo:
        gr.Markdown(
            "# diffuseg\nSegmentation data from text-to-image diffusion models, and training-free segmentation. "
            "The default model is the tiny embedded **ShapesWorld** model (coloured shapes, 64 px): "
            "prompts such as *a red circle and a blue square*."
        )
        if problem:
            gr.Markdown(problem, elem_id="model-problem")
        with gr.Row():
            model_box = gr.Dropdown(
                choices=allowed_models, value=model, allow_custom_value=False, label="Model",
                info="the models this Space offers", elem_id="model",
            )
            size_box = gr.Slider(32, MAX_SIZE, value=size, step=8, label="Image size (px)", elem_id="size")
            steps_box = gr.Slider(1, MAX_STEPS, value=steps or recipe.steps, step=1, label="Denoising steps")
            guidance_box = gr.Slider(1.0, 15.0, value=recipe.guidance, step=0.5, label="Guidance scale")
            seed_box = gr.Number(value=0, precision=0, label="Seed")
        sampling = [size_box, steps_box, guidance_box, seed_box]

        with gr.Tab("DiffuMask"):
            with gr.Row():
                with gr.Column():
                    dm_prompt = gr.Textbox(recipe.diffumask[0][0], label="Prompt", elem_id="diffumask-prompt")
                    dm_words = gr.Textbox(recipe.diffumask[0][1], elem_id="diffumask-words",
                                          label="Class words (comma-separated, each in the prompt)")
                    with gr.Row():
                        dm_threshold = gr.Dropdown(["otsu", "adaptive"], value="otsu", label="Threshold")
                        dm_refine = gr.Checkbox(False, label="Refine with self-attention")
                    dm_run = gr.Button("Generate", variant="primary", elem_id="diffumask-run")
                    gr.Examples(recipe.diffumask, [dm_prompt, dm_words])
                with gr.Column():
                    dm_annotated = annotated_box("Image and mask", "diffumask-annotated")
                    dm_overlay = image_box("Mask overlay", "diffumask-overlay")
            dm_soft = gallery_box("Soft attention maps", "diffumask-soft")
            dm_run.click(
                with_model(diffumask_tab), [model_box, dm_prompt, dm_words, *sampling, dm_threshold, dm_refine],
                [dm_annotated, dm_overlay, dm_soft], concurrency_id=MODEL_QUEUE,
            )

        with gr.Tab("Free-Mask"):
            with gr.Row():
                with gr.Column():
                    fm_source = gr.Radio(["generate", "upload"], value="generate", label="Base image",
                                         elem_id="freemask-source")
                    fm_prompt = gr.Textbox(recipe.freemask[0][0], label="Base prompt")
                    fm_words = gr.Textbox(recipe.freemask[0][1], label="Class words of the base prompt")
                    fm_upload = image_box("Base image", "freemask-upload", enlarge=True, visible=False)
                    fm_objects = gr.Textbox(recipe.freemask[0][2], lines=3, elem_id="freemask-objects",
                                            label="Objects to insert: one per line, `word` or `word: prompt`")
                    fm_mode = gr.Radio(["edit", "paste"], value="edit", label="Insertion",
                                       info="edit: blended latent diffusion; paste: generate, paste, harmonise")
                    fm_check = gr.Checkbox(True, label="Consistency check", elem_id="freemask-check",
                                           info="retry, then reject, insertions whose mask misses their region")
                    fm_run = gr.Button("Insert objects", variant="primary", elem_id="freemask-run")
                    gr.Examples(recipe.freemask, [fm_prompt, fm_words, fm_objects])
                with gr.Column():
                    fm_annotated = annotated_box("Result with its instances", "freemask-annotated")
                    fm_overlay = image_box("Label map overlay", "freemask-overlay")
                    fm_report = gr.Markdown(elem_id="freemask-report")
            fm_source.change(
                lambda source: [gr.update(visible=source == "generate")] * 2 + [gr.update(visible=source == "upload")],
                fm_source, [fm_prompt, fm_words, fm_upload], queue=False,
            )
            fm_run.click(
                with_model(freemask_tab),
                [model_box, fm_source, fm_prompt, fm_words, fm_upload, fm_objects, fm_mode, fm_check, *sampling],
                [fm_annotated, fm_overlay, fm_report], concurrency_id=MODEL_QUEUE,
            )

        with gr.Tab("Counterfactual"):
            with gr.Row():
                cf_prompt = gr.Textbox(recipe.counterfactual[0][0], label="Prompt", scale=3)
                cf_words = gr.Textbox(recipe.counterfactual[0][1], label="Class words to remove", scale=2)
                cf_phrases = gr.Textbox(recipe.counterfactual[0][2], label="Phrases removed with them", scale=2,
                                        placeholder="e.g. red car: what describes the object goes too")
                cf_replacement = gr.Textbox(recipe.counterfactual[0][3], label="Replaced by", scale=1)
            cf_run = gr.Button("Generate the pair", variant="primary", elem_id="counterfactual-run")
            gr.Examples(recipe.counterfactual, [cf_prompt, cf_words, cf_phrases, cf_replacement])
            with gr.Row():
                cf_positive = image_box("Positive", "counterfactual-positive", enlarge=True)
                cf_negative = image_box("Counterfactual", "counterfactual-negative", enlarge=True)
                cf_mask = annotated_box("Mask", "counterfactual-mask")
                cf_difference = image_box("Difference map", "counterfactual-difference", enlarge=True)
            cf_agreement = gr.Markdown(elem_id="counterfactual-agreement")
            cf_run.click(
                with_model(counterfactual_tab), [model_box, cf_prompt, cf_words, cf_phrases, cf_replacement, *sampling],
                [cf_positive, cf_negative, cf_mask, cf_difference, cf_agreement], concurrency_id=MODEL_QUEUE,
            )

        with gr.Tab("MaskDiffusion"):
            with gr.Row():
                with gr.Column():
                    md_image = image_box("Image to segment", "maskdiffusion-image", enlarge=True, value=examples_image)
                    md_words = gr.Textbox(recipe.maskdiffusion[0][0], elem_id="maskdiffusion-words",
                                          label="Class names (comma-separated; `background` adds a background class)")
                    md_caption = gr.Textbox(recipe.maskdiffusion[0][1], elem_id="maskdiffusion-caption",
                                            label="Caption naming every class (optional; empty: the model's own form, "
                                                  "else the names joined by 'and'). A model reads words best in "
                                                  "captions like its own.")
                    md_run = gr.Button("Segment", variant="primary", elem_id="maskdiffusion-run")
                    gr.Examples([[examples_image, *example] for example in recipe.maskdiffusion],
                                [md_image, md_words, md_caption])
                with gr.Column():
                    md_annotated = annotated_box("Segmentation", "maskdiffusion-annotated")
                    md_table = gr.Dataframe(headers=["class", "pixels (%)", "mean score"], label="Per-class scores",
                                            elem_id="maskdiffusion-table")
            md_scores = gallery_box("Score maps (cosine similarity to each class prototype)", "maskdiffusion-scores")
            md_run.click(
                with_model(maskdiffusion_tab), [model_box, md_image, md_words, md_caption, size_box, seed_box],
                [md_annotated, md_scores, md_table], concurrency_id=MODEL_QUEUE,
            )

        with gr.Tab("Dataset browser"):
            with gr.Row():
                db_path = gr.Dropdown(catalog.names, value=(catalog.names or [None])[0], label="Dataset", scale=3,
                                      allow_custom_value=allow_hub_datasets, elem_id="dataset-path",
                                      info="the datasets this Space offers" + (" or a Hub id" if allow_hub_datasets else ""))
                db_split = gr.Textbox("train", label="Split", scale=1)
                db_count = gr.Slider(1, MAX_BROWSER_SAMPLES, value=12, step=1, label="Samples shown", scale=1)
            db_run = gr.Button("Open", variant="primary", elem_id="dataset-run")
            db_summary = gr.Markdown(elem_id="dataset-summary")
            with gr.Row():
                db_gallery = gallery_box("Samples with their masks", "dataset-gallery", scale=3, object_fit="contain")
                db_counts = gr.Dataframe(headers=["class", "images", "pixels (%)"], label="Class counts", scale=1,
                                         elem_id="dataset-counts")
            def browse(name: str, split: str, count: int):
                check_request(["name", "split", "count"], [name, split, count])
                return browse_dataset(catalog, name, split, min(int(count), MAX_BROWSER_SAMPLES))

            db_run.click(
                readable_errors(browse), [db_path, db_split, db_count], [db_gallery, db_counts, db_summary],
                api_name="browse_dataset",
            )
    return demo


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the diffuseg Gradio app.")
    parser.add_argument("--model", help="model to start with: 'shapesworld' (embedded), a pipeline folder or a Hub id "
                        "(default: $DIFFUSEG_MODEL, else the embedded model)")
    parser.add_argument("--host", help="address to listen on (default: Gradio's, 127.0.0.1 or $GRADIO_SERVER_NAME)")
    parser.add_argument("--port", type=int, help="port (default: Gradio's, 7860 or $GRADIO_SERVER_PORT)")
    parser.add_argument("--size", type=int, help="default image side in pixels (default: the model's native size)")
    parser.add_argument("--steps", type=int, help="default number of denoising steps (default: the model's recipe)")
    parser.add_argument("--dataset", action="append", default=os.environ.get("DIFFUSEG_DATASETS", "").split(),
                        metavar="FOLDER_OR_ID", help="a dataset folder or Hub id the Dataset browser offers (repeat for "
                        "several; also $DIFFUSEG_DATASETS, space-separated); it opens no other")
    parser.add_argument("--allow-hub-datasets", action="store_true",
                        help="the Dataset browser also opens any Hub dataset id a visitor types")
    parser.add_argument("--models", nargs="+", default=os.environ.get("DIFFUSEG_MODELS", "").split(), metavar="MODEL",
                        help="further models the Model box offers (pipeline folders or Hub ids; also $DIFFUSEG_MODELS, "
                        "space-separated); it loads no other")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    demo = build_demo(args.model, size=args.size, steps=args.steps, dataset=args.dataset, models=args.models,
                      allow_hub_datasets=args.allow_hub_datasets)
    demo.queue(max_size=MAX_QUEUE).launch(server_name=args.host, server_port=args.port, show_error=False, css=CSS,
                                          max_file_size=MAX_UPLOAD)


if __name__ == "__main__":
    main()
