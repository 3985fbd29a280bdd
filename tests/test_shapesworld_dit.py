"""ShapesWorld-DiT: the SD3-architecture model of ShapesWorld (training script, export, the shipped snapshot)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch


def _sd3_pipeline_class():
    """The pipeline class every DiT test loads through: DiffuMask for the SD3 family."""
    from diffuseg.pipelines import DiffuMaskSD3Pipeline

    return DiffuMaskSD3Pipeline


def _generate(pipe, size: int, t5_tokens: int) -> np.ndarray:
    """Images of "a red circle" (and, through DiffuMask, its masks in {0, 1, 255})."""
    generator = torch.Generator().manual_seed(0)
    out = pipe("a red circle", class_names=["circle"], num_inference_steps=3, guidance_scale=3.0, height=size,
               width=size, max_sequence_length=t5_tokens, generator=generator, output_type="np")
    assert out.masks.shape == (1, size, size) and set(np.unique(out.masks)) <= {0, 1, 255}
    return out.images


def _micro_dit(run, export, *extra: str) -> list[str]:
    return ["--architecture", "sd3", "--output-dir", str(run), "--export-dir", str(export), "--threads", "1", *extra]


def test_training_script_sd3_micro_run_saves_a_loadable_sd3_pipeline_and_resumes(tmp_path):
    from safetensors import safe_open

    from diffuseg.models import load_pipeline
    from diffuseg.shapesworld import model_world
    from diffuseg.shapesworld.train import main

    run, export = tmp_path / "run", tmp_path / "export"
    assert main(_micro_dit(run, export, "--preset", "micro")) == 0
    saved = json.loads((export / "training_state.json").read_text())
    config, state = saved["config"], saved["state"]
    assert config["architecture"] == "sd3" and state["step"] == 4 and state["stage"] == "done"
    index = json.loads((export / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["text_encoder_3"] == [None, None] and index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    assert index["text_encoder"][1] == index["text_encoder_2"][1] == "CLIPTextModelWithProjection"
    scheduler = json.loads((export / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler" and scheduler["shift"] == config["flow_shift"]
    assert json.loads((export / "vae" / "config.json").read_text())["shift_factor"] == 0.0
    assert "4 transformer steps" in (export / "README.md").read_text()
    assert model_world(export).unet_step == 4  # the benchmarks read the world and step of either architecture
    with safe_open(export / "transformer" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
    assert not list(export.rglob("*.bin")) and not list(run.rglob("*.bin")) and not list(run.rglob("*.pt"))
    logged = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert any(r.get("stage") == "transformer" and np.isfinite(r.get("loss", np.nan)) for r in logged)

    pipe = load_pipeline(_sd3_pipeline_class(), export)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.text_encoder_3 is None and pipe.tokenizer_2.model_max_length == 16
    assert {pipe.transformer.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    images = _generate(pipe, 32, config["t5_tokens"])
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()

    # resume from the full checkpoint, then from the exported folder alone (what a clone has)
    assert main(_micro_dit(run, export, "--resume", "--set", "max_steps=6")) == 0
    assert json.loads((export / "training_state.json").read_text())["state"]["step"] == 6
    assert main(_micro_dit(tmp_path / "fresh", export, "--resume", "--set", "max_steps=7")) == 0
    resumed = json.loads((export / "training_state.json").read_text())["state"]
    assert resumed["step"] == 7 and resumed["resumed_from"] == ["checkpoint@4", "export@6"]
    with pytest.raises(ValueError, match="architecture"):  # a run keeps its architecture
        main(["--architecture", "unet", "--output-dir", str(run), "--export-dir", str(export), "--resume"])


def test_sd3_training_context_is_what_the_pipeline_gives_the_transformer(tmp_path):
    from accelerate import Accelerator
    from diffusers import StableDiffusion3Pipeline

    from diffuseg.shapesworld.train import (
        MICRO,
        TrainConfig,
        Trainer,
        flow_scheduler,
        tokenize,
    )

    # two layers: SD3 reads the penultimate hidden states, which with one layer are the bare token embeddings
    config = TrainConfig.from_dict({**MICRO, "architecture": "sd3", "text_layers": 2})
    trainer = Trainer(config, tmp_path, None, Accelerator(), None)
    models, tokenizer = trainer.models, trainer.tokenizer
    pipe = StableDiffusion3Pipeline(vae=trainer.vae, scheduler=flow_scheduler(config), tokenizer=tokenizer,
                                    tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None, **models)
    prompts = ["a red circle", "a blue square and a red circle"]
    ids, empty_ids = tokenize(tokenizer, prompts), tokenize(tokenizer, [""])[0]
    with torch.no_grad():
        context, pooled = trainer.sd3_context(ids, torch.tensor([False, False]), empty_ids, config.t5_tokens)
        expected, _, expected_pooled, _ = pipe.encode_prompt(
            prompts, None, None, do_classifier_free_guidance=False, max_sequence_length=config.t5_tokens)
        assert context.shape == (2, config.max_length + config.t5_tokens, 2 * config.text_width)
        torch.testing.assert_close(context, expected)
        torch.testing.assert_close(pooled, expected_pooled)
        # context dropout: the first caption's end-of-text, padding and pooled projection become the empty
        # caption's; its words and the other caption stay as they were
        hidden, hidden_pooled = trainer.sd3_context(ids, torch.tensor([True, False]), empty_ids, config.t5_tokens)
        _, _, empty_pooled, _ = pipe.encode_prompt(
            "", None, None, do_classifier_free_guidance=False, max_sequence_length=config.t5_tokens)
    end = int((ids[0] == tokenizer.eos_token_id).int().argmax())
    torch.testing.assert_close(hidden[0, :end], context[0, :end])
    assert not torch.allclose(hidden[0, end:config.max_length], context[0, end:config.max_length])
    torch.testing.assert_close(hidden[1], context[1])
    torch.testing.assert_close(hidden_pooled[0], empty_pooled[0])
    torch.testing.assert_close(hidden_pooled[1], pooled[1])


def test_sd3_run_starts_from_the_shipped_unet_models_vae_and_text_encoder(tmp_path):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    from diffuseg.models import EMBEDDED_MODELS, load_pipeline
    from diffuseg.shapesworld.train import main

    unet_model = EMBEDDED_MODELS["shapesworld"]
    if not (unet_model / "model_index.json").is_file():
        pytest.skip(f"no ShapesWorld UNet model in {unet_model}")
    small = ["cache_empty=4", "cache_singles=8", "cache_pairs=8", "batch=4", "max_steps=2", "dit_layers=1",
             "dit_heads=2", "dit_head_dim=8", "warmup_steps=1"]
    export = tmp_path / "export"
    args = _micro_dit(tmp_path / "run", export, "--init-from", str(unet_model))
    assert main([*args, *[x for item in small for x in ("--set", item)]]) == 0
    state = json.loads((export / "training_state.json").read_text())["state"]
    shipped = json.loads((unet_model / "training_state.json").read_text())["state"]
    assert state["vae_step"] == shipped["vae_step"] and state["init_from"] == f"shapesworld@{shipped['step']}"
    pipe = load_pipeline(_sd3_pipeline_class(), export)
    vae = AutoencoderKL.from_pretrained(unet_model / "vae")
    assert pipe.vae.config.scaling_factor == vae.config.scaling_factor
    for name, value in vae.state_dict().items():  # frozen: the UNet model's VAE (both fp16 on disk)
        assert torch.equal(pipe.vae.state_dict()[name], value), name
    # the text encoders started from the UNet model's; two steps move them only a little
    text = CLIPTextModel.from_pretrained(unet_model / "text_encoder").state_dict()
    started = pipe.text_encoder_2.text_model.state_dict()
    assert set(started) == set(text)
    assert all(torch.allclose(started[k], v, atol=0.05) for k, v in text.items())
    with pytest.raises(SystemExit):  # a fresh start and a resume at once is a usage error
        main([*args, "--resume"])


def test_missing_embedded_dit_is_a_clear_error(tmp_path, monkeypatch):
    from diffuseg import models

    monkeypatch.setitem(models.EMBEDDED_MODELS, "shapesworld-dit", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="shapesworld-dit.*--architecture sd3"):
        models.load_default_model("shapesworld-dit")
    with pytest.raises(ValueError, match="not an embedded model"):
        models.load_default_model(model="shapesworld-xl")


def test_shipped_dit_loads_offline_and_generates():
    from diffuseg.models import EMBEDDED_MODELS, load_default_model

    folder = EMBEDDED_MODELS["shapesworld-dit"]
    if not (folder / "model_index.json").is_file():
        pytest.skip(f"no ShapesWorld-DiT snapshot in {folder} yet (python -m diffuseg.shapesworld.train --architecture sd3)")
    total = sum(p.stat().st_size for name in ("shapesworld", "shapesworld-dit")
                for p in EMBEDDED_MODELS[name].rglob("*") if p.is_file())
    assert total <= 40 * 2**20, f"the embedded models are {total / 2**20:.1f} MB together (limit 40 MB)"
    assert not list(folder.rglob("*.bin"))
    config = json.loads((folder / "training_state.json").read_text())["config"]
    pipe = load_default_model(_sd3_pipeline_class(), model="shapesworld-dit")
    pipe.set_progress_bar_config(disable=True)
    images = _generate(pipe, config["image_size"], config["t5_tokens"])
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all() and images.std() > 0.01
