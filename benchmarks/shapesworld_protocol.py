"""ShapesWorld protocol: the papers' experiments, end to end, on the embedded model, over several seeds.

    python benchmarks/shapesworld_protocol.py                   # default: 5 seeds, sized to fit 60 min on 2 CPU cores
    python benchmarks/shapesworld_protocol.py --size quick      # smoke run, 2 seeds
    python benchmarks/shapesworld_protocol.py --seeds 10 --images-per-class 1000 --train-steps 8000 \\
        --accelerate "--multi_gpu --num_processes 4"            # scaled up on GPUs

Every stage is a command a user would type (``diffuseg generate / train / evaluate``,
``benchmarks/maskdiffusion_eval.py``), run in a subprocess and listed in the results file; the
whole list runs once per seed (``--seeds``; seed n renders the real data, generates the sets,
trains every segmenter and seeds MaskDiffusion), and every figure is mean ± sd over the seeds:

1. snapshot the model into the work dir (the embedded model is re-exported while it trains;
   every stage uses the snapshot), render the "real" ShapesWorld data (train / validation / test)
   and cut the test split into scenes with and without a held-out colour-shape pair;
2. synthetic sets from DiffuMask, Free-Mask and Counterfactual (``diffuseg generate``), with
   prompts that leave the held-out pairs out as the real train split does (like for like), and
   one DiffuMask set with every pair;
3. mask quality: against the geometry the recogniser reads from each generated image (with the
   share it reads), and against an oracle segmenter trained on rendered data;
4. the same small segmenter trained on real, on each synthetic set, and on real + each set
   (equal budgets), scored once on rendered test data and on its two parts;
5. zero-shot: ``--unseen-classes`` ignored in the real training labels, kept in the synthetic
   sets; seen / unseen / harmonic mIoU;
6. MagicSeg: counterfactual sets trained with and without the counterfactual loss;
   ``--counterfactual-sweep W ...`` adds one run per weight scored on the *validation* split;
7. ablations of the papers' components, each scored on the validation split: DiffuMask raw
   (Otsu) → + adaptive threshold → + refinement → + noise-learning filter → + mosaic → + prompt
   diversity; Free-Mask edit vs paste mode and its filter;
8. MaskDiffusion, training-free, on the rendered test images: with and without background
   handling, and unsupervised (k chosen per image, one cluster-label matching for the split),
   beside the oracle (k and matching from each image's labels).

At ``--size default`` the preset's generated images, training steps and MaskDiffusion images are
scaled down until a time model fitted to measured stage times predicts every seed fits
``--time-budget`` (60 min); the results file says which sizes ran.

Resumable: each stage leaves a record under ``WORK/stages/``; a rerun skips the stages whose
command and inputs are unchanged and resumes the others (the commands themselves resume).
Changing a setting reruns the stages it reaches, after clearing their outputs. Delete
``WORK/model`` to take a new snapshot of the model (everything then reruns).

The results file (default ``benchmarks/RESULTS.md``) is written entirely from this run's
records: tables, targets, commands, seeds, machine, per-stage times, and an estimate of the
default size's run time from the measured stage times.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from diffuseg.shapesworld import ModelWorld, model_world
from diffuseg.training import COUNTERFACTUAL_LOSSES

PIPELINES = ("diffumask", "freemask", "counterfactual")
PIPELINE_TITLES = {"diffumask": "DiffuMask", "freemask": "Free-Mask", "counterfactual": "Counterfactual"}
# Chosen on rendered validation (100 images, seed 0; floor 0.5): mIoU 38.6 without the presence
# decision, 39.9 / 40.8 / 41.7 / 40.3 at min class share 0.05 / 0.08 / 0.12 / 0.2.
MASKDIFFUSION_PRESENCE = ["--attention-floor", "0.5", "--min-class-share", "0.12"]
MASKDIFFUSION_MODES = {
    # mode: (title, background word (None: unsupervised), further arguments)
    "background": ("open vocabulary, background word, presence decided", "background", MASKDIFFUSION_PRESENCE),
    "no-background": ("open vocabulary, background not scored", "", []),
    "clusters": ("unsupervised, k by silhouette, one cluster-label matching for the split", None, ["--clusters", "auto"]),
    "oracle-clusters": ("oracle: k = labels in image, clusters matched per image", None, ["--clusters", "gt"]),
}
"""MaskDiffusion rows; those titled "oracle" read the test labels and are no target."""
ALL_PAIRS_SET = "diffumask-allpairs"
"""The DiffuMask set whose prompts use every colour-shape pair (the other sets leave the held-out ones out)."""
TEST_PARTS = ("heldout", "seen")
"""Splits of the test parts folder: scenes with a held-out colour-shape pair, and the others."""
_DM = ["--threshold", "adaptive"]
ABLATIONS: list[tuple[str, str, str, list[str], str | None]] = [
    # (set key, pipeline, row title, generate flags, set whose segmenter is the agreement model (None: no filter))
    ("diffumask", "diffumask", "DiffuMask raw: cross-attention, Otsu", [], None),
    ("dm-adaptive", "diffumask", "+ adaptive threshold", _DM, None),
    ("dm-refine", "diffumask", "+ refinement (self-attention)", _DM + ["--refine"], None),
    ("dm-filter", "diffumask", "+ noise-learning filter (keep the best 30% by agreement)",
     _DM + ["--refine", "--agreement-keep", "0.3"], "dm-refine"),
    ("dm-mosaic", "diffumask", "+ mosaic 2×2", _DM + ["--refine", "--agreement-keep", "0.3", "--mosaic", "2"], "dm-refine"),
    ("dm-diverse", "diffumask", "+ prompt diversity (30% two-class prompts)",
     _DM + ["--refine", "--agreement-keep", "0.3", "--mosaic", "2", "--two-class-fraction", "0.3"], "dm-refine"),
    ("freemask", "freemask", "Free-Mask, edit mode (the object generated in its region)", [], None),
    ("fm-paste", "freemask", "Free-Mask, paste mode (generated alone, pasted, harmonised)", ["--freemask-mode", "paste"], None),
    ("fm-filter", "freemask", "Free-Mask, edit mode + filter (agreement IoU ≥ 0.5)", ["--agreement-min-iou", "0.5"],
     "synth-freemask"),
]
"""The papers' components, one row each, scored on validation. A filter's segmenter is the one trained on
the previous row's set (DiffuMask's noise learning trains on the synthetic data itself; no real label)."""
SYNTHETIC_OVER_REAL_BAR = 0.9
UNSEEN_OVER_SEEN_BAR = 0.8
MASKDIFFUSION_BAR = 0.6
DIFFUMASK_VOC_RATIO = 0.74  # DiffuMask's synthetic-only / real-only mIoU on VOC (57.4 / 77.3)


def _short_path(path: Path) -> Path:
    """``path`` relative to the working directory when it lies below it (shorter commands)."""
    try:
        return path.resolve().relative_to(Path.cwd())
    except ValueError:
        return path.resolve()


SCRIPT_DIR = _short_path(Path(__file__).parent)


@dataclass(frozen=True)
class Size:
    """How much work each stage does; ``--size`` picks one, the scale flags override fields."""

    images_per_class: int
    real_train_size: int
    real_val_size: int
    real_test_size: int
    train_steps: int
    oracle_steps: int
    gen_steps: int = 25
    maskdiffusion_images: int | None = None
    """Test images MaskDiffusion segments (None: the whole test split)."""


DEFAULT_SEEDS = {"quick": 2, "default": 5}
DEFAULT_BUDGET_MINUTES = 60.0
"""`--size default` must run in an hour on 2 CPU cores, every seed included."""

SIZES: dict[str, Size] = {
    "quick": Size(images_per_class=8, real_train_size=200, real_val_size=50, real_test_size=50,
                  train_steps=200, oracle_steps=400),
    "default": Size(images_per_class=200, real_train_size=1000, real_val_size=200, real_test_size=500,
                    train_steps=1500, oracle_steps=3000),
}


@dataclass
class Settings:
    """Everything that decides the commands of a protocol run."""

    work_dir: Path
    size_name: str
    size: Size
    seeds: tuple[int, ...] = (0,)
    """One full run per seed (rendering, generation, training, MaskDiffusion noise); figures are mean ± sd."""
    time_budget_minutes: float | None = None
    """The sizes were scaled from the preset so that every seed's stages fit this (None: the preset as is)."""
    image_size: int | None = None
    """Segmenter input side; default: the model's image size."""
    batch_size: int = 16
    learning_rate: float = 2e-3
    gen_batch_size: int = 4
    unseen_classes: tuple[str, ...] = ("triangle",)
    accelerate: str | None = None
    """Arguments of ``accelerate launch`` for generate / train / evaluate (None: plain ``diffuseg``)."""
    device: str | None = None
    """MaskDiffusion device (None: the script's default)."""
    model_source: str = "shapesworld"
    """The ``--model`` the snapshot was taken from."""
    counterfactual_loss: str = "embedding"
    """``diffuseg train --counterfactual-loss`` of the runs with counterfactual data."""
    counterfactual_weight: float = 1.0
    """Its weight in the test runs (MagicSeg's is 1); choose it with ``counterfactual_sweep``."""
    counterfactual_sweep: tuple[float, ...] = ()
    """Weights each trained on the Counterfactual set alone and scored on rendered validation (0 is always added)."""


