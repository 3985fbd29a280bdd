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


def _plan(tmp_path: Path, seeds: tuple[int, ...] = (0,), **changes) -> "protocol.Plan":
    size = protocol.dataclasses.replace(protocol.SIZES["quick"], **changes)
    settings = protocol.Settings(work_dir=tmp_path / "work", size_name="quick", size=size, seeds=seeds)
    return protocol.Plan(settings, WORLD)


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_compared_runs_share_one_budget_and_zero_shot_runs_hold_out_classes(tmp_path):
    plan = _plan(tmp_path)
    trains = {s.name: s.argv for s in plan.stages if s.kind == "train" and s.name != "s0/train/oracle"}
    # real, 3 synthetic, 3 mixed, every-pair DiffuMask, 4 zero-shot, 2 without the counterfactual loss, 7 ablations
    assert len(trains) == 21
    budget = {name: [_flag(argv, f) for f in ("--max-steps", "--batch-size", "--image-size", "--learning-rate", "--seed")]
              for name, argv in trains.items()}
    assert len({tuple(b) for b in budget.values()}) == 1, budget
    assert _flag(plan.stages[[s.name for s in plan.stages].index("s0/train/oracle")].argv, "--max-steps") == "400"
    for name, argv in trains.items():
        assert ("--unseen-classes" in argv) == name.startswith("s0/train/zs-"), name
        assert _flag(argv, "--counterfactual-weight") == ("0" if "nocf" in name else "1")
        assert _flag(argv, "--counterfactual-loss") == "embedding"  # MagicSeg's form by default
    evaluations = {s.name: s.argv for s in plan.stages if s.kind == "evaluate"}
    assert _flag(evaluations["s0/evaluate/zs-real+freemask"], "--unseen-classes") == "triangle"
    assert _flag(evaluations["s0/evaluate/real"], "--split") == "test"
    assert _flag(evaluations["s0/evaluate/oracle-on-diffumask"], "--split") == "train"  # the generated masks
    maskdiffusion = {s.name: s.argv for s in plan.stages if s.kind == "maskdiffusion"}
    assert _flag(maskdiffusion["s0/maskdiffusion/clusters"], "--clusters") == "auto"  # k chosen by the method
    assert _flag(maskdiffusion["s0/maskdiffusion/oracle-clusters"], "--clusters") == "gt"
    assert _flag(maskdiffusion["s0/maskdiffusion/background"], "--min-class-share") == "0.12"


def test_counterfactual_weight_sweep_is_scored_on_validation_only(tmp_path):
    settings = protocol.Settings(work_dir=tmp_path / "work", size_name="quick", size=protocol.SIZES["quick"],
                                 counterfactual_loss="absence", counterfactual_sweep=(0.3, 1.0))
    plan = protocol.Plan(settings, WORLD)
    sweep = {s.name: s.argv for s in plan.stages if "cfsweep" in s.name}
    assert sorted(sweep) == ["s0/evaluate/cfsweep-0", "s0/evaluate/cfsweep-0.3", "s0/evaluate/cfsweep-1",
                             "s0/train/cfsweep-0", "s0/train/cfsweep-0.3", "s0/train/cfsweep-1"]
    for weight in ("0", "0.3", "1"):
        assert _flag(sweep[f"s0/train/cfsweep-{weight}"], "--counterfactual-weight") == weight
        assert _flag(sweep[f"s0/train/cfsweep-{weight}"], "--counterfactual-loss") == "absence"
        assert _flag(sweep[f"s0/evaluate/cfsweep-{weight}"], "--split") == "validation"
    assert not [s for s in _plan(tmp_path).stages if "cfsweep" in s.name]  # no sweep unless asked


