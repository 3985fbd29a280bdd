"""ShapesWorld protocol: the papers' experiments, end to end, on the embedded model.

    python benchmarks/shapesworld_protocol.py                   # default size: <= 90 min on 2 CPU cores
    python benchmarks/shapesworld_protocol.py --size quick      # smoke run, about 8 minutes
    python benchmarks/shapesworld_protocol.py --images-per-class 1000 --train-steps 8000 \\
        --accelerate "--multi_gpu --num_processes 4"            # scaled up on GPUs

Every stage is a command a user would type (``diffuseg generate / train / evaluate``,
``benchmarks/maskdiffusion_eval.py``), run in a subprocess and listed in the results file:

1. snapshot the model into the work dir (the embedded model is re-exported while it trains;
   every stage uses the snapshot), render the "real" ShapesWorld data (train / validation / test);
2. synthetic sets from DiffuMask, Free-Mask and Counterfactual (``diffuseg generate``);
3. an oracle segmenter trained on rendered data: its validation mIoU, then each generator's
   masks scored against its predictions on the generated images (255 stays ignored);
4. the same small segmenter trained on real, on each synthetic set, and on real + each set
   (equal budgets: steps, batch, image size, learning rate, seed), scored on rendered test data;
5. zero-shot: ``--unseen-classes`` ignored in the real training labels, kept in the synthetic
   sets; seen / unseen / harmonic mIoU;
6. MagicSeg: counterfactual sets trained with and without the counterfactual loss
   (``--counterfactual-loss``, ``--counterfactual-weight``); ``--counterfactual-sweep W ...``
   adds one run per weight scored on the *validation* split, to choose the weight there;
7. MaskDiffusion, training-free, on the rendered test images: with and without background
   handling, and unsupervised (k chosen per image, one cluster-label matching for the split),
   beside the oracle (k and matching from each image's labels).

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
    seed: int = 0
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


@dataclass
class Record:
    """What a stage left: its fingerprint, time, result, and whether this invocation ran it."""

    name: str
    fingerprint: str
    seconds: float
    result: Any = None
    reused: bool = False


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
    """The stages of a protocol run, built from its settings (pure: nothing runs here)."""

    def __init__(self, settings: Settings, world: ModelWorld, script_dir: Path | None = None) -> None:
        script_dir = script_dir or SCRIPT_DIR
        self.s, self.world = settings, world
        size = settings.size
        work = settings.work_dir
        self.model = work / "model"
        self.real = work / "real"
        self.synth = {p: work / "synth" / p for p in PIPELINES}
        self.models = work / "models"
        self.image_size = settings.image_size or world.image_size
        self.stages: list[Stage] = []

        self.add("probe", "probe", [sys.executable, "-c", "import diffuseg.pipelines, diffuseg.training, diffuseg.evaluation"], 1)
        render_call = (  # JSON literals are Python literals too, and keep the shell quoting simple
            "from diffuseg.shapesworld.dataset import write_real_dataset; "
            f"write_real_dataset({json.dumps(str(self.real))}, {size.real_train_size}, {size.real_val_size}, "
            f"{size.real_test_size}, {settings.seed}, size={world.image_size}, shapes={json.dumps(list(world.shapes))}, "
            f"colors={json.dumps(list(world.colors))})"
        )
        real_images = size.real_train_size + size.real_val_size + size.real_test_size
        self.add("render", "render", [sys.executable, "-c", render_call], real_images, [self.real], ["snapshot"])

        for pipeline in PIPELINES:
            self.add(
                f"generate/{pipeline}", "generate",
                self.diffuseg("generate") + [
                    "--model", str(self.model), "--pipeline", pipeline, "--classes", "shapes",
                    "--images-per-class", str(size.images_per_class), "--steps", str(size.gen_steps),
                    "--seed", str(settings.seed), "--batch-size", str(settings.gen_batch_size), "--out", str(self.synth[pipeline]),
                ],
                size.images_per_class * len(world.shapes), [self.synth[pipeline]], ["snapshot"],
            )

        # The oracle: trained on rendered data, scored on rendered validation, then used as the reference for masks.
        self.train_run("oracle", [self.real], steps=size.oracle_steps)
        self.evaluate("oracle", "oracle-validation", self.real, "validation", size.real_val_size, ["render"])
        for pipeline in PIPELINES:
            self.evaluate("oracle", f"oracle-on-{pipeline}", self.synth[pipeline], "train",
                          size.images_per_class * len(world.shapes), [f"generate/{pipeline}"])

        # Train on synthetic vs train on real; zero-shot; with / without the counterfactual loss.
        self.test_run("real", [self.real])
        for pipeline in PIPELINES:
            self.test_run(f"synth-{pipeline}", [self.synth[pipeline]])
            self.test_run(f"real+{pipeline}", [self.real, self.synth[pipeline]])
        self.test_run("zs-real", [self.real], unseen=True)
        for pipeline in PIPELINES:
            self.test_run(f"zs-real+{pipeline}", [self.real, self.synth[pipeline]], unseen=True)
        self.test_run("nocf-synth-counterfactual", [self.synth["counterfactual"]], counterfactual_weight=0.0)
        self.test_run("nocf-real+counterfactual", [self.real, self.synth["counterfactual"]], counterfactual_weight=0.0)
        # The weight is chosen on validation: the test split is not looked at for it.
        for weight in self.sweep_weights:
            key = sweep_key(weight)
            self.train_run(key, [self.synth["counterfactual"]], size.train_steps, counterfactual_weight=weight)
            self.evaluate(key, key, self.real, "validation", size.real_val_size, ["render"])

        test_images = size.real_test_size if size.maskdiffusion_images is None else min(size.maskdiffusion_images, size.real_test_size)
        for mode, (_, background_word, further) in MASKDIFFUSION_MODES.items():
            report = work / "reports" / f"maskdiffusion-{mode}.json"
            extra = list(further)
            if background_word is not None:
                extra += ["--background-prompt", background_word, "--prompt", caption_naming(world.shapes, background_word)]
            argv = [sys.executable, str(script_dir / "maskdiffusion_eval.py"), str(self.real), "--split", "test",
                    "--model", str(self.model), "--seed", str(settings.seed), "--output", str(report), *extra]
            if size.maskdiffusion_images is not None:
                argv += ["--limit", str(size.maskdiffusion_images)]
            if settings.device:
                argv += ["--device", settings.device]
            self.add(f"maskdiffusion/{mode}", "maskdiffusion", argv, test_images, [report], ["render", "snapshot"], report)

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

    def source_stage(self, dataset: Path) -> str:
        return "render" if dataset == self.real else f"generate/{dataset.name}"

    def train_run(self, key: str, datasets: Sequence[Path], steps: int, unseen: bool = False,
                  counterfactual_weight: float | None = None) -> None:
        """A ``diffuseg train`` stage; every run shares the budget except the step count given.

        ``counterfactual_weight`` None: the settings' weight.
        """
        if counterfactual_weight is None:
            counterfactual_weight = self.s.counterfactual_weight
        output = self.models / key
        argv = self.diffuseg("train") + ["--train", *map(str, datasets)]
        if len(datasets) > 1:
            argv += ["--train-weights", *["1"] * len(datasets)]
        if unseen:
            argv += ["--unseen-classes", *self.s.unseen_classes]
        argv += [
            "--counterfactual-weight", f"{counterfactual_weight:g}", "--counterfactual-loss", self.s.counterfactual_loss,
            "--config", "segformer-tiny",
            "--image-size", str(self.image_size), "--batch-size", str(self.s.batch_size),
            "--learning-rate", f"{self.s.learning_rate:g}", "--max-steps", str(steps), "--seed", str(self.s.seed),
            "--checkpoint-steps", str(max(1, steps // 4)), "--resume", "--output-dir", str(output),
        ]
        self.add(f"train/{key}", "train", argv, steps, [output], [self.source_stage(d) for d in datasets])

    def evaluate(self, key: str, name: str, dataset: Path, split: str, images: int, inputs: Sequence[str],
                 unseen: bool = False) -> None:
        argv = self.diffuseg("evaluate") + [str(self.models / key), str(dataset), "--split", split, "--batch-size", "32"]
        if unseen:
            argv += ["--unseen-classes", *self.s.unseen_classes]
        self.add(f"evaluate/{name}", "evaluate", argv + ["--json"], images, [], [f"train/{key}", *inputs])

    def test_run(self, key: str, datasets: Sequence[Path], unseen: bool = False,
                 counterfactual_weight: float | None = None) -> None:
        """Train with the common budget, then score on the rendered test split."""
        self.train_run(key, datasets, self.s.size.train_steps, unseen, counterfactual_weight)
        self.evaluate(key, key, self.real, "test", self.s.size.real_test_size, ["render"], unseen)


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
    total = len(plan.stages)
    for number, stage in enumerate(plan.stages, start=1):
        fingerprint = stage_fingerprint(stage, fingerprints)
        fingerprints[stage.name] = fingerprint
        label = f"[{number:>2}/{total}] {stage.name:<38}"
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


def class_iou_row(report: Mapping[str, Any] | None, classes: Sequence[str]) -> list[str]:
    """Per-class IoU (in %) of an evaluation report, in ``classes`` order."""
    per_class = (report or {}).get("per_class", {})
    return [percent(per_class.get(name, {}).get("iou")) for name in classes]


@dataclass(frozen=True)
class Target:
    """A bar from the issue and what this run achieved."""

    name: str
    value: float | None
    bar: float

    @property
    def verdict(self) -> str:
        if self.value is None:
            return "not measured"
        return "met" if self.value >= self.bar else "not met"


def targets(results: Mapping[str, Mapping[str, Any] | None], unseen: Sequence[str]) -> list[Target]:
    """The issue's three targets, from the evaluation reports (keyed by stage name)."""

    def metric(stage: str, key: str) -> float | None:
        return (results.get(stage) or {}).get(key)

    found = [
        Target(f"{PIPELINE_TITLES[p]} synthetic-only ÷ real-only mIoU",
               ratio(metric(f"evaluate/synth-{p}", "mean_iou"), metric("evaluate/real", "mean_iou")), SYNTHETIC_OVER_REAL_BAR)
        for p in PIPELINES
    ]
    found += [
        Target(f"{PIPELINE_TITLES[p]} zero-shot unseen ÷ seen mIoU ({', '.join(unseen)} unseen)",
               ratio(metric(f"evaluate/zs-real+{p}", "mean_iou_unseen"), metric(f"evaluate/zs-real+{p}", "mean_iou_seen")),
               UNSEEN_OVER_SEEN_BAR)
        for p in PIPELINES
    ]
    found += [
        Target(f"MaskDiffusion mIoU ({title})", metric(f"maskdiffusion/{mode}", "mean_iou"), MASKDIFFUSION_BAR)
        for mode, (title, _, _) in MASKDIFFUSION_MODES.items()
        if not title.startswith("oracle")
    ]
    return found