@dataclass
class Stage:
    """One command of the protocol.

    ``units`` measure its work (images, steps) for run-time estimates; ``outputs`` are what it
    writes (cleared before it reruns with other settings); ``inputs`` name the stages whose
    outputs it reads; ``report`` is a JSON file the command writes (else its last stdout line
    that is a JSON object is the result, if any).
    """

    name: str
    kind: str
    argv: list[str]
    units: float
    outputs: list[Path] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    report: Path | None = None
    datasets: list[Path] = field(default_factory=list)
    """Training data it reads: an empty one (a filter kept nothing) skips the stage and those after it that need it."""


@dataclass
class Record:
    """What a stage left: its fingerprint, time, result, and whether this invocation ran it."""

    name: str
    fingerprint: str
    seconds: float
    result: Any = None
    reused: bool = False
    skipped: bool = False


# =====================================================================================
# the model snapshot


def caption_naming(shapes: Sequence[str], background_word: str) -> str:
    """A caption in the world's own grammar naming every shape (and the background word).

    The small text encoder reads a word well only where captions put it: a bare "circle and
    square" puts a shape right after the start token, where no training caption has one, and
    that word's attention then marks everything but the circle.
    """
    caption = "a picture of " + " and ".join(f"a {shape}" for shape in shapes)
    return f"{caption} on a {background_word}" if background_word else caption