def test_fingerprints_follow_inputs(tmp_path):
    def fingerprints(plan):
        known = {"snapshot": "model-a"}
        for stage in plan.stages:
            known[stage.name] = protocol.stage_fingerprint(stage, known)
        return known

    base = fingerprints(_plan(tmp_path))
    more_images = fingerprints(_plan(tmp_path, images_per_class=9))
    assert more_images["s0/generate/diffumask"] != base["s0/generate/diffumask"]
    assert more_images["s0/train/synth-diffumask"] != base["s0/train/synth-diffumask"]  # downstream of the set
    assert more_images["s0/evaluate/synth-diffumask"] != base["s0/evaluate/synth-diffumask"]
    assert more_images["s0/generate/dm-filter"] != base["s0/generate/dm-filter"]  # its agreement model's set changed
    assert more_images["s0/train/real"] == base["s0/train/real"]  # real data only: unaffected
    assert more_images["s0/maskdiffusion/background"] == base["s0/maskdiffusion/background"]


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


def test_a_set_a_filter_emptied_skips_what_needs_it(tmp_path):
    from types import SimpleNamespace

    empty = tmp_path / "empty"
    (empty / "data").mkdir(parents=True)
    train = protocol.Stage("s0/train/x", "train", [sys.executable, "-c", "raise SystemExit(1)"], 1, inputs=[])
    train.datasets = [empty]
    evaluate = protocol.Stage("s0/evaluate/x", "evaluate", [sys.executable, "-c", "raise SystemExit(1)"], 1,
                              inputs=["s0/train/x"])
    other = protocol.Stage("s0/evaluate/y", "evaluate", [sys.executable, "-c", "print('{\"mean_iou\": 0.5}')"], 1)
    plan = SimpleNamespace(stages=[train, evaluate, other], s=SimpleNamespace(work_dir=tmp_path / "work"))
    records = protocol.run_plan(plan, "model")
    assert records["s0/train/x"].skipped and records["s0/evaluate/x"].skipped
    assert not records["s0/evaluate/y"].skipped and records["s0/evaluate/y"].result == {"mean_iou": 0.5}


def test_ratios_targets_and_estimate():
    assert protocol.ratio(0.45, 0.5) == pytest.approx(0.9)
    assert protocol.ratio(None, 0.5) is None and protocol.ratio(0.3, 0.0) is None
    # two seeds; the ratio is paired per seed: (0.45 / 0.5 + 0.54 / 0.6) / 2 = 0.9
    results = {
        "s0/evaluate/real": {"mean_iou": 0.5}, "s1/evaluate/real": {"mean_iou": 0.6},
        "s0/evaluate/synth-diffumask": {"mean_iou": 0.45}, "s1/evaluate/synth-diffumask": {"mean_iou": 0.54},
        "s0/evaluate/synth-freemask": {"mean_iou": 0.2}, "s1/evaluate/synth-freemask": {"mean_iou": 0.6},
        "s0/evaluate/zs-real+diffumask": {"mean_iou_seen": 0.6, "mean_iou_unseen": 0.3},
        "s0/maskdiffusion/background": {"mean_iou": 0.61}, "s1/maskdiffusion/background": {"mean_iou": 0.65},
        "s0/maskdiffusion/no-background": {"mean_iou": 0.5}, "s1/maskdiffusion/no-background": {"mean_iou": 0.75},
    }
    found = {t.name: t for t in protocol.targets(results, [0, 1], ["triangle"])}
    same = "synthetic-only ÷ real-only mIoU (same colour-shape pairs)"
    diffumask = found[f"DiffuMask {same}"]
    assert diffumask.value.mean == pytest.approx(0.9) and diffumask.value.n == 2
    assert diffumask.verdict == "met"  # 0.9 is the bar, inclusive; sd 0
    assert found[f"Free-Mask {same}"].verdict == "not met"  # 0.4 and 1.0: mean 0.7
    assert found[f"Counterfactual {same}"].verdict == "not measured"
    assert found["DiffuMask zero-shot unseen ÷ seen mIoU (triangle unseen)"].value.values == pytest.approx((0.5,))
    assert found["MaskDiffusion mIoU (open vocabulary, background word, presence decided)"].verdict == "met"
    # mean 0.625 over the bar, but mean - sd (0.625 - 0.177) below it
    assert found["MaskDiffusion mIoU (open vocabulary, background not scored)"].verdict.startswith("met on the mean only")
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