def cost_group(stage: Stage) -> str:
    """Stages whose work costs the same per unit: each generator on its own, else one group per kind."""
    return stage.name if stage.kind == "generate" else stage.kind


def estimate_seconds(stages: Sequence[Stage], measured: Sequence[tuple[Stage, float]], startup: float) -> float:
    """Run time of ``stages`` from stage times measured at another size.

    Each command costs ``fixed + per_unit * units`` (units: images, steps), one line per
    :func:`cost_group`. Where a group was measured at two or more sizes (the oracle trains
    longer than the compared runs) the line is a least-squares fit; otherwise its fixed cost is
    ``startup`` (starting Python and importing diffuseg's modules, measured) and its cost per unit
    is pooled over the group's stages, so one slow or fast start does not swing the estimate.
    A group never measured counts ``startup`` only.
    """
    import numpy as np

    points: dict[str, list[tuple[float, float]]] = {}
    for stage, seconds in measured:
        points.setdefault(cost_group(stage), []).append((stage.units, seconds))
    lines: dict[str, tuple[float, float]] = {}
    for group, pairs in points.items():
        units, seconds = np.array(pairs, dtype=float).T
        slope = None
        if len(set(units)) > 1:
            slope, fixed = np.polyfit(units, seconds, 1)
        if slope is None or slope < 0 or fixed < 0:
            fixed, slope = startup, max(float((seconds - startup).sum()), 0.0) / max(float(units.sum()), 1e-9)
        lines[group] = (float(fixed), float(slope))
    return sum(lines.get(cost_group(s), (startup, 0.0))[0] + lines.get(cost_group(s), (startup, 0.0))[1] * s.units
               for s in stages)


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
                   commit: str, now: str, rows: Mapping[str, int | None]) -> str:
    """The whole RESULTS.md text from the records of a run."""
    s, world, size = plan.s, plan.world, plan.s.size
    results = {name: record.result for name, record in records.items()}
    shapes = list(world.shapes)
    columns = ["background", *shapes]
    unseen = list(s.unseen_classes)
    out: list[str] = []
    add = out.append

    add("# ShapesWorld protocol: results\n")
    add(f"Written by `benchmarks/shapesworld_protocol.py` on {now} at **size `{s.size_name}`**"
        + (" (a smoke run: far too small for the figures to mean much)" if s.size_name == "quick" else "")
        + ". Every figure below comes from the run's own records; rerun the script to update this file, "
        "never edit it by hand.\n")
    add(f"```bash\n{command}\n```\n")
    step = "n/a" if world.unet_step is None else str(world.unet_step)
    psnr = "" if world.vae_psnr is None else f", VAE PSNR {world.vae_psnr:.1f} dB"
    settings_rows = [
        ("model", f"snapshot `{plan.model}` (UNet step {step}{psnr})"),
        ("world", f"shapes {', '.join(shapes)}; colours {', '.join(world.colors)}; {world.image_size} px"),
        ("real data (rendered)", f"{size.real_train_size} train / {size.real_val_size} validation / {size.real_test_size} test "
                                 "scenes (train never shows the held-out colour-shape pairs)"),
        ("synthetic sets", f"{size.images_per_class} prompts per class × {len(shapes)} classes per pipeline, "
                           f"{size.gen_steps} DDIM steps, generate's defaults otherwise"),
        ("segmenter (every run)", f"segformer-tiny from scratch, {plan.image_size} px, batch {s.batch_size}, "
                                  f"lr {s.learning_rate:g} (linear decay), {size.train_steps} steps; mixtures 1:1"),
        ("oracle", f"the same segmenter, {size.oracle_steps} steps on the rendered train split"),
        ("seeds", f"{s.seed} everywhere (rendering, generation, training, MaskDiffusion noise)"),
        ("zero-shot unseen classes", ", ".join(unseen)),
        ("code", f"git {commit}"),
        *machine_info.items(),
    ]
    add(markdown_table(["setting", "value"], settings_rows, numeric=False) + "\n")
    add("IoU figures are percentages; mIoU is `diffuseg.metrics.mean_iou` over background and the shapes "
        "(the Hub `mean_iou` definitions; 255 is ignored).\n")

    add("## 1. Synthetic sets\n")
    table = []
    for p in PIPELINES:
        seconds = records[f"generate/{p}"].seconds
        n = rows.get(p)
        table.append([PIPELINE_TITLES[p], n if n is not None else "n/a", f"{seconds:.0f}",
                      number(ratio(seconds, n), 2)])
    add(markdown_table(["pipeline", "rows", "seconds (with start-up)", "seconds / row"], table) + "\n")

    add("## 2. Mask quality against the oracle\n")
    oracle = results.get("evaluate/oracle-validation") or {}
    add(f"The oracle (segmenter trained on rendered data) scores **mIoU {percent(oracle.get('mean_iou'))}** on "
        f"rendered validation ({' / '.join(f'{n} {v}' for n, v in zip(columns, class_iou_row(oracle, columns)))}). "
        "Each generator's masks are scored against the oracle's predictions on the generated images:\n")
    table = [["oracle on rendered validation (reference)", *class_iou_row(oracle, columns), percent(oracle.get("mean_iou"))]]
    for p in PIPELINES:
        report = results.get(f"evaluate/oracle-on-{p}")
        table.append([f"{PIPELINE_TITLES[p]} masks", *class_iou_row(report, columns), percent((report or {}).get("mean_iou"))])
    add(markdown_table(["masks", *columns, "mIoU"], table) + "\n")

    add("## 3. Train on synthetic vs train on real\n")
    add(f"Scored on the rendered test split ({size.real_test_size} images); equal budgets.\n")
    real_miou = (results.get("evaluate/real") or {}).get("mean_iou")
    table = []
    for key, title in [("real", "(a) real"), *[(f"synth-{p}", f"(b) {PIPELINE_TITLES[p]} only") for p in PIPELINES],
                       *[(f"real+{p}", f"(c) real + {PIPELINE_TITLES[p]}") for p in PIPELINES]]:
        report = results.get(f"evaluate/{key}") or {}
        table.append([title, *class_iou_row(report, columns), percent(report.get("mean_iou")),
                      number(ratio(report.get("mean_iou"), real_miou))])
    add(markdown_table(["training data", *columns, "mIoU", "÷ real"], table) + "\n")

    add(f"## 4. Zero-shot: {', '.join(unseen)} unseen in the real training labels\n")
    add("The unseen classes are set to ignore (255) in the real training set only; the synthetic sets keep "
        "them. Seen mIoU includes background (DiffuMask / Free-Mask VOC protocol).\n")
    table = []
    for key, title in [("zs-real", "real (seen labels only)"),
                       *[(f"zs-real+{p}", f"real (seen) + {PIPELINE_TITLES[p]}") for p in PIPELINES]]:
        report = results.get(f"evaluate/{key}") or {}
        seen, unseen_iou = report.get("mean_iou_seen"), report.get("mean_iou_unseen")
        table.append([title, percent(seen), percent(unseen_iou), percent(report.get("harmonic_mean_iou")),
                      number(ratio(unseen_iou, seen))])
    add(markdown_table(["training data", "seen mIoU", "unseen mIoU", "harmonic", "unseen ÷ seen"], table) + "\n")

    add("## 5. MagicSeg: the counterfactual loss\n")
    add(f"Counterfactual sets with their `negative_image`, trained with `--counterfactual-loss {s.counterfactual_loss}` "
        f"(`{s.counterfactual_loss}`: {COUNTERFACTUAL_LOSSES.get(s.counterfactual_loss, '')}) at "
        f"`--counterfactual-weight {s.counterfactual_weight:g}` and at `0`; same budget.\n")
    table = []
    for data, with_key, without_key in [("Counterfactual only", "synth-counterfactual", "nocf-synth-counterfactual"),
                                        ("real + Counterfactual", "real+counterfactual", "nocf-real+counterfactual")]:
        with_loss = (results.get(f"evaluate/{with_key}") or {}).get("mean_iou")
        without = (results.get(f"evaluate/{without_key}") or {}).get("mean_iou")
        delta = None if with_loss is None or without is None else with_loss - without
        table.append([data, percent(without), percent(with_loss), "n/a" if delta is None else f"{100 * delta:+.1f}"])
    add(markdown_table(["training data", "mIoU without loss", "mIoU with loss", "difference"], table) + "\n")
    if plan.sweep_weights:
        add("Weight sweep on the rendered **validation** split (Counterfactual set only; the test split is not used "
            "to choose the weight):\n")
        sweep = [(weight, (results.get(f"evaluate/{sweep_key(weight)}") or {}).get("mean_iou")) for weight in plan.sweep_weights]
        add(markdown_table(["counterfactual weight", "validation mIoU"], [[f"{w:g}", percent(v)] for w, v in sweep]) + "\n")
        scored = [(v, w) for w, v in sweep if v is not None]
        if scored:
            best_value, best_weight = max(scored)
            add(f"Best on validation: weight {best_weight:g} ({percent(best_value)}); rerun with "
                f"`--counterfactual-weight {best_weight:g}` for its test rows.\n")

    add("## 6. MaskDiffusion, training-free\n")
    md_images = (results.get("maskdiffusion/background") or {}).get("num_images", "n/a")
    add(f"Rendered test images ({md_images}); candidate classes: every shape, named in one caption of the world's "
        "own grammar (`--prompt`, in the commands below). With the background word, a named class whose region "
        "covers under 12% of the image is judged absent and prototypes count attention above 0.5 only (both "
        "chosen on the validation split). Without background handling the reference background pixels are not "
        "scored (the paper's setting). Unsupervised: k-means with k chosen per image by silhouette, cluster ids "
        "(by size) matched to labels once for the whole split (Hungarian); the oracle row takes k and the "
        "matching from each test image's labels.\n")
    table = []
    for mode, (title, _, _) in MASKDIFFUSION_MODES.items():
        report = results.get(f"maskdiffusion/{mode}") or {}
        table.append([title, *class_iou_row(report, columns), percent(report.get("mean_iou"))])
    add(markdown_table(["mode", *columns, "mIoU"], table) + "\n")

    add("## Targets\n")
    add(f"From the issue; DiffuMask's own synthetic ÷ real ratio on VOC is {DIFFUMASK_VOC_RATIO}.\n")
    add(markdown_table(["target", "achieved", "bar", "verdict"],
                       [[t.name, number(t.value), f"≥ {t.bar}", t.verdict] for t in targets(results, unseen)]) + "\n")

    add("## Run time\n")
    measured = sum(record.seconds for record in records.values()) + snapshot_seconds
    reused = [name for name, record in records.items() if record.reused]
    add(f"Sum of the stage times: **{minutes(measured)}** ({measured:.0f} s); wall time of this invocation "
        f"{minutes(wall_seconds)}" + (f" ({len(reused)} stages reused from an earlier invocation)" if reused else "") + ".\n")
    if default_estimate is not None:
        startup = records["probe"].seconds
        add(f"Estimated time of `--size default` (with this run's other flags) on this machine: "
            f"**{minutes(default_estimate)}**, from this run's stage times: each command costs a fixed part plus a "
            "part proportional to its work (images generated or scored, training steps), fitted per kind of stage "
            "(each generator apart) where this run measured two sizes (training: oracle vs compared runs), else "
            f"with the measured start-up ({startup:.1f} s: Python and diffuseg's imports) as the fixed part.\n")
    table = [["snapshot of the model", f"{snapshot_seconds:.1f}", "", ""]]
    table += [[f"`{name}`", f"{record.seconds:.1f}", f"{plan_stage(plan, name).units:g}",
               "reused" if record.reused else "run"] for name, record in records.items()]
    add(markdown_table(["stage", "seconds", "work units", "this invocation"], table) + "\n")

    add("## Commands\n")
    add("In order, from the repository root (`python` is the interpreter that ran the protocol; "
        "environment: " + f"`OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}`). The model snapshot "
        f"is a copy of `{s.model_source}` into `{plan.model}`.\n")
    add("```bash\n" + "\n".join(display_argv(stage.argv) for stage in plan.stages) + "\n```")
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
                        help="seed of rendering, generation, training and MaskDiffusion (default: %(default)s)")
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
    settings = Settings(
        work_dir=args.work_dir, size_name=args.size + (" (with overrides)" if overrides else ""),
        size=dataclasses.replace(preset, **overrides), seed=args.seed, image_size=args.image_size,
        batch_size=args.batch_size, learning_rate=args.learning_rate, gen_batch_size=args.gen_batch_size,
        unseen_classes=tuple(args.unseen_classes), accelerate=args.accelerate, device=args.device,
        model_source=args.model, counterfactual_loss=args.counterfactual_loss,
        counterfactual_weight=args.counterfactual_weight, counterfactual_sweep=tuple(args.counterfactual_sweep),
    )
    return settings


def main(argv: Sequence[str] | None = None) -> int:
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

    plan = Plan(settings, world)
    records = run_plan(plan, folder_digest(work / "model"), args.show_output)

    default_plan = Plan(dataclasses.replace(settings, size=SIZES["default"], size_name="default"), world)
    measured = [(stage, records[stage.name].seconds) for stage in plan.stages]
    estimate = estimate_seconds(default_plan.stages, measured, records["probe"].seconds)

    command = display_argv([sys.executable, *sys.argv]) if argv is None else display_argv(
        [sys.executable, __file__, *argv])
    text = render_results(
        plan, records, command=command, default_estimate=estimate, snapshot_seconds=snapshot_seconds,
        wall_seconds=time.perf_counter() - started, machine_info=machine(), commit=git_commit(),
        now=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        rows={p: count_rows(plan.synth[p]) for p in PIPELINES},
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