def folder_digest(folder: Path) -> str:
    """A hash of every file under ``folder`` (names and bytes)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def snapshot_model(model: str, target: Path, attempts: int = 5) -> bool:
    """Copy the pipeline folder of ``model`` to ``target`` unless a snapshot is there; True if copied.

    The source may be swapped for a new export while it is copied: a copy is kept only when the
    source's ``training_state.json`` is the same before and after it.
    """
    from diffuseg.models import resolve_model

    if (target / "model_index.json").is_file():
        return False
    source = Path(resolve_model(model))
    if not source.is_dir():
        raise FileNotFoundError(f"--model {model!r} is not a local pipeline folder; the protocol snapshots a folder")
    state = source / "training_state.json"

    def stamp() -> bytes:
        return state.read_bytes() if state.is_file() else b""

    staging = target.with_name(target.name + ".partial")
    for _ in range(attempts):
        shutil.rmtree(staging, ignore_errors=True)
        try:
            before = stamp()
            shutil.copytree(source, staging)
            if stamp() == before and (not before or (staging / "training_state.json").read_bytes() == before):
                staging.rename(target)
                return True
        except OSError:  # the folder was swapped mid-copy
            pass
        time.sleep(2)
    raise RuntimeError(f"could not take a consistent copy of {source} in {attempts} attempts")


# =====================================================================================
# the plan: every command, in order


def display_argv(argv: Sequence[str]) -> str:
    """``argv`` as a shell line; this interpreter is written ``python``."""
    return shlex.join(["python" if part == sys.executable else part for part in argv])


class Plan:
    """The stages of a protocol run, built from its settings (pure: nothing runs here).

    Every stage but the probe runs once per seed, under ``s<seed>/`` (stage names and folders):
    seed ``n`` renders the real data, generates the synthetic sets, trains every segmenter and
    seeds MaskDiffusion's noise, so one seed's figures differ from another's in data and in
    training alike.
    """

    def __init__(self, settings: Settings, world: ModelWorld, script_dir: Path | None = None) -> None:
        self.script = (script_dir or SCRIPT_DIR) / "shapesworld_protocol.py"
        self.script_dir = script_dir or SCRIPT_DIR
        self.s, self.world = settings, world
        work = settings.work_dir
        self.model = work / "model"
        self.seen_classes = work / "prompts" / "seen-pairs-classes.json"
        self.templates = work / "prompts" / "shapes-templates.txt"
        self.image_size = settings.image_size or world.image_size
        self.stages: list[Stage] = []
        self.add("probe", "probe", [sys.executable, "-c", "import diffuseg.pipelines, diffuseg.training, diffuseg.evaluation"], 1)
        for seed in settings.seeds:
            self.add_seed(seed)

    # -- paths and names of one seed

    def prefix(self, seed: int) -> str:
        return f"s{seed}/"

    def real(self, seed: int) -> Path:
        return self.s.work_dir / f"s{seed}" / "real"

    def test_parts(self, seed: int) -> Path:
        """The rendered test split cut in two: split ``heldout`` (scenes with a held-out pair) and ``seen``."""
        return self.s.work_dir / f"s{seed}" / "real-test-parts"

    def synth(self, seed: int, key: str) -> Path:
        return self.s.work_dir / f"s{seed}" / "synth" / key

    def models(self, seed: int) -> Path:
        return self.s.work_dir / f"s{seed}" / "models"

    # -- the stages of one seed

    def add_seed(self, seed: int) -> None:
        s, size, world = self.s, self.s.size, self.world
        p = self.prefix(seed)
        real = self.real(seed)
        render_call = (  # JSON literals are Python literals too, and keep the shell quoting simple
            "from diffuseg.shapesworld.dataset import write_real_dataset; "
            f"write_real_dataset({json.dumps(str(real))}, {size.real_train_size}, {size.real_val_size}, "
            f"{size.real_test_size}, {seed}, size={world.image_size}, shapes={json.dumps(list(world.shapes))}, "
            f"colors={json.dumps(list(world.colors))})"
        )
        real_images = size.real_train_size + size.real_val_size + size.real_test_size
        self.add(p + "render", "render", [sys.executable, "-c", render_call], real_images, [real], ["snapshot"])
        self.add(p + "split-test", "split",
                 [sys.executable, str(self.script), "split-test", str(self.model), str(real), str(self.test_parts(seed))],
                 size.real_test_size, [self.test_parts(seed)], [p + "render", "snapshot"])

        # Synthetic sets: prompts without the held-out pairs (the real train split never shows them either),
        # so both sides of every comparison see the same pairs; one DiffuMask set with every pair measures
        # what the extra pairs alone are worth.
        for pipeline in PIPELINES:
            self.generate(seed, pipeline, pipeline)
        self.generate(seed, ALL_PAIRS_SET, "diffumask", all_pairs=True)

        # The oracle: trained on rendered data, scored on rendered validation, then a reference for masks.
        self.train_run(seed, "oracle", [real], steps=size.oracle_steps)
        self.evaluate(seed, "oracle", "oracle-validation", real, "validation", size.real_val_size, [p + "render"])
        for pipeline in PIPELINES:
            images = size.images_per_class * len(world.shapes)
            self.evaluate(seed, "oracle", f"oracle-on-{pipeline}", self.synth(seed, pipeline), "train", images,
                          [p + f"generate/{pipeline}"])
            report = self.s.work_dir / f"s{seed}" / "reports" / f"geometry-{pipeline}.json"
            self.add(p + f"geometry/{pipeline}", "geometry",
                     [sys.executable, str(self.script), "score-geometry", str(self.model), str(self.synth(seed, pipeline)),
                      str(report)], images, [report], [p + f"generate/{pipeline}", "snapshot"], report)

        # Train on synthetic vs train on real (scored on test, and on its two parts); zero-shot; the loss.
        self.test_run(seed, "real", [real], parts=True)
        for pipeline in PIPELINES:
            self.test_run(seed, f"synth-{pipeline}", [self.synth(seed, pipeline)], parts=True)
            self.test_run(seed, f"real+{pipeline}", [real, self.synth(seed, pipeline)], parts=True)
        self.test_run(seed, f"synth-{ALL_PAIRS_SET}", [self.synth(seed, ALL_PAIRS_SET)], parts=True)
        self.test_run(seed, "zs-real", [real], unseen=True)
        for pipeline in PIPELINES:
            self.test_run(seed, f"zs-real+{pipeline}", [real, self.synth(seed, pipeline)], unseen=True)
        self.test_run(seed, "nocf-synth-counterfactual", [self.synth(seed, "counterfactual")], counterfactual_weight=0.0)
        self.test_run(seed, "nocf-real+counterfactual", [real, self.synth(seed, "counterfactual")], counterfactual_weight=0.0)
        # The weight is chosen on validation: the test split is not looked at for it.
        for weight in self.sweep_weights:
            key = sweep_key(weight)
            self.validation_run(seed, key, [self.synth(seed, "counterfactual")], counterfactual_weight=weight)

        # Ablations, each a design choice: scored on validation only. The first row of each chain is the
        # model of the main comparison (same set, same training), scored on validation.
        for key, pipeline, _title, flags, agreement in ABLATIONS:
            if key in PIPELINES:
                self.evaluate(seed, f"synth-{key}", f"val-synth-{key}", real, "validation", size.real_val_size,
                              [p + "render"])
                continue
            further = list(flags)
            inputs = []
            if agreement is not None:  # the filter's segmenter: trained on the previous row's set
                further += ["--agreement-model", str(self.models(seed) / agreement)]
                inputs.append(p + f"train/{agreement}")
            self.generate(seed, key, pipeline, further=further, inputs=inputs)
            self.validation_run(seed, key, [self.synth(seed, key)])

        test_images = size.real_test_size if size.maskdiffusion_images is None else min(size.maskdiffusion_images, size.real_test_size)
        for mode, (_, background_word, further) in MASKDIFFUSION_MODES.items():
            report = self.s.work_dir / f"s{seed}" / "reports" / f"maskdiffusion-{mode}.json"
            extra = list(further)
            if background_word is not None:
                extra += ["--background-prompt", background_word, "--prompt", caption_naming(world.shapes, background_word)]
            argv = [sys.executable, str(self.script_dir / "maskdiffusion_eval.py"), str(real), "--split", "test",
                    "--model", str(self.model), "--seed", str(seed), "--output", str(report), *extra]
            if size.maskdiffusion_images is not None:
                argv += ["--limit", str(size.maskdiffusion_images)]
            if s.device:
                argv += ["--device", s.device]
            self.add(p + f"maskdiffusion/{mode}", "maskdiffusion", argv, test_images, [report], [p + "render", "snapshot"], report)

    @property
    def sweep_weights(self) -> list[float]:
        """The validation sweep's weights, 0 (no loss) first; empty without ``counterfactual_sweep``."""
        return sorted({0.0, *self.s.counterfactual_sweep}) if self.s.counterfactual_sweep else []

    def add(self, name, kind, argv, units, outputs=(), inputs=(), report=None) -> Stage:
        stage = Stage(name, kind, list(argv), float(units), list(outputs), list(inputs), report)
        self.stages.append(stage)
        return stage

    def diffuseg(self, command: str) -> list[str]:
        if self.s.accelerate is not None:
            return ["accelerate", "launch", *shlex.split(self.s.accelerate), "-m", "diffuseg", command]
        return ["diffuseg", command] if shutil.which("diffuseg") else [sys.executable, "-m", "diffuseg", command]

    def source_stage(self, seed: int, dataset: Path) -> str:
        return self.prefix(seed) + ("render" if dataset == self.real(seed) else f"generate/{dataset.name}")

    def generate(self, seed: int, key: str, pipeline: str, all_pairs: bool = False, further: Sequence[str] = (),
                 inputs: Sequence[str] = ()) -> None:
        """A ``diffuseg generate`` stage writing set ``key``; prompts without the held-out pairs unless ``all_pairs``."""
        size = self.s.size
        classes = ["--classes", "shapes"] if all_pairs else ["--classes", str(self.seen_classes), "--templates", str(self.templates)]
        argv = self.diffuseg("generate") + [
            "--model", str(self.model), "--pipeline", pipeline, *classes,
            "--images-per-class", str(size.images_per_class), "--steps", str(size.gen_steps),
            "--seed", str(seed), "--batch-size", str(self.s.gen_batch_size), *further, "--out", str(self.synth(seed, key)),
        ]
        self.add(self.prefix(seed) + f"generate/{key}", "generate", argv, size.images_per_class * len(self.world.shapes),
                 [self.synth(seed, key)], ["snapshot", *inputs])

    def train_run(self, seed: int, key: str, datasets: Sequence[Path], steps: int, unseen: bool = False,
                  counterfactual_weight: float | None = None) -> None:
        """A ``diffuseg train`` stage; every run shares the budget except the step count given.

        ``counterfactual_weight`` None: the settings' weight.
        """
        if counterfactual_weight is None:
            counterfactual_weight = self.s.counterfactual_weight
        output = self.models(seed) / key
        argv = self.diffuseg("train") + ["--train", *map(str, datasets)]
        if len(datasets) > 1:
            argv += ["--train-weights", *["1"] * len(datasets)]
        if unseen:
            argv += ["--unseen-classes", *self.s.unseen_classes]
        argv += [
            "--counterfactual-weight", f"{counterfactual_weight:g}", "--counterfactual-loss", self.s.counterfactual_loss,
            "--config", "segformer-tiny",
            "--image-size", str(self.image_size), "--batch-size", str(self.s.batch_size),
            "--learning-rate", f"{self.s.learning_rate:g}", "--max-steps", str(steps), "--seed", str(seed),
            "--checkpoint-steps", str(max(1, steps // 4)), "--resume", "--output-dir", str(output),
        ]
        stage = self.add(self.prefix(seed) + f"train/{key}", "train", argv, steps, [output],
                         [self.source_stage(seed, d) for d in datasets])
        stage.datasets = list(datasets)

    def evaluate(self, seed: int, key: str, name: str, dataset: Path, split: str, images: int, inputs: Sequence[str],
                 unseen: bool = False) -> None:
        argv = self.diffuseg("evaluate") + [str(self.models(seed) / key), str(dataset), "--split", split, "--batch-size", "32"]
        if unseen:
            argv += ["--unseen-classes", *self.s.unseen_classes]
        self.add(self.prefix(seed) + f"evaluate/{name}", "evaluate", argv + ["--json"], images, [],
                 [self.prefix(seed) + f"train/{key}", *inputs])

    def test_run(self, seed: int, key: str, datasets: Sequence[Path], unseen: bool = False,
                 counterfactual_weight: float | None = None, parts: bool = False) -> None:
        """Train with the common budget, then score once on the rendered test split (``parts``: and on its two parts)."""
        p = self.prefix(seed)
        self.train_run(seed, key, datasets, self.s.size.train_steps, unseen, counterfactual_weight)
        self.evaluate(seed, key, key, self.real(seed), "test", self.s.size.real_test_size, [p + "render"], unseen)
        if parts:
            for part in TEST_PARTS:
                self.evaluate(seed, key, f"{key}@{part}", self.test_parts(seed), part, self.s.size.real_test_size,
                              [p + "split-test"])

    def validation_run(self, seed: int, key: str, datasets: Sequence[Path], counterfactual_weight: float | None = None) -> None:
        """Train with the common budget, then score on the rendered validation split (a design choice)."""
        self.train_run(seed, key, datasets, self.s.size.train_steps, counterfactual_weight=counterfactual_weight)
        self.evaluate(seed, key, key, self.real(seed), "validation", self.s.size.real_val_size, [self.prefix(seed) + "render"])


def sweep_key(weight: float) -> str:
    """The model / stage key of the validation sweep's run at ``weight``."""
    return f"cfsweep-{weight:g}"


# =====================================================================================
# running stages, with records that make a rerun skip finished work


def stage_file(work_dir: Path, name: str) -> Path:
    return work_dir / "stages" / (name.replace("/", "__") + ".json")


def work_log(work_dir: Path, name: str) -> Path:
    return work_dir / "logs" / (name.replace("/", "__") + ".log")


def stage_fingerprint(stage: Stage, upstream: Mapping[str, str]) -> str:
    """A hash of the stage's command and of its inputs' fingerprints: a change upstream reruns it."""
    text = json.dumps([stage.argv, [upstream[name] for name in stage.inputs]])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def finished_record(work_dir: Path, name: str, fingerprint: str) -> Record | None:
    """The record of a stage finished earlier with this fingerprint, else None."""
    path = stage_file(work_dir, name)
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved.get("fingerprint") != fingerprint or saved.get("status") != "done":
        return None
    return Record(name, fingerprint, saved["seconds"], saved.get("result"), reused=True)


def last_json_line(text: str) -> Any:
    """The last line of ``text`` that parses as a JSON object (None if there is none)."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def run_stage(stage: Stage, work_dir: Path, fingerprint: str, show_output: bool = False,
              runner: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> Record:
    """Run ``stage`` (resuming its outputs if an interrupted run of the same fingerprint left them)."""
    path = stage_file(work_dir, stage.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = json.loads(path.read_text()) if path.is_file() else {}
    if saved.get("fingerprint") != fingerprint:  # other settings made these outputs: start clean
        for output in stage.outputs:
            if output.is_dir():
                shutil.rmtree(output)
            elif output.exists():
                output.unlink()
    path.write_text(json.dumps({"fingerprint": fingerprint, "status": "running", "command": display_argv(stage.argv)}))
    log = work_log(work_dir, stage.name)
    log.parent.mkdir(parents=True, exist_ok=True)
    if stage.report is not None:
        stage.report.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if not show_output:
        env.setdefault("TQDM_MININTERVAL", "10")  # progress bars in a log file: a line every 10 s
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        if show_output:
            completed = runner(stage.argv, stdout=subprocess.PIPE, text=True, env=env)
            out.write(completed.stdout or "")
            sys.stdout.write(completed.stdout or "")
        else:
            completed = runner(stage.argv, stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)[-25:])
        raise RuntimeError(f"stage {stage.name} failed (exit {completed.returncode}); log {log}:\n{tail}\n"
                           f"command: {display_argv(stage.argv)}")
    if stage.report is not None:
        result = json.loads(stage.report.read_text())
    else:
        result = last_json_line(log.read_text(encoding="utf-8", errors="replace"))
    path.write_text(json.dumps({"fingerprint": fingerprint, "status": "done", "command": display_argv(stage.argv),
                                "seconds": seconds, "result": result}, indent=1))
    return Record(stage.name, fingerprint, seconds, result)


def run_plan(plan: Plan, snapshot_fingerprint: str, show_output: bool = False) -> dict[str, Record]:
    """Run (or reuse) every stage of ``plan`` in order, printing one line per stage."""
    fingerprints = {"snapshot": snapshot_fingerprint}
    records: dict[str, Record] = {}
    skipped: set[str] = set()
    total = len(plan.stages)
    for number, stage in enumerate(plan.stages, start=1):
        fingerprint = stage_fingerprint(stage, fingerprints)
        fingerprints[stage.name] = fingerprint
        label = f"[{number:>2}/{total}] {stage.name:<38}"
        empty = [d for d in stage.datasets if not count_rows(d)]
        if empty or skipped & set(stage.inputs):
            # A filter may keep nothing at a small size: that set's rows are missing, the run goes on.
            print(f"{label} skipped: " + (f"{empty[0]} has no rows" if empty else "it needs a skipped stage"), flush=True)
            skipped.add(stage.name)
            records[stage.name] = Record(stage.name, fingerprint, 0.0, skipped=True)
            continue
        record = finished_record(plan.s.work_dir, stage.name, fingerprint)
        if record is not None:
            print(f"{label} done earlier ({record.seconds:.0f} s), reused", flush=True)
        else:
            log = work_log(plan.s.work_dir, stage.name)
            print(f"{label} running (log: {log}) ...", flush=True)
            record = run_stage(stage, plan.s.work_dir, fingerprint, show_output)
            score = record.result.get("mean_iou") if isinstance(record.result, dict) else None
            print(f"{label} done in {record.seconds:.0f} s" + (f": mIoU {percent(score)}" if score is not None else ""), flush=True)
        records[stage.name] = record
    return records


# =====================================================================================
# figures and tables (pure functions of the records)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``; None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def number(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], numeric: bool = True) -> str:
    """A GitHub markdown table; the first column left-aligned, the others right-aligned if ``numeric``."""
    rest = "--:" if numeric else ":--"
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":--"] + [rest] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def class_iou_row(reports: Sequence[Mapping[str, Any] | None], classes: Sequence[str]) -> list[str]:
    """Per-class IoU (in %, mean ± sd over the seeds' reports), in ``classes`` order."""
    return [Spread.of([(r or {}).get("per_class", {}).get(name, {}).get("iou") for r in reports]).text()
            for name in classes]


@dataclass(frozen=True)
class Spread:
    """One figure over seeds: its values, their mean and sample standard deviation (0 for one value)."""

    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Spread:
        """The spread of ``values``; missing ones (None) are left out."""
        return cls(tuple(float(v) for v in values if v is not None))

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return sum(self.values) / self.n if self.values else None

    @property
    def sd(self) -> float | None:
        if not self.values:
            return None
        if self.n == 1:
            return 0.0
        mean = self.mean
        return (sum((v - mean) ** 2 for v in self.values) / (self.n - 1)) ** 0.5

    def text(self, scale: float = 100.0, digits: int = 1) -> str:
        """``mean ± sd`` (``scale``: 100 for percentages, 1 for ratios); n/a without values."""
        if not self.values:
            return "n/a"
        return f"{scale * self.mean:.{digits}f} ± {scale * self.sd:.{digits}f}"


def compare(a: Spread, b: Spread, name_a: str, name_b: str) -> str:
    """A sentence saying whether ``a`` is better or worse than ``b``: only where the mean ± sd intervals separate."""
    if a.n < 2 or b.n < 2:
        return f"{name_a} vs {name_b}: not compared (fewer than 2 seeds)"
    gap = 100 * (a.mean - b.mean)
    if a.mean - a.sd > b.mean + b.sd:
        return f"{name_a} is better than {name_b} ({gap:+.1f} points; the mean ± sd intervals separate)"
    if b.mean - b.sd > a.mean + a.sd:
        return f"{name_a} is worse than {name_b} ({gap:+.1f} points; the mean ± sd intervals separate)"
    return f"{name_a} and {name_b} are not told apart ({gap:+.1f} points; the mean ± sd intervals overlap)"


def seed_values(results: Mapping[str, Mapping[str, Any] | None], seeds: Sequence[int], stage: str,
                metric: str = "mean_iou") -> Spread:
    """``metric`` of stage ``stage`` (name without the seed prefix) over ``seeds``."""
    return Spread.of([(results.get(f"s{seed}/{stage}") or {}).get(metric) for seed in seeds])


def seed_ratios(results: Mapping[str, Mapping[str, Any] | None], seeds: Sequence[int], numerator: str,
                denominator: str, metric: str = "mean_iou", denominator_metric: str | None = None) -> Spread:
    """Per seed, ``numerator`` ÷ ``denominator`` (paired: the same seed's data and training)."""
    return Spread.of([
        ratio((results.get(f"s{seed}/{numerator}") or {}).get(metric),
              (results.get(f"s{seed}/{denominator}") or {}).get(denominator_metric or metric))
        for seed in seeds
    ])


@dataclass(frozen=True)
class Target:
    """A bar from the issue and what this run achieved over its seeds."""

    name: str
    value: Spread
    bar: float

    @property
    def verdict(self) -> str:
        if not self.value.n:
            return "not measured"
        if self.value.mean - self.value.sd >= self.bar:
            return "met"
        return "met on the mean only (mean − sd below the bar)" if self.value.mean >= self.bar else "not met"


def targets(results: Mapping[str, Mapping[str, Any] | None], seeds: Sequence[int], unseen: Sequence[str]) -> list[Target]:
    """The issue's targets, from the evaluation reports (keyed by stage name, with the seed prefix).

    The synthetic ÷ real ratio is the like-for-like one: sets generated without the held-out pairs,
    which the real training split never shows either.
    """
    found = [
        Target(f"{PIPELINE_TITLES[p]} synthetic-only ÷ real-only mIoU (same colour-shape pairs)",
               seed_ratios(results, seeds, f"evaluate/synth-{p}", "evaluate/real"), SYNTHETIC_OVER_REAL_BAR)
        for p in PIPELINES
    ]
    found += [
        Target(f"{PIPELINE_TITLES[p]} zero-shot unseen ÷ seen mIoU ({', '.join(unseen)} unseen)",
               seed_ratios(results, seeds, f"evaluate/zs-real+{p}", f"evaluate/zs-real+{p}", "mean_iou_unseen",
                           "mean_iou_seen"), UNSEEN_OVER_SEEN_BAR)
        for p in PIPELINES
    ]
    found += [
        Target(f"MaskDiffusion mIoU ({title})", seed_values(results, seeds, f"maskdiffusion/{mode}"), MASKDIFFUSION_BAR)
        for mode, (title, _, _) in MASKDIFFUSION_MODES.items()
        if not title.startswith("oracle")
    ]
    return found


# =====================================================================================
# helper commands the plan runs: the held-out split of the test images, masks against geometry


def has_held_out_pair(row_seed: int, split: str, shapes: Sequence[str], colors: Sequence[str]) -> bool:
    """Whether the rendered scene of a row (its ``seed`` column) holds a held-out colour-shape pair."""
    from diffuseg.shapesworld.render import HELD_OUT_PAIRS, scene_from_seed

    scene, _ = scene_from_seed(row_seed, split, shapes=shapes, colors=colors)
    return any((obj.color, obj.shape) in HELD_OUT_PAIRS for obj in scene.objects)


def split_test_by_held_out_pairs(real: Path, out: Path, shapes: Sequence[str], colors: Sequence[str]) -> dict[str, int]:
    """Write the rendered test split of ``real`` into ``out`` as two splits, ``heldout`` (scenes with a
    held-out colour-shape pair, never in the real train split) and ``seen``; returns their sizes."""
    from datasets import load_dataset

    from diffuseg.data import DatasetWriter

    test = load_dataset(str(real), split="test")
    parts: dict[str, list[dict]] = {part: [] for part in TEST_PARTS}
    for row in test:
        parts["heldout" if has_held_out_pair(row["seed"], "test", shapes, colors) else "seen"].append(row)
    empty = [part for part, rows in parts.items() if not rows]
    if empty:
        raise ValueError(f"the test split of {real} ({len(test)} scenes) has no {' or '.join(empty)} scene: "
                         "render more test scenes (--real-test-size)")
    for part, rows in parts.items():
        writer = DatasetWriter(out, class_names=list(shapes), split=part,
                               fingerprint={"source": str(real), "part": part}, samples_per_shard=1000)
        done = set(writer.completed_indices)
        for index, row in enumerate(rows):
            if index not in done:
                writer.add(row, index=index)
        writer.close(description=f"The rendered test scenes of {real} " + (
            "holding a held-out colour-shape pair." if part == "heldout" else "without a held-out colour-shape pair."))
    return {part: len(rows) for part, rows in parts.items()}


def geometry_scores(dataset: Path, shapes: Sequence[str], colors: Sequence[str]) -> dict[str, Any]:
    """A synthetic set's masks scored against the geometry the recogniser reads from its images.

    An image is read when the recogniser finds an object of every class its mask names; the
    reference label map is then each found object's region labelled with its fitted shape. IoU per
    class (background included, 255 ignored) is summed over the read images.
    """
    import numpy as np
    from datasets import load_dataset

    from diffuseg.shapesworld.recognize import recognize

    rows = load_dataset(str(dataset), split="train")
    classes = len(shapes) + 1
    intersection, union = np.zeros(classes), np.zeros(classes)
    read = 0
    for row in rows:
        image, label = np.asarray(row["image"].convert("RGB")), np.asarray(row["label"])
        named = {int(c) for c in np.unique(label) if 0 < c < classes}
        detections = recognize(image, shapes, colors)
        if not named or not named <= {shapes.index(d.shape) + 1 for d in detections}:
            continue
        read += 1
        reference = np.zeros(label.shape, dtype=np.int64)
        for detection in detections:
            reference[detection.mask] = shapes.index(detection.shape) + 1
        valid = label != 255
        for c in range(classes):
            predicted, actual = (label == c) & valid, (reference == c) & valid
            intersection[c] += np.count_nonzero(predicted & actual)
            union[c] += np.count_nonzero(predicted | actual)
    names = ["background", *shapes]
    per_class = {name: {"iou": float(intersection[c] / union[c])} for c, name in enumerate(names) if union[c] > 0}
    return {"mean_iou": float(np.mean([v["iou"] for v in per_class.values()])) if per_class else None,
            "per_class": per_class, "num_images": len(rows), "read": read, "read_share": read / len(rows) if len(rows) else None}


def cost_group(stage: Stage) -> str:
    """Stages whose work costs the same per unit: each synthetic set on its own, else one group per kind.

    The seed prefix is no part of the group: every seed's stage costs the same.
    """
    name = re.sub(r"^s\d+/", "", stage.name)
    return name if stage.kind == "generate" else stage.kind


CostLines = dict[str, tuple[float, float]]
"""Per :func:`cost_group`: (seconds per command, seconds per unit of work)."""

STARTUP_SECONDS = 6.9
"""Python and diffuseg's imports, measured by the single-seed default run (2 CPU cores)."""


def _measured_cost_lines() -> CostLines:
    """The cost lines of the single-seed default run that measured them (2 CPU cores; benchmarks/RESULTS.md
    before seeds): generators per image, training per step, scoring per image. Sets of one generator with more
    work per image (refinement, a filter that generates with a segmenter, mosaics) count as their generator;
    the geometry scorer, measured by no run yet, is counted at 0.1 s per image."""
    per_image = {"diffumask": 0.378, "freemask": 1.523, "counterfactual": 0.655}
    lines: CostLines = {f"generate/{key}": (STARTUP_SECONDS, per_image[pipeline]) for key, pipeline, *_ in ABLATIONS}
    lines.update({f"generate/{p}": (STARTUP_SECONDS, rate) for p, rate in per_image.items()})
    lines[f"generate/{ALL_PAIRS_SET}"] = (STARTUP_SECONDS, per_image["diffumask"])
    lines.update({"probe": (STARTUP_SECONDS, 0.0), "render": (2.0, 0.001), "split": (STARTUP_SECONDS, 0.002),
                  "train": (STARTUP_SECONDS, 0.022), "evaluate": (5.0, 0.0005), "geometry": (STARTUP_SECONDS, 0.1),
                  "maskdiffusion": (STARTUP_SECONDS, 0.014)})
    return lines


DEFAULT_COST_LINES: CostLines = _measured_cost_lines()


def fit_cost_lines(measured: Sequence[tuple[Stage, float]], startup: float) -> CostLines:
    """Cost lines from measured stage times, one per :func:`cost_group`.

    Where a group was measured at two or more sizes (the oracle trains longer than the compared
    runs) the line is a least-squares fit; otherwise its fixed cost is ``startup`` (starting
    Python and importing diffuseg's modules, measured) and its cost per unit is pooled over the
    group's stages, so one slow or fast start does not swing the estimate.
    """
    import numpy as np

    points: dict[str, list[tuple[float, float]]] = {}
    for stage, seconds in measured:
        points.setdefault(cost_group(stage), []).append((stage.units, seconds))
    lines: CostLines = {}
    for group, pairs in points.items():
        units, seconds = np.array(pairs, dtype=float).T
        slope = None
        if len(set(units)) > 1:
            slope, fixed = np.polyfit(units, seconds, 1)
        if slope is None or slope < 0 or fixed < 0:
            fixed, slope = startup, max(float((seconds - startup).sum()), 0.0) / max(float(units.sum()), 1e-9)
        lines[group] = (float(fixed), float(slope))
    return lines


def predict_seconds(stages: Sequence[Stage], lines: Mapping[str, tuple[float, float]], startup: float) -> float:
    """Run time of ``stages`` by ``lines``; a group without a line counts ``startup`` only."""
    return sum(lines.get(cost_group(s), (startup, 0.0))[0] + lines.get(cost_group(s), (startup, 0.0))[1] * s.units
               for s in stages)


def estimate_seconds(stages: Sequence[Stage], measured: Sequence[tuple[Stage, float]], startup: float) -> float:
    """Run time of ``stages`` from stage times measured at another size (:func:`fit_cost_lines`)."""
    return predict_seconds(stages, fit_cost_lines(measured, startup), startup)


def scaled_size(size: Size, factor: float) -> Size:
    """``size`` with the work that dominates run time (generated images, training steps, MaskDiffusion
    images) scaled by ``factor``; the rendered splits stay (rendering and scoring them is cheap)."""
    md = size.maskdiffusion_images if size.maskdiffusion_images is not None else size.real_test_size
    return dataclasses.replace(
        size, images_per_class=max(2, round(size.images_per_class * factor)),
        train_steps=max(20, round(size.train_steps * factor)), oracle_steps=max(40, round(size.oracle_steps * factor)),
        maskdiffusion_images=min(size.real_test_size, max(10, round(md * factor))),
    )


def fit_size(settings: Settings, world: ModelWorld, budget_seconds: float, lines: Mapping[str, tuple[float, float]],
             startup: float = STARTUP_SECONDS) -> tuple[Size, float]:
    """The largest :func:`scaled_size` of ``settings.size`` (factor ≤ 1) whose plan, every seed included, the
    cost ``lines`` predict to take at most ``budget_seconds``; returns it and its predicted seconds."""

    def predicted(factor: float) -> float:
        trial = dataclasses.replace(settings, size=scaled_size(settings.size, factor))
        return predict_seconds(Plan(trial, world).stages, lines, startup)

    if predicted(1.0) <= budget_seconds:
        return settings.size, predicted(1.0)
    low, high = 0.0, 1.0
    for _ in range(30):  # bisection: the prediction grows with the factor
        middle = (low + high) / 2
        low, high = (middle, high) if predicted(middle) <= budget_seconds else (low, middle)
    return scaled_size(settings.size, low), predicted(low)


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


# =====================================================================================
# RESULTS.md


def count_rows(dataset: Path, split: str = "train") -> int | None:
    """Rows of a Hub-layout folder's split, from the Parquet footers."""
    import pyarrow.parquet as pq

    files = sorted((dataset / "data").glob(f"{split}-*.parquet"))
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files) if files else None


def machine() -> dict[str, str]:
    import torch

    device = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
    return {
        "CPUs": str(os.cpu_count()),
        "torch threads": f"{torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})",
        "device": device,
        "python / torch": f"{platform.python_version()} / {torch.__version__}",
        "platform": platform.platform(),
        # other work on the machine slows the stages down: say how busy it was
        "load average (1 / 5 / 15 min) at the end": " / ".join(f"{v:.2f}" for v in os.getloadavg()),
    }


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def render_results(plan: Plan, records: Mapping[str, Record], *, command: str, default_estimate: float | None,
                   snapshot_seconds: float, wall_seconds: float, machine_info: Mapping[str, str],
                   commit: str, now: str, rows: Mapping[str, Sequence[int | None]]) -> str:
    """The whole RESULTS.md text from the records of a run (``rows``: per set, its row count per seed)."""
    s, world, size = plan.s, plan.world, plan.s.size
    seeds = list(s.seeds)
    results = {name: record.result for name, record in records.items()}
    shapes = list(world.shapes)
    columns = ["background", *shapes]
    unseen = list(s.unseen_classes)
    out: list[str] = []
    add = out.append

    def spread(stage: str, metric: str = "mean_iou") -> Spread:
        return seed_values(results, seeds, stage, metric)

    def reports(stage: str) -> list[Mapping[str, Any] | None]:
        return [results.get(f"s{seed}/{stage}") for seed in seeds]

    add("# ShapesWorld protocol: results\n")
    add(f"Written by `benchmarks/shapesworld_protocol.py` on {now} at **size `{s.size_name}`**"
        + (" (a smoke run: far too small for the figures to mean much)" if s.size_name.startswith("quick") else "")
        + ". Every figure below comes from the run's own records; rerun the script to update this file, "
        "never edit it by hand.\n")
    add(f"```bash\n{command}\n```\n")
    step = "n/a" if world.unet_step is None else str(world.unet_step)
    psnr = "" if world.vae_psnr is None else f", VAE PSNR {world.vae_psnr:.1f} dB"
    budget = ("" if s.time_budget_minutes is None else
              f" (scaled from the preset by the fitted time model so that {len(seeds)} seeds fit "
              f"{s.time_budget_minutes:g} min)")
    settings_rows = [
        ("model", f"snapshot `{plan.model}` (UNet step {step}{psnr})"),
        ("world", f"shapes {', '.join(shapes)}; colours {', '.join(world.colors)}; {world.image_size} px"),
        ("real data (rendered)", f"{size.real_train_size} train / {size.real_val_size} validation / {size.real_test_size} test "
                                 "scenes per seed (train never shows the held-out colour-shape pairs)"),
        ("synthetic sets", f"{size.images_per_class} prompts per class × {len(shapes)} classes per set{budget}, "
                           f"{size.gen_steps} DDIM steps; prompts without the held-out pairs except the "
                           "'every pair' DiffuMask set; generate's defaults otherwise"),
        ("segmenter (every run)", f"segformer-tiny from scratch, {plan.image_size} px, batch {s.batch_size}, "
                                  f"lr {s.learning_rate:g} (linear decay), {size.train_steps} steps; mixtures 1:1"),
        ("oracle", f"the same segmenter, {size.oracle_steps} steps on the rendered train split"),
        ("seeds", f"{len(seeds)}: {', '.join(map(str, seeds))}. Seed n is the data-generation seed (rendering "
                  "of the real splits, every synthetic set) and the segmenter seed (initialisation, batch order) "
                  "and MaskDiffusion's noise seed: both kinds vary together, so the spread holds both"),
        ("zero-shot unseen classes", ", ".join(unseen)),
        ("code", f"git {commit}"),
        *machine_info.items(),
    ]
    add(markdown_table(["setting", "value"], settings_rows, numeric=False) + "\n")
    add("IoU figures are percentages; mIoU is `diffuseg.metrics.mean_iou` over background and the shapes "
        "(the Hub `mean_iou` definitions; 255 is ignored). **Every figure is mean ± sd over the seeds** "
        "(n: seeds measured). A row is called better than another only where the two mean ± sd intervals "
        "separate; otherwise the text says they are not told apart. Design choices (the counterfactual weight, "
        "the ablations) are scored on the validation split; the test split is scored once per figure.\n")

    add("## 1. Synthetic sets\n")
    table = []
    for key in [*PIPELINES, ALL_PAIRS_SET, *[k for k, *_ in ABLATIONS if k not in PIPELINES]]:
        counts = list(rows.get(key, [None] * len(seeds)))
        generated = [records.get(f"s{seed}/generate/{key}") for seed in seeds]
        seconds = [None if record is None or record.skipped else record.seconds for record in generated]
        table.append([f"`{key}`", Spread.of(counts).text(1, 0), Spread.of(seconds).text(1, 0),
                      Spread.of([ratio(t, c) for t, c in zip(seconds, counts)]).text(1, 2), Spread.of(counts).n])
    add(markdown_table(["set", "rows", "seconds (with start-up)", "seconds / row", "n"], table) + "\n")

    add("## 2. Mask quality\n")
    add(f"The oracle (segmenter trained on rendered data) scores **mIoU {spread('evaluate/oracle-validation').text()}** "
        "on rendered validation. Each generator's masks are scored against the geometry the recogniser "
        "(`diffuseg.shapesworld.recognize`, exact on rendered scenes) reads from the generated image, on the "
        "images where it reads an object of every class the mask names (share read in the table), and, "
        "beside it, against the oracle's predictions on every generated image:\n")
    table = [["oracle on rendered validation (reference)", *class_iou_row(reports("evaluate/oracle-validation"), columns),
              spread("evaluate/oracle-validation").text(), "", spread("evaluate/oracle-validation").n]]
    for p in PIPELINES:
        table.append([f"{PIPELINE_TITLES[p]} masks vs geometry", *class_iou_row(reports(f"geometry/{p}"), columns),
                      spread(f"geometry/{p}").text(), spread(f"geometry/{p}", "read_share").text(), spread(f"geometry/{p}").n])
        table.append([f"{PIPELINE_TITLES[p]} masks vs oracle", *class_iou_row(reports(f"evaluate/oracle-on-{p}"), columns),
                      spread(f"evaluate/oracle-on-{p}").text(), "", spread(f"evaluate/oracle-on-{p}").n])
    add(markdown_table(["masks", *columns, "mIoU", "% read", "n"], table) + "\n")

    add("## 3. Train on synthetic vs train on real\n")
    add(f"Scored on the rendered test split ({size.real_test_size} images per seed) and on its two parts: scenes "
        "with a held-out colour-shape pair (which the real train split never shows) and the others; equal "
        "budgets. The synthetic sets leave the held-out pairs out of their prompts, like the real train split, "
        "so both sides see the same pairs; the 'every pair' set shows what the extra pairs alone change. "
        "÷ real is per seed (the same seed's real-only run), then mean ± sd.\n")
    runs = [("real", "(a) real"), *[(f"synth-{p}", f"(b) {PIPELINE_TITLES[p]} only") for p in PIPELINES],
            *[(f"real+{p}", f"(c) real + {PIPELINE_TITLES[p]}") for p in PIPELINES],
            (f"synth-{ALL_PAIRS_SET}", "(d) DiffuMask only, every pair in its prompts")]
    table = []
    for key, title in runs:
        table.append([title, spread(f"evaluate/{key}").text(), spread(f"evaluate/{key}@seen").text(),
                      spread(f"evaluate/{key}@heldout").text(),
                      seed_ratios(results, seeds, f"evaluate/{key}", "evaluate/real").text(1, 2), spread(f"evaluate/{key}").n])
    add(markdown_table(["training data", "test mIoU", "without held-out pairs", "with held-out pairs", "÷ real", "n"],
                       table) + "\n")
    real = spread("evaluate/real")
    sentences = [compare(spread(f"evaluate/synth-{p}"), real, f"{PIPELINE_TITLES[p]} only", "real") for p in PIPELINES]
    sentences += [compare(spread(f"evaluate/real+{p}"), real, f"real + {PIPELINE_TITLES[p]}", "real") for p in PIPELINES]
    sentences.append(compare(spread(f"evaluate/synth-{ALL_PAIRS_SET}@heldout"), spread("evaluate/synth-diffumask@heldout"),
                             "DiffuMask with every pair", "DiffuMask without the held-out pairs, on held-out-pair scenes"))
    add("\n".join(f"- {sentence}." for sentence in sentences) + "\n")

    add(f"## 4. Zero-shot: {', '.join(unseen)} unseen in the real training labels\n")
    add("The unseen classes are set to ignore (255) in the real training set only; the synthetic sets keep "
        "them. Seen mIoU includes background (DiffuMask / Free-Mask VOC protocol).\n")
    table = []
    for key, title in [("zs-real", "real (seen labels only)"),
                       *[(f"zs-real+{p}", f"real (seen) + {PIPELINE_TITLES[p]}") for p in PIPELINES]]:
        stage = f"evaluate/{key}"
        table.append([title, spread(stage, "mean_iou_seen").text(), spread(stage, "mean_iou_unseen").text(),
                      spread(stage, "harmonic_mean_iou").text(),
                      seed_ratios(results, seeds, stage, stage, "mean_iou_unseen", "mean_iou_seen").text(1, 2),
                      spread(stage, "mean_iou_unseen").n])
    add(markdown_table(["training data", "seen mIoU", "unseen mIoU", "harmonic", "unseen ÷ seen", "n"], table) + "\n")

    add("## 5. MagicSeg: the counterfactual loss\n")
    add(f"Counterfactual sets with their `negative_image`, trained with `--counterfactual-loss {s.counterfactual_loss}` "
        f"(`{s.counterfactual_loss}`: {COUNTERFACTUAL_LOSSES.get(s.counterfactual_loss, '')}) at "
        f"`--counterfactual-weight {s.counterfactual_weight:g}` and at `0`; same budget.\n")
    table, sentences = [], []
    for data, with_key, without_key in [("Counterfactual only", "synth-counterfactual", "nocf-synth-counterfactual"),
                                        ("real + Counterfactual", "real+counterfactual", "nocf-real+counterfactual")]:
        with_loss, without = spread(f"evaluate/{with_key}"), spread(f"evaluate/{without_key}")
        difference = Spread.of([None if a is None or b is None else a - b for a, b in zip(
            [(r or {}).get("mean_iou") for r in reports(f"evaluate/{with_key}")],
            [(r or {}).get("mean_iou") for r in reports(f"evaluate/{without_key}")])])
        table.append([data, without.text(), with_loss.text(), difference.text(), with_loss.n])
        sentences.append(compare(with_loss, without, f"{data} with the loss", "without it"))
    add(markdown_table(["training data", "mIoU without loss", "mIoU with loss", "difference (per seed)", "n"], table) + "\n")
    add("\n".join(f"- {sentence}." for sentence in sentences) + "\n")
    if plan.sweep_weights:
        add("Weight sweep on the rendered **validation** split (Counterfactual set only; the test split is not used "
            "to choose the weight):\n")
        sweep = [(weight, spread(f"evaluate/{sweep_key(weight)}")) for weight in plan.sweep_weights]
        add(markdown_table(["counterfactual weight", "validation mIoU", "n"],
                           [[f"{w:g}", v.text(), v.n] for w, v in sweep]) + "\n")
        scored = [(v.mean, w, v) for w, v in sweep if v.n]
        if scored:
            _, best_weight, best = max(scored, key=lambda item: item[0])
            zero = dict((w, v) for w, v in sweep)[0.0]
            add(f"Best mean on validation: weight {best_weight:g} ({best.text()}); "
                + (compare(best, zero, f"weight {best_weight:g}", "weight 0") + ". " if best_weight else "")
                + f"Rerun with `--counterfactual-weight {best_weight:g}` for its test rows.\n")

    add("## 6. Ablations of the papers' components (validation split)\n")
    add("Each row generates its set with the flags of the rows above it plus its own (commands below), trains the "
        "common segmenter on it and scores it on the rendered **validation** split; the first row of each "
        "group is the set of section 3. A filter's agreement model is the segmenter trained on the previous "
        "row's set (no real label). The last column compares each row with the row above it.\n")
    table = []
    previous: tuple[str, Spread] | None = None
    for key, pipeline, title, _, _ in ABLATIONS:
        value = spread(f"evaluate/val-synth-{key}" if key in PIPELINES else f"evaluate/{key}")
        if key in PIPELINES:
            previous = None
        verdict = "" if previous is None else compare(value, previous[1], "this row", "the row above")
        table.append([title, value.text(), value.n, verdict])
        # Free-Mask's rows each change one thing from edit mode: they compare with it, not with each other.
        if previous is None or pipeline == "diffumask":
            previous = (key, value)
    add(markdown_table(["set", "validation mIoU", "n", "vs the row above (Free-Mask: vs edit mode)"], table) + "\n")

    add("## 7. MaskDiffusion, training-free\n")
    md_images = Spread.of([(r or {}).get("num_images") for r in reports("maskdiffusion/background")]).text(1, 0)
    add(f"Rendered test images ({md_images} per seed); candidate classes: every shape, named in one caption of the "
        "world's own grammar (`--prompt`, in the commands below). With the background word, a named class whose "
        "region covers under 12% of the image is judged absent and prototypes count attention above 0.5 only "
        "(both chosen on the validation split). Without background handling the reference background pixels are "
        "not scored (the paper's setting). Unsupervised: k-means with k chosen per image by silhouette, cluster "
        "ids (by size) matched to labels once for the whole split (Hungarian); the oracle row takes k and the "
        "matching from each test image's labels.\n")
    table = []
    for mode, (title, _, _) in MASKDIFFUSION_MODES.items():
        stage = f"maskdiffusion/{mode}"
        table.append([title, *class_iou_row(reports(stage), columns), spread(stage).text(), spread(stage).n])
    add(markdown_table(["mode", *columns, "mIoU", "n"], table) + "\n")

    add("## Targets\n")
    add(f"From the issue; DiffuMask's own synthetic ÷ real ratio on VOC is {DIFFUMASK_VOC_RATIO}. Met: mean − sd "
        "reaches the bar.\n")
    add(markdown_table(["target", "achieved", "bar", "n", "verdict"],
                       [[t.name, t.value.text(1, 2) if "÷" in t.name else t.value.text(), f"≥ {t.bar}", t.value.n,
                         t.verdict] for t in targets(results, seeds, unseen)]) + "\n")

    add("## Run time\n")
    measured = sum(record.seconds for record in records.values()) + snapshot_seconds
    reused = [name for name, record in records.items() if record.reused]
    add(f"Sum of the stage times: **{minutes(measured)}** ({measured:.0f} s); wall time of this invocation "
        f"{minutes(wall_seconds)}" + (f" ({len(reused)} stages reused from an earlier invocation)" if reused else "") + ".\n")
    if default_estimate is not None:
        startup = records["probe"].seconds
        add(f"Estimated time of `--size default` (with this run's other flags: {DEFAULT_SEEDS['default']} seeds, sizes "
            f"the embedded time model fits to {DEFAULT_BUDGET_MINUTES:g} min) on this machine: "
            f"**{minutes(default_estimate)}**, from this run's stage times: each command costs a fixed part plus a "
            "part proportional to its work (images generated or scored, training steps), fitted per kind of stage "
            "(each synthetic set apart) where this run measured two sizes (training: oracle vs compared runs), else "
            f"with the measured start-up ({startup:.1f} s: Python and diffuseg's imports) as the fixed part.\n")
    by_stage: dict[str, list[Record]] = {}
    for name, record in records.items():
        by_stage.setdefault(re.sub(r"^s\d+/", "", name), []).append(record)
    table = [["snapshot of the model", f"{snapshot_seconds:.1f}", "", "", ""]]
    for name, group in by_stage.items():
        stage = plan_stage(plan, name if name == "probe" else f"s{seeds[0]}/{name}")
        table.append([f"`{name}`", Spread.of([r.seconds for r in group]).text(1, 1), f"{stage.units:g}", len(group),
                      ", ".join(f"{count} {what}" for what, count in (
                          ("run", sum(not r.reused and not r.skipped for r in group)),
                          ("reused", sum(r.reused for r in group)), ("skipped", sum(r.skipped for r in group))) if count)])
    add(markdown_table(["stage", "seconds (mean ± sd over seeds)", "work units", "runs", "this invocation"], table) + "\n")

    add("## Commands\n")
    add("In order, from the repository root (`python` is the interpreter that ran the protocol; "
        "environment: " + f"`OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}`). The model snapshot "
        f"is a copy of `{s.model_source}` into `{plan.model}`. Seed {seeds[0]}'s commands; every other seed n runs "
        f"the same with `s{seeds[0]}` replaced by `s<n>` in the paths and `{seeds[0]}` by n in the seeds.\n")
    first = [stage for stage in plan.stages if stage.name == "probe" or stage.name.startswith(f"s{seeds[0]}/")]
    add("```bash\n" + "\n".join(display_argv(stage.argv) for stage in first) + "\n```")
    return "\n".join(out) + "\n"


def plan_stage(plan: Plan, name: str) -> Stage:
    return next(stage for stage in plan.stages if stage.name == name)


# =====================================================================================
# command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    sizes = "\n".join(
        f"  {name}: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(size).items()) for name, size in SIZES.items()
    )
    parser = argparse.ArgumentParser(
        description=__doc__, epilog=f"size presets (maskdiffusion_images=None: the whole test split):\n{sizes}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--work-dir", type=Path, default=Path("runs/protocol"),
                        help="where data, models, logs and stage records go; rerun to resume (default: %(default)s)")
    parser.add_argument("--results", type=Path, default=SCRIPT_DIR / "RESULTS.md",
                        help="the markdown file written at the end (default: %(default)s)")
    parser.add_argument("--size", choices=sorted(SIZES), default="default",
                        help="preset of the scale flags below; quick is a smoke run (default: %(default)s)")
    parser.add_argument("--model", default="shapesworld",
                        help="ShapesWorld pipeline folder, or 'shapesworld' (the embedded model); copied to WORK/model "
                             "once (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="first seed; seed n renders, generates, trains and seeds MaskDiffusion (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=None, metavar="N",
                        help=f"run everything once per seed SEED .. SEED+N-1; figures are mean ± sd (default: "
                             f"{DEFAULT_SEEDS['default']} at --size default, {DEFAULT_SEEDS['quick']} at quick)")
    parser.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                        help=f"scale the preset's generated images, training steps and MaskDiffusion images down until "
                             f"the fitted time model predicts every seed's stages fit MINUTES (default: "
                             f"{DEFAULT_BUDGET_MINUTES:g} at --size default without scale flags, else none)")
    scale = parser.add_argument_group("scale (default: the --size preset, listed below)")
    scale.add_argument("--images-per-class", type=int, help="prompts per class of each synthetic set")
    scale.add_argument("--real-train-size", type=int, help="rendered training scenes")
    scale.add_argument("--real-val-size", type=int, help="rendered validation scenes (the oracle's score)")
    scale.add_argument("--real-test-size", type=int, help="rendered test scenes (every test score)")
    scale.add_argument("--train-steps", type=int, help="optimizer steps of every compared segmenter")
    scale.add_argument("--oracle-steps", type=int, help="optimizer steps of the oracle")
    scale.add_argument("--gen-steps", type=int, help="denoising steps of the generators")
    scale.add_argument("--maskdiffusion-images", type=int, help="test images MaskDiffusion segments")
    common = parser.add_argument_group("shared by every run")
    common.add_argument("--image-size", type=int, help="segmenter input side (default: the model's image size)")
    common.add_argument("--batch-size", type=int, default=16,
                        help="segmenter training batch size per process (default: %(default)s)")
    common.add_argument("--learning-rate", type=float, default=2e-3, help="segmenter learning rate (default: %(default)s)")
    common.add_argument("--gen-batch-size", type=int, default=4,
                        help="prompts per pipeline call in generate (default: %(default)s)")
    common.add_argument("--counterfactual-loss", choices=sorted(COUNTERFACTUAL_LOSSES), default="embedding",
                        help="form of the counterfactual loss in every run on counterfactual data (default: %(default)s)")
    common.add_argument("--counterfactual-weight", type=float, default=1.0,
                        help="its weight in the test runs (default: %(default)s, MagicSeg's)")
    common.add_argument("--counterfactual-sweep", nargs="+", type=float, default=[], metavar="W",
                        help="also train on the Counterfactual set at each weight W (and 0) and score on validation")
    common.add_argument("--unseen-classes", nargs="+", default=["triangle"], metavar="NAME",
                        help="zero-shot: shapes left out of the real training labels (default: triangle)")
    running = parser.add_argument_group("running")
    running.add_argument("--accelerate", metavar="ARGS",
                         help="run generate / train / evaluate as `accelerate launch ARGS -m diffuseg ...`, "
                              "e.g. --accelerate=\"--multi_gpu --num_processes 4\" (default: plain `diffuseg`)")
    running.add_argument("--device", help="MaskDiffusion device (default: cuda when available, else cpu)")
    running.add_argument("--show-output", action="store_true",
                         help="print each command's output (default: only to WORK/logs/<stage>.log)")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    preset = SIZES[args.size]
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Size) if getattr(args, f.name, None) is not None}
    for name, value in overrides.items():
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    seeds = args.seeds if args.seeds is not None else DEFAULT_SEEDS[args.size]
    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    budget = args.time_budget
    if budget is None and args.size == "default" and not overrides:
        budget = DEFAULT_BUDGET_MINUTES
    settings = Settings(
        work_dir=args.work_dir, size_name=args.size + (" (with overrides)" if overrides else ""),
        size=dataclasses.replace(preset, **overrides), seeds=tuple(range(args.seed, args.seed + seeds)),
        time_budget_minutes=budget, image_size=args.image_size,
        batch_size=args.batch_size, learning_rate=args.learning_rate, gen_batch_size=args.gen_batch_size,
        unseen_classes=tuple(args.unseen_classes), accelerate=args.accelerate, device=args.device,
        model_source=args.model, counterfactual_loss=args.counterfactual_loss,
        counterfactual_weight=args.counterfactual_weight, counterfactual_sweep=tuple(args.counterfactual_sweep),
    )
    return settings