SPECIAL = {"evaluate/real": (0.5, 0.6), "evaluate/synth-diffumask": (0.70, 0.72), "evaluate/synth-freemask": (0.5, 0.62)}


def _records(plan, special=SPECIAL):
    """Records of every stage of ``plan``: evaluations score 0.5 + 0.1 × seed, except ``special`` (per seed)."""
    records = {}
    for number, stage in enumerate(plan.stages):
        result = None
        if stage.kind in ("evaluate", "maskdiffusion", "geometry"):
            seed, name = (0, stage.name) if stage.name == "probe" else (int(stage.name[1]), stage.name[3:])
            value = special[name][seed] if name in special else 0.5 + 0.1 * seed
            per_class = {n: {"iou": value} for n in ("background", "circle", "square", "triangle")}
            result = {"mean_iou": value, "per_class": per_class, "num_images": 50, "read_share": 0.75,
                      "mean_iou_seen": 0.8, "mean_iou_unseen": 0.2, "harmonic_mean_iou": 0.32}
        records[stage.name] = protocol.Record(stage.name, "f", float(number + 1), result, reused=number < 3)
    return records


def test_results_file_is_written_from_the_records(tmp_path):
    plan = _plan(tmp_path, seeds=(0, 1))
    records = _records(plan)
    text = protocol.render_results(
        plan, records, command="python benchmarks/shapesworld_protocol.py --size quick", default_estimate=4000.0,
        snapshot_seconds=0.5, wall_seconds=100.0, machine_info={"CPUs": "2"}, commit="abc123", now="2025-01-01 00:00 UTC",
        rows={"diffumask": [24, 22], "freemask": [23, 23], "counterfactual": [None, None]},
    )
    assert "**size `quick`**" in text and "UNet step 1234" in text and "| seeds | 2: 0, 1." in text
    for heading in ("## 1. Synthetic sets", "## 2. Mask quality", "## 3. Train on synthetic", "## 4. Zero-shot",
                    "## 5. MagicSeg", "## 6. Ablations", "## 7. MaskDiffusion", "## Targets", "## Run time", "## Commands"):
        assert heading in text
    assert "| `diffumask` | 23 ± 1 |" in text
    assert "| (a) real | 55.0 ± 7.1 | 55.0 ± 7.1 | 55.0 ± 7.1 | 1.00 ± 0.00 | 2 |" in text  # test, both parts, ÷ real
    # ÷ real is paired per seed: 0.70 / 0.5 and 0.72 / 0.6
    assert "| (b) DiffuMask only | 71.0 ± 1.4 | 55.0 ± 7.1 | 55.0 ± 7.1 | 1.30 ± 0.14 | 2 |" in text
    assert "- DiffuMask only is better than real (+16.0 points; the mean ± sd intervals separate)." in text
    assert "- Free-Mask only and real are not told apart (+1.0 points; the mean ± sd intervals overlap)." in text
    assert "| real (seen) + DiffuMask | 80.0 ± 0.0 | 20.0 ± 0.0 | 32.0 ± 0.0 | 0.25 ± 0.00 | 2 |" in text
    assert "| DiffuMask masks vs geometry | 55.0 ± 7.1 | 55.0 ± 7.1 | 55.0 ± 7.1 | 55.0 ± 7.1 | 55.0 ± 7.1 | 75.0 ± 0.0 | 2 |" in text
    assert "| + adaptive threshold | 55.0 ± 7.1 | 2 | this row and the row above are not told apart" in text
    assert "66.7 min" in text  # the estimate
    assert "| `probe` | 1.0 ± 0.0 | 1 | 1 | 1 reused |" in text and "| `render` | 44.5 ± 60.1 | 300 | 2 | 1 run, 1 reused |" in text
    assert text.count("diffuseg train ") == 22  # seed 0's commands, every one
    assert "s1/" not in text.split("## Commands")[1]
    assert "Weight sweep" not in text


