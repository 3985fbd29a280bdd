"""The command line's first hour: fast help, thread choice, quiet start, model defaults, community pipelines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from diffuseg import threads
from diffuseg.models import ModelDefaults, community_pipeline, model_defaults
from diffuseg.testing import save_tiny_stable_diffusion, tiny_stable_diffusion

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"


def run_python(code: str, cwd=None, env=None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(SRC), **(env or {})}
    environment = {k: v for k, v in environment.items() if v is not None}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=environment, timeout=600)


# ----------------------------------------------------------------------------- start-up
def test_help_imports_neither_torch_nor_datasets():
    result = run_python(
        "import sys\nfrom diffuseg.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('HEAVY', sorted(m for m in ('torch', 'datasets', 'diffusers', 'transformers') if m in sys.modules))"
    )
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout and "generate" in result.stdout and "--threads" in result.stdout


@pytest.mark.parametrize("command", ["generate", "push", "segment", "train", "evaluate"])
def test_every_command_takes_threads_and_its_help_says_what_it_chooses(command, capsys):
    from diffuseg.cli import main

    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--threads N" in text and "here now:" in text and "local processes" in text


def test_a_command_prints_its_thread_choice_on_one_line(tmp_path):
    code = "import sys\nfrom diffuseg.cli import main\nsys.exit(main(sys.argv[1:]))"
    args = ["push", str(tmp_path / "missing"), "--repo", "me/x", "--dry-run"]
    explicit = subprocess.run([sys.executable, "-c", code, *args, "--threads", "1"], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=600)
    lines = [line for line in explicit.stderr.splitlines() if "CPU thread" in line]
    assert lines == ["diffuseg: torch uses 1 CPU thread(s) (--threads); change with --threads N"]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    launched = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600,
                              env={**env, "PYTHONPATH": str(SRC), "LOCAL_WORLD_SIZE": "64"})
    assert "torch uses 1 CPU thread(s) (" in launched.stderr and "/ 64 local process(es)" in launched.stderr


def test_thread_choice_rules(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("ACCELERATE_NUM_PROCESSES", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 8)
    monkeypatch.setattr(threads, "idle_cores", lambda cores: None)
    assert threads.choose_threads().threads == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")  # accelerate launch / torchrun with 3 local processes
    assert threads.choose_threads().threads == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert threads.choose_threads().threads == 1  # never 0
    monkeypatch.setattr(threads, "idle_cores", lambda cores: 0)  # a busy machine
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert threads.choose_threads().threads == 1
    monkeypatch.setattr(threads, "idle_cores", lambda cores: 5)
    assert threads.choose_threads().threads == 5
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # explicit wins over the load
    assert threads.choose_threads() == threads.ThreadChoice(3, "OMP_NUM_THREADS")
    assert threads.choose_threads(2) == threads.ThreadChoice(2, "--threads")
    with pytest.raises(ValueError, match="--threads must be at least 1"):
        threads.choose_threads(0)
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")
    with pytest.raises(ValueError, match="OMP_NUM_THREADS must be a positive integer"):
        threads.choose_threads()


def test_loading_the_embedded_model_prints_no_torchvision_or_float32_noise():
    result = run_python(
        "import logging, torch, diffuseg\n"
        "pipe = diffuseg.load_default_model()\n"
        "pipe.unet.to(torch.float32)\n"  # diffusers' empty "kept in float32: []" warning came from this
        "logging.getLogger('diffusers.models.modeling_utils').warning('other warnings still show')\n"
    )
    assert result.returncode == 0, result.stderr
    assert "requires torchvision" not in result.stderr and "kept in float32" not in result.stderr
    assert "other warnings still show" in result.stderr


# ----------------------------------------------------------------------------- model defaults
def test_model_defaults_come_from_the_model_folder(tmp_path):
    embedded = model_defaults()
    assert (embedded.num_inference_steps, embedded.guidance_scale, embedded.counterfactual_replacement) == (25, 4.0, "background")
    assert embedded.segment_caption(["circle", "square"], "background").startswith("a ")
    assert embedded.remove_phrases("a picture of a red circle", ["circle"]) == ["red circle"]
    # a Hub id or a folder without diffuseg.json: Stable Diffusion's values, the names joined by " and "
    plain = save_tiny_stable_diffusion(tmp_path / "plain")
    for model in ("owner/some-checkpoint", plain):
        assert model_defaults(model) == ModelDefaults()
    assert ModelDefaults().segment_caption(["cat", "dog"]) is None and ModelDefaults().remove_phrases("a red car", ["car"]) == []
    (Path(plain) / "diffuseg.json").write_text(json.dumps({"num_inference_steps": 7, "steps": 3}))
    with pytest.raises(ValueError, match=r"unknown keys \['steps'\]"):
        model_defaults(plain)


def test_shapes_prompts_stay_in_the_embedded_models_vocabulary():
    # "a orange square" is the world's grammar: the model's captions use "a" before every object, and its
    # tokenizer has no "an" token ("an" would be the untrained pieces "a" + "n"), so the preset keeps it.
    from transformers import CLIPTokenizer

    from diffuseg.generation import TemplatePrompter, parse_classes
    from diffuseg.models import EMBEDDED_MODELS

    tokenizer = CLIPTokenizer.from_pretrained(EMBEDDED_MODELS["shapesworld"] / "tokenizer")
    prompter, rng = TemplatePrompter(parse_classes("shapes")), np.random.default_rng(0)
    for _ in range(40):
        prompt, _ = prompter([int(rng.integers(1, 4))], rng)
        assert len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) == len(prompt.split()), prompt
    assert len(tokenizer("an", add_special_tokens=False)["input_ids"]) == 2


def test_a_resolution_the_model_lacks_is_an_error_naming_those_it_has():
    from diffuseg.pipelines import DiffuMaskPipeline

    pipe = tiny_stable_diffusion(DiffuMaskPipeline)
    with pytest.raises(ValueError, match=r"resolutions \[32, 64\] are not .* it has \[8, 16\]"):
        pipe("a photo of a cat", class_names=["cat"], num_inference_steps=2, resolutions=(16, 32, 64), height=32, width=32)
    out = pipe("a photo of a cat", class_names=["cat"], num_inference_steps=2, resolutions=(8,), height=32, width=32,
               output_type="np")
    assert out.masks.shape == (1, 32, 32)


# ----------------------------------------------------------------------------- community pipelines
def test_community_pipelines_load_from_any_working_directory(tmp_path):
    folder = save_tiny_stable_diffusion(tmp_path / "model")
    for name in ("diffumask", "maskdiffusion"):
        path = Path(community_pipeline(name))
        assert path.is_absolute() and (path / "pipeline.py").is_file()
        assert (REPO / "pipelines" / name).samefile(path)  # the clone's pipelines/ is the packaged folder
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = run_python(
        "import diffuseg\nfrom diffusers import DiffusionPipeline\n"
        f"pipe = DiffusionPipeline.from_pretrained({folder!r}, custom_pipeline=diffuseg.community_pipeline('diffumask'), "
        "trust_remote_code=True)\nprint(type(pipe).__name__)",
        cwd=elsewhere,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "DiffuMaskPipeline"
    with pytest.raises(ValueError, match="no community pipeline 'diffumasks'"):
        community_pipeline("diffumasks")