def write_prompt_files(world: ModelWorld, folder: Path) -> None:
    """The class file (each shape with its colours but the held-out pairs' as context words) and the
    templates of generate's ``shapes`` preset: prompts in the world's grammar without the held-out pairs."""
    from diffuseg.generation import parse_classes
    from diffuseg.shapesworld.render import HELD_OUT_PAIRS

    folder.mkdir(parents=True, exist_ok=True)
    classes = {shape: {"contexts": [c for c in world.colors if (c, shape) not in HELD_OUT_PAIRS]} for shape in world.shapes}
    (folder / "seen-pairs-classes.json").write_text(json.dumps(classes, indent=1), encoding="utf-8")
    (folder / "shapes-templates.txt").write_text("\n".join(parse_classes("shapes").templates) + "\n", encoding="utf-8")


def helper_main(argv: Sequence[str]) -> int:
    """``split-test MODEL REAL OUT`` and ``score-geometry MODEL DATASET REPORT``: the plan's own steps."""
    command, model, source, target = argv
    world = model_world(model)
    if command == "split-test":
        print(json.dumps(split_test_by_held_out_pairs(Path(source), Path(target), world.shapes, world.colors)))
    else:
        report = geometry_scores(Path(source), world.shapes, world.colors)
        Path(target).write_text(json.dumps(report, indent=1), encoding="utf-8")
    return 0