def test_spread_and_the_better_wording():
    spread = protocol.Spread.of([0.5, None, 0.7])
    assert spread.n == 2 and spread.mean == pytest.approx(0.6) and spread.sd == pytest.approx(0.1414, abs=1e-4)
    assert spread.text() == "60.0 ± 14.1" and spread.text(1, 2) == "0.60 ± 0.14"
    assert protocol.Spread.of([0.3]).text() == "30.0 ± 0.0" and protocol.Spread.of([None]).text() == "n/a"
    high, low = protocol.Spread.of([0.80, 0.82]), protocol.Spread.of([0.70, 0.74])
    assert protocol.compare(high, low, "A", "B") == "A is better than B (+9.0 points; the mean ± sd intervals separate)"
    assert protocol.compare(low, high, "B", "A").startswith("B is worse than A (-9.0 points")
    wide = protocol.Spread.of([0.60, 0.90])  # mean 0.75, sd 0.21: overlaps both
    assert "not told apart" in protocol.compare(wide, low, "W", "B") and "better" not in protocol.compare(wide, low, "W", "B")
    assert protocol.compare(protocol.Spread.of([0.9]), low, "one", "B") == "one vs B: not compared (fewer than 2 seeds)"
    results = {"s0/x": {"mean_iou": 0.4}, "s1/x": {"mean_iou": 0.6}, "s0/y": {"mean_iou": 0.5}}
    assert protocol.seed_ratios(results, [0, 1], "x", "y").values == pytest.approx((0.8,))  # s1 has no pair
    assert protocol.seed_values(results, [0, 1], "x").values == (0.4, 0.6)


def test_seeds_vary_data_and_segmenter_and_choices_use_validation(tmp_path):
    plan = _plan(tmp_path, seeds=(3, 4))
    by_name = {s.name: s for s in plan.stages}
    assert len(plan.stages) == 1 + 2 * (len(plan.stages) - 1) // 2
    for seed in (3, 4):
        assert f", {seed}, size=64" in by_name[f"s{seed}/render"].argv[-1]  # the rendering seed
        assert _flag(by_name[f"s{seed}/generate/freemask"].argv, "--seed") == str(seed)
        assert _flag(by_name[f"s{seed}/train/real"].argv, "--seed") == str(seed)
        assert _flag(by_name[f"s{seed}/maskdiffusion/background"].argv, "--seed") == str(seed)
        assert f"s{seed}/real" in _flag(by_name[f"s{seed}/train/real"].argv, "--train")
    evaluations = [s for s in plan.stages if s.kind == "evaluate"]
    targets = [(_flag(s.argv, "--split"), s.argv[s.argv.index("evaluate") + 1:s.argv.index("evaluate") + 3]) for s in evaluations]
    assert len(targets) == len({(split, tuple(t)) for split, t in targets})  # each model scored once per split
    for stage in evaluations:  # design choices (sweep, ablations) never look at the test split
        if any(key in stage.name for key in ("cfsweep", "dm-", "fm-", "val-")):
            assert _flag(stage.argv, "--split") == "validation", stage.name
    filter_set = by_name["s3/generate/dm-filter"]
    assert _flag(filter_set.argv, "--agreement-model").endswith("s3/models/dm-refine")
    assert "s3/train/dm-refine" in filter_set.inputs
    assert _flag(by_name["s3/generate/fm-paste"].argv, "--freemask-mode") == "paste"
    assert _flag(by_name["s3/generate/dm-diverse"].argv, "--mosaic") == "2"  # rows accumulate


