"""benchmarks/shapesworld_protocol.py: the plan, the stage records, the figures and the results file."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from diffuseg.shapesworld import ModelWorld

REPO = Path(__file__).resolve().parents[1]


def _load_protocol():
    spec = importlib.util.spec_from_file_location("shapesworld_protocol", REPO / "benchmarks" / "shapesworld_protocol.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


protocol = _load_protocol()
WORLD = ModelWorld(("circle", "square", "triangle"), ("red", "green", "blue"), 64, unet_step=1234, vae_psnr=26.0)


def _plan(tmp_path: Path, **changes) -> "protocol.Plan":
    size = protocol.dataclasses.replace(protocol.SIZES["quick"], **changes)
    settings = protocol.Settings(work_dir=tmp_path / "work", size_name="quick", size=size)
    return protocol.Plan(settings, WORLD)


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_compared_runs_share_one_budget_and_zero_shot_runs_hold_out_classes(tmp_path):
    plan = _plan(tmp_path)
    trains = {s.name: s.argv for s in plan.stages if s.kind == "train" and s.name != "train/oracle"}
    assert len(trains) == 13  # real, 3 synthetic, 3 mixed, 4 zero-shot, 2 without the counterfactual loss
    budget = {name: [_flag(argv, f) for f in ("--max-steps", "--batch-size", "--image-size", "--learning-rate", "--seed")]
              for name, argv in trains.items()}
    assert len({tuple(b) for b in budget.values()}) == 1, budget
    assert _flag(plan.stages[[s.name for s in plan.stages].index("train/oracle")].argv, "--max-steps") == "400"
    for name, argv in trains.items():
        assert ("--unseen-classes" in argv) == name.startswith("train/zs-"), name
        assert _flag(argv, "--counterfactual-weight") == ("0" if "nocf" in name else "1")
        assert _flag(argv, "--counterfactual-loss") == "embedding"  # MagicSeg's form by default
    evaluations = {s.name: s.argv for s in plan.stages if s.kind == "evaluate"}
    assert _flag(evaluations["evaluate/zs-real+freemask"], "--unseen-classes") == "triangle"
    assert _flag(evaluations["evaluate/real"], "--split") == "test"
    assert _flag(evaluations["evaluate/oracle-on-diffumask"], "--split") == "train"  # the generated masks
    maskdiffusion = {s.name: s.argv for s in plan.stages if s.kind == "maskdiffusion"}
    assert _flag(maskdiffusion["maskdiffusion/clusters"], "--clusters") == "auto"  # k chosen by the method
    assert _flag(maskdiffusion["maskdiffusion/oracle-clusters"], "--clusters") == "gt"
    assert _flag(maskdiffusion["maskdiffusion/background"], "--min-class-share") == "0.12"


def test_counterfactual_weight_sweep_is_scored_on_validation_only(tmp_path):
    settings = protocol.Settings(work_dir=tmp_path / "work", size_name="quick", size=protocol.SIZES["quick"],
                                 counterfactual_loss="absence", counterfactual_sweep=(0.3, 1.0))
    plan = protocol.Plan(settings, WORLD)
    sweep = {s.name: s.argv for s in plan.stages if "cfsweep" in s.name}
    assert sorted(sweep) == ["evaluate/cfsweep-0", "evaluate/cfsweep-0.3", "evaluate/cfsweep-1",
                             "train/cfsweep-0", "train/cfsweep-0.3", "train/cfsweep-1"]
    for weight in ("0", "0.3", "1"):
        assert _flag(sweep[f"train/cfsweep-{weight}"], "--counterfactual-weight") == weight
        assert _flag(sweep[f"train/cfsweep-{weight}"], "--counterfactual-loss") == "absence"
        assert _flag(sweep[f"evaluate/cfsweep-{weight}"], "--split") == "validation"
    assert not [s for s in _plan(tmp_path).stages if "cfsweep" in s.name]  # no sweep unless asked


def test_fingerprints_follow_inputs(tmp_path):
    def fingerprints(plan):
        known = {"snapshot": "model-a"}
        for stage in plan.stages:
            known[stage.name] = protocol.stage_fingerprint(stage, known)
        return known

    base = fingerprints(_plan(tmp_path))
    more_images = fingerprints(_plan(tmp_path, images_per_class=9))
    assert more_images["generate/diffumask"] != base["generate/diffumask"]
    assert more_images["train/synth-diffumask"] != base["train/synth-diffumask"]  # downstream of the set
    assert more_images["evaluate/synth-diffumask"] != base["evaluate/synth-diffumask"]
    assert more_images["train/real"] == base["train/real"]  # real data only: unaffected
    assert more_images["maskdiffusion/background"] == base["maskdiffusion/background"]


def test_stage_records_skip_finished_work_and_clear_stale_outputs(tmp_path):
    work = tmp_path / "work"
    output = tmp_path / "out.txt"
    script = f"import pathlib; p = pathlib.Path({str(output)!r}); p.write_text(p.read_text() + 'x' if p.exists() else 'x'); print('{{\"n\": 1}}')"
    stage = protocol.Stage("demo/one", "probe", [sys.executable, "-c", script], 1, outputs=[output])
    fingerprint = protocol.stage_fingerprint(stage, {})
    assert protocol.finished_record(work, stage.name, fingerprint) is None

    record = protocol.run_stage(stage, work, fingerprint)
    assert record.result == {"n": 1} and not record.reused and output.read_text() == "x"
    again = protocol.finished_record(work, stage.name, fingerprint)
    assert again.reused and again.result == {"n": 1} and again.seconds == pytest.approx(record.seconds)

    # An interrupted run of the same stage keeps its outputs (the command resumes them) ...
    path = protocol.stage_file(work, stage.name)
    path.write_text(json.dumps({"fingerprint": fingerprint, "status": "running"}))
    assert protocol.finished_record(work, stage.name, fingerprint) is None
    protocol.run_stage(stage, work, fingerprint)
    assert output.read_text() == "xx"
    # ... other settings start from clean outputs.
    changed = protocol.Stage("demo/one", "probe", [*stage.argv], 1, outputs=[output], inputs=["up"])
    other = protocol.stage_fingerprint(changed, {"up": "new"})
    assert other != fingerprint and protocol.finished_record(work, stage.name, other) is None
    protocol.run_stage(changed, work, other)
    assert output.read_text() == "x"

    failing = protocol.Stage("demo/fail", "probe", [sys.executable, "-c", "raise SystemExit(3)"], 1)
    with pytest.raises(RuntimeError, match="demo/fail failed"):
        protocol.run_stage(failing, work, "f")


def test_ratios_targets_and_estimate():
    assert protocol.ratio(0.45, 0.5) == pytest.approx(0.9)
    assert protocol.ratio(None, 0.5) is None and protocol.ratio(0.3, 0.0) is None
    results = {
        "evaluate/real": {"mean_iou": 0.5},
        "evaluate/synth-diffumask": {"mean_iou": 0.45},
        "evaluate/synth-freemask": {"mean_iou": 0.2},
        "evaluate/zs-real+diffumask": {"mean_iou_seen": 0.6, "mean_iou_unseen": 0.3},
        "maskdiffusion/background": {"mean_iou": 0.61},
    }
    found = {t.name: t for t in protocol.targets(results, ["triangle"])}
    assert found["DiffuMask synthetic-only ÷ real-only mIoU"].verdict == "met"  # 0.9 is the bar, inclusive
    assert found["Free-Mask synthetic-only ÷ real-only mIoU"].verdict == "not met"
    assert found["Counterfactual synthetic-only ÷ real-only mIoU"].verdict == "not measured"
    assert found["DiffuMask zero-shot unseen ÷ seen mIoU (triangle unseen)"].value == pytest.approx(0.5)
    assert found["MaskDiffusion mIoU (open vocabulary, background word, presence decided)"].verdict == "met"
    assert not [name for name in found if "oracle" in name]  # an oracle figure is no target

    def stage(name, kind, units):
        return protocol.Stage(name, kind, [], units)

    measured = [
        (stage("train/a", "train", 100), 15.0), (stage("train/b", "train", 200), 25.0),  # two sizes: fit 5 s + 0.1 s/step
        (stage("evaluate/a", "evaluate", 10), 9.0), (stage("evaluate/b", "evaluate", 20), 19.0),  # fit below 0 s fixed:
        # start-up (5 s) + pooled work, (4 + 14) s / 30 images
        (stage("generate/x", "generate", 3), 11.0),  # each generator on its own: 5 s + 2 s per image
        (stage("generate/y", "generate", 3), 3.0),  # faster than start-up: no work cost, never negative
    ]
    target = [stage("train/a", "train", 1000), stage("train/c", "train", 500), stage("evaluate/a", "evaluate", 100),
              stage("generate/x", "generate", 30), stage("generate/y", "generate", 30), stage("new", "other", 5)]
    estimate = protocol.estimate_seconds(target, measured, startup=5.0)
    assert estimate == pytest.approx(105 + 55 + (5 + 100 * 0.6) + (5 + 60) + 5 + 5)


def test_markdown_table():
    assert protocol.markdown_table(["a", "b"], [["x", 1.5]]) == "| a | b |\n|:--|--:|\n| x | 1.5 |"


def test_results_file_is_written_from_the_records(tmp_path):
    plan = _plan(tmp_path)
    records = {}
    for number, stage in enumerate(plan.stages):
        result = None
        if stage.kind in ("evaluate", "maskdiffusion"):
            per_class = {name: {"iou": 0.5 + 0.01 * number, "accuracy": 0.9}
                         for name in ("background", "circle", "square", "triangle")}
            result = {"mean_iou": 0.5 + 0.01 * number, "per_class": per_class, "num_images": 50,
                      "mean_iou_seen": 0.8, "mean_iou_unseen": 0.2, "harmonic_mean_iou": 0.32}
        records[stage.name] = protocol.Record(stage.name, "f", float(number + 1), result, reused=number < 3)
    text = protocol.render_results(
        plan, records, command="python benchmarks/shapesworld_protocol.py --size quick", default_estimate=4000.0,
        snapshot_seconds=0.5, wall_seconds=100.0, machine_info={"CPUs": "2"}, commit="abc123", now="2025-01-01 00:00 UTC",
        rows={"diffumask": 24, "freemask": 23, "counterfactual": None},
    )
    assert "**size `quick`**" in text and "UNet step 1234" in text
    for heading in ("## 1. Synthetic sets", "## 2. Mask quality", "## 3. Train on synthetic", "## 4. Zero-shot",
                    "## 5. MagicSeg", "## 6. MaskDiffusion", "## Targets", "## Run time", "## Commands"):
        assert heading in text
    real = records["evaluate/real"].result["mean_iou"]
    synth = records["evaluate/synth-diffumask"].result["mean_iou"]
    assert f"| {100 * synth:.1f} | {synth / real:.2f} |" in text  # mIoU and ratio to real-only, from the records
    assert "| real (seen) + DiffuMask | 80.0 | 20.0 | 32.0 | 0.25 |" in text
    assert "66.7 min" in text  # the estimate
    assert "3 stages reused" in text
    assert text.count("diffuseg train ") == 14  # every command is listed
    assert "| Counterfactual | n/a |" in text
    assert "Weight sweep" not in text


def test_results_show_the_validation_sweep_and_its_best_weight(tmp_path):
    settings = protocol.Settings(work_dir=tmp_path / "work", size_name="quick", size=protocol.SIZES["quick"],
                                 counterfactual_sweep=(0.1, 1.0))
    plan = protocol.Plan(settings, WORLD)
    scores = {"evaluate/cfsweep-0": 0.60, "evaluate/cfsweep-0.1": 0.64, "evaluate/cfsweep-1": 0.50}
    records = {stage.name: protocol.Record(stage.name, "f", 1.0, {"mean_iou": scores[stage.name]} if stage.name in scores else None)
               for stage in plan.stages}
    text = protocol.render_results(
        plan, records, command="x", default_estimate=None, snapshot_seconds=0.0, wall_seconds=1.0, machine_info={},
        commit="abc", now="now", rows={p: None for p in protocol.PIPELINES},
    )
    assert "| 0 | 60.0 |\n| 0.1 | 64.0 |\n| 1 | 50.0 |" in text
    assert "Best on validation: weight 0.1 (64.0)" in text
    assert "`--counterfactual-loss embedding`" in text


@pytest.mark.slow
def test_quick_protocol_end_to_end(tmp_path):
    """The whole protocol on the embedded model at a tiny scale; a rerun reuses every stage."""
    results = tmp_path / "RESULTS.md"
    argv = ["--size", "quick", "--work-dir", str(tmp_path / "work"), "--results", str(results),
            "--images-per-class", "1", "--real-train-size", "8", "--real-val-size", "4", "--real-test-size", "4",
            "--train-steps", "2", "--oracle-steps", "3", "--maskdiffusion-images", "2"]
    assert protocol.main(argv) == 0
    text = results.read_text()
    assert "## Targets" in text and "| DiffuMask | 3 |" in text
    records = sorted((tmp_path / "work" / "stages").glob("*.json"))
    assert all(json.loads(p.read_text())["status"] == "done" for p in records)
    first = {p.name: json.loads(p.read_text())["seconds"] for p in records}
    assert protocol.main(argv) == 0  # everything reused: the recorded times are unchanged
    assert {p.name: json.loads(p.read_text())["seconds"] for p in records} == first
    assert f"{len(records)} stages reused" in results.read_text()