HELPERS = ("split-test", "score-geometry")


def main(argv: Sequence[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else list(argv)
    if raw and raw[0] in HELPERS:
        return helper_main(raw)
    args = parse_args(argv)
    settings = settings_from(args)
    started = time.perf_counter()
    work = settings.work_dir
    work.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    copied = snapshot_model(args.model, work / "model")
    snapshot_seconds = time.perf_counter() - t0
    world = model_world(work / "model")
    from diffuseg.generation import parse_classes

    preset = parse_classes("shapes").names
    if list(world.shapes) != preset:
        raise ValueError(f"the model's world has shapes {list(world.shapes)}, but generate's 'shapes' preset is {preset}")
    missing = sorted(set(settings.unseen_classes) - set(world.shapes))
    if missing:
        raise ValueError(f"--unseen-classes {missing} are not shapes of the model's world ({', '.join(world.shapes)})")
    print(f"model snapshot {work / 'model'} ({'copied from ' + args.model if copied else 'taken earlier'}; "
          f"UNet step {world.unet_step})", flush=True)

    if settings.time_budget_minutes is not None:
        fitted, predicted = fit_size(settings, world, 60 * settings.time_budget_minutes, DEFAULT_COST_LINES)
        settings = dataclasses.replace(settings, size=fitted)
        print(f"{len(settings.seeds)} seeds in {settings.time_budget_minutes:g} min: {fitted} "
              f"(predicted {minutes(predicted)})", flush=True)
    write_prompt_files(world, work / "prompts")

    plan = Plan(settings, world)
    records = run_plan(plan, folder_digest(work / "model"), args.show_output)

    default_settings = dataclasses.replace(settings, size=SIZES["default"], size_name="default",
                                           seeds=tuple(range(DEFAULT_SEEDS["default"])))
    default_settings = dataclasses.replace(
        default_settings, size=fit_size(default_settings, world, 60 * DEFAULT_BUDGET_MINUTES, DEFAULT_COST_LINES)[0])
    default_plan = Plan(default_settings, world)
    measured = [(stage, records[stage.name].seconds) for stage in plan.stages if not records[stage.name].skipped]
    estimate = estimate_seconds(default_plan.stages, measured, records["probe"].seconds)

    command = display_argv([sys.executable, *sys.argv]) if argv is None else display_argv(
        [sys.executable, __file__, *argv])
    text = render_results(
        plan, records, command=command, default_estimate=estimate, snapshot_seconds=snapshot_seconds,
        wall_seconds=time.perf_counter() - started, machine_info=machine(), commit=git_commit(),
        now=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        rows={key: [count_rows(plan.synth(seed, key)) for seed in settings.seeds]
              for key in {*PIPELINES, ALL_PAIRS_SET, *(k for k, *_ in ABLATIONS)}},
    )
    args.results.parent.mkdir(parents=True, exist_ok=True)
    staging = args.results.with_name(args.results.name + ".partial")
    staging.write_text(text, encoding="utf-8")
    staging.replace(args.results)
    print(f"\nwrote {args.results}; stage times sum to {minutes(sum(s for _, s in measured) + snapshot_seconds)}; "
          f"--size default estimated at {minutes(estimate)} on this machine")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