def test_synthetic_sets_leave_the_held_out_pairs_out_like_real_train(tmp_path):
    from diffuseg.generation import parse_classes
    from diffuseg.shapesworld.render import HELD_OUT_PAIRS

    plan = _plan(tmp_path)
    by_name = {s.name: s for s in plan.stages}
    for pipeline in protocol.PIPELINES:
        assert _flag(by_name[f"s0/generate/{pipeline}"].argv, "--classes") == str(plan.seen_classes)
    assert _flag(by_name[f"s0/generate/{protocol.ALL_PAIRS_SET}"].argv, "--classes") == "shapes"
    protocol.write_prompt_files(WORLD, plan.seen_classes.parent)
    classes = parse_classes(str(plan.seen_classes))
    pairs = {(color, c.name) for c in classes.classes for color in c.contexts}
    assert pairs and not pairs & HELD_OUT_PAIRS
    assert pairs | {p for p in HELD_OUT_PAIRS if p[0] in WORLD.colors and p[1] in WORLD.shapes} == {
        (c, s) for c in WORLD.colors for s in WORLD.shapes}
    assert (plan.templates.read_text().split("\n")[0]) == parse_classes("shapes").templates[0]


def test_test_split_is_cut_by_held_out_pairs(tmp_path):
    from datasets import load_dataset

    from diffuseg.shapesworld.dataset import write_real_dataset
    from diffuseg.shapesworld.render import HELD_OUT_PAIRS, scene_from_seed

    real = tmp_path / "real"
    write_real_dataset(real, 12, 2, 40, 0, size=32)
    shapes, colors = ("circle", "square", "triangle"), ("red", "green", "blue", "yellow", "purple", "orange")
    counts = protocol.split_test_by_held_out_pairs(real, tmp_path / "parts", shapes, colors)
    assert counts["heldout"] > 0 and counts["seen"] > 0 and sum(counts.values()) == 40
    for part in protocol.TEST_PARTS:
        rows = load_dataset(str(tmp_path / "parts"), split=part)
        assert len(rows) == counts[part]
        for row in rows:
            objects = scene_from_seed(row["seed"], "test", shapes=shapes, colors=colors)[0].objects
            assert any((o.color, o.shape) in HELD_OUT_PAIRS for o in objects) == (part == "heldout")
    train = load_dataset(str(real), split="train")  # the train split never shows a held-out pair
    assert not any(protocol.has_held_out_pair(row["seed"], "train", shapes, colors) for row in train)


def test_masks_scored_against_geometry(tmp_path):
    from diffuseg.shapesworld.dataset import write_real_dataset

    real = tmp_path / "real"
    write_real_dataset(real, 6, 1, 1, 0, size=64)
    shapes, colors = ("circle", "square", "triangle"), ("red", "green", "blue", "yellow", "purple", "orange")
    exact = protocol.geometry_scores(real, shapes, colors)  # rendered labels: the geometry itself
    assert exact["num_images"] == 6 and exact["read_share"] >= 0.8 and exact["mean_iou"] > 0.9
    import numpy as np
    from datasets import load_dataset

    from diffuseg.data import DatasetWriter

    writer = DatasetWriter(tmp_path / "shifted", class_names=list(shapes), split="train")
    for index, row in enumerate(load_dataset(str(real), split="train")):  # masks 6 px off their objects
        writer.add({**row, "label": np.roll(np.asarray(row["label"]), 6, axis=1)}, index=index)
    writer.close()
    shifted = protocol.geometry_scores(tmp_path / "shifted", shapes, colors)
    assert shifted["read_share"] == exact["read_share"] and shifted["mean_iou"] < exact["mean_iou"] - 0.1


def test_time_model_chooses_sizes_to_fit_every_seed():
    settings = protocol.Settings(work_dir=Path("w"), size_name="default", size=protocol.SIZES["default"], seeds=(0,))
    one, one_seconds = protocol.fit_size(settings, WORLD, 3600, protocol.DEFAULT_COST_LINES)
    five_settings = protocol.dataclasses.replace(settings, seeds=tuple(range(5)))
    five, five_seconds = protocol.fit_size(five_settings, WORLD, 3600, protocol.DEFAULT_COST_LINES)
    assert one_seconds <= 3600 and five_seconds <= 3600 and five_seconds > 0.9 * 3600
    assert five.images_per_class < one.images_per_class <= protocol.SIZES["default"].images_per_class
    assert five.train_steps < one.train_steps and five.real_test_size == protocol.SIZES["default"].real_test_size
    roomy, _ = protocol.fit_size(settings, WORLD, 10**7, protocol.DEFAULT_COST_LINES)
    assert roomy == protocol.SIZES["default"]  # never larger than the preset


def test_results_show_the_validation_sweep_and_its_best_weight(tmp_path):
    settings = protocol.Settings(work_dir=tmp_path / "work", size_name="quick", size=protocol.SIZES["quick"],
                                 counterfactual_sweep=(0.1, 1.0), seeds=(0, 1))
    plan = protocol.Plan(settings, WORLD)
    special = {"evaluate/cfsweep-0": (0.60, 0.62), "evaluate/cfsweep-0.1": (0.70, 0.72), "evaluate/cfsweep-1": (0.50, 0.52)}
    text = protocol.render_results(
        plan, _records(plan, special), command="x", default_estimate=None, snapshot_seconds=0.0, wall_seconds=1.0,
        machine_info={}, commit="abc", now="now", rows={},
    )
    assert "| 0 | 61.0 ± 1.4 | 2 |\n| 0.1 | 71.0 ± 1.4 | 2 |\n| 1 | 51.0 ± 1.4 | 2 |" in text
    assert "Best mean on validation: weight 0.1 (71.0 ± 1.4); weight 0.1 is better than weight 0" in text
    assert "`--counterfactual-loss embedding`" in text


@pytest.mark.slow
def test_quick_protocol_end_to_end(tmp_path):
    """The whole protocol on the embedded model at a tiny scale; a rerun reuses every stage."""
    results = tmp_path / "RESULTS.md"
    argv = ["--size", "quick", "--seeds", "2", "--work-dir", str(tmp_path / "work"), "--results", str(results),
            "--images-per-class", "1", "--real-train-size", "8", "--real-val-size", "4", "--real-test-size", "12",
            "--train-steps", "2", "--oracle-steps", "3", "--maskdiffusion-images", "2"]
    assert protocol.main(argv) == 0
    text = results.read_text()
    assert "## Targets" in text and "| `diffumask` | 3 ± 0 |" in text and " | 2 |" in text
    records = sorted((tmp_path / "work" / "stages").glob("*.json"))
    assert all(json.loads(p.read_text())["status"] == "done" for p in records)
    first = {p.name: json.loads(p.read_text())["seconds"] for p in records}
    assert protocol.main(argv) == 0  # everything reused: the recorded times are unchanged
    assert {p.name: json.loads(p.read_text())["seconds"] for p in records} == first
    assert f"{len(records)} stages reused" in results.read_text()


def test_generate_takes_the_free_mask_mode_the_paste_row_needs(tmp_path):
    import argparse

    from diffuseg.commands.generate import add_parser, config_from_args

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())

    def config(*flags):
        return config_from_args(parser.parse_args(["generate", "--out", str(tmp_path / "x"), "--pipeline", "freemask", *flags]))

    paste, edit = config("--freemask-mode", "paste"), config()
    assert paste.freemask_mode == "paste" and edit.freemask_mode == "edit"
    assert paste.fingerprint()["freemask_mode"] == "paste"
    assert "freemask_mode" not in edit.fingerprint()  # folders written before the option still resume
    with pytest.raises(SystemExit):
        config("--freemask-mode", "blend")
