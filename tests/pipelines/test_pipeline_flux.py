"""FluxPipeline against diffusers' FluxPipeline (fixtures from scripts/reference/make_pipeline_fixtures.py),
folder validation, argument checks, seeds, and a LoRA's sampling metadata."""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import paddle
import pytest

from ppdiffusers_fast.models.lora import LoraConfig, inject_lora, layers_with_adapter
from ppdiffusers_fast.models.lora_io import save_lora
from ppdiffusers_fast.models.weights import load_flux_transformer
from ppdiffusers_fast.models.flux_folder import FluxFolderError
from ppdiffusers_fast.pipelines.pipeline_flux import FluxPipeline

RUN_NAMES = ["single", "batch_true_cfg"]


@pytest.fixture(scope="module")
def folder():
    return Path(__file__).resolve().parents[1] / "fixtures" / "pipeline" / "tiny_flux"


@pytest.fixture(scope="module")
def runs(folder):
    return json.loads((folder.parent / "runs.json").read_text())


@pytest.fixture(scope="module")
def pipe(folder):
    pipeline = FluxPipeline.from_pretrained(folder)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def new_pipe(folder):
    pipeline = FluxPipeline.from_pretrained(folder)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.mark.parametrize("name", RUN_NAMES)
def test_same_image_as_diffusers(pipe, runs, folder, name):
    reference = np.load(folder.parent / f"run_{name}.npz")
    steps = []
    out = pipe(**runs[name], latents=paddle.to_tensor(reference["latents"]), output_type="np",
               callback=lambda i, sigma, latents: steps.append(latents.numpy()))
    np.testing.assert_allclose(out.sigmas, reference["sigmas"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(pipe.scheduler.timesteps.numpy(), reference["timesteps"], atol=1e-4, rtol=1e-6)
    for mine, theirs in zip(steps, reference["step_latents"]):
        np.testing.assert_allclose(mine, theirs, atol=1e-3, rtol=0)
    assert out.images.shape == reference["image"].shape
    assert np.abs(out.images - reference["image"]).max() <= 1e-3


@pytest.mark.parametrize("name", RUN_NAMES)
def test_text_conditions_match_diffusers(pipe, runs, folder, name):
    reference = np.load(folder.parent / f"run_{name}.npz")
    prompt = runs[name]["prompt"]
    prompts = [prompt] if isinstance(prompt, str) else prompt
    length = runs[name]["max_sequence_length"]
    clip_ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True)["input_ids"]
    t5_ids = pipe.tokenizer_2(prompts, padding="max_length", max_length=length, truncation=True)["input_ids"]
    np.testing.assert_array_equal(np.array(clip_ids), reference["clip_input_ids"])
    np.testing.assert_array_equal(np.array(t5_ids), reference["t5_input_ids"])
    embeddings = pipe.encode_prompt(prompts, length)
    np.testing.assert_allclose(embeddings.pooled.numpy(), reference["pooled_prompt_embeds"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(embeddings.sequence.numpy(), reference["prompt_embeds"], atol=1e-5, rtol=0)


def test_missing_subfolder_and_file_are_named(folder, tmp_path):
    broken = tmp_path / "flux"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "vae")
    (broken / "tokenizer_2" / "spiece.model").unlink()
    with pytest.raises(FluxFolderError) as error:
        FluxPipeline.from_pretrained(broken)
    message = str(error.value)
    assert "vae/ (sub-folder)" in message and "tokenizer_2/spiece.model" in message
    assert "transformer" not in message.split("missing:")[1]
    with pytest.raises(FluxFolderError, match="does not exist"):
        FluxPipeline.from_pretrained(tmp_path / "nowhere")


def test_bad_size_rejected_before_any_model_runs(pipe):
    calls = []
    hooks = [layer.register_forward_pre_hook(lambda layer, inputs: calls.append(type(layer).__name__))
             for layer in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2)]
    try:
        with pytest.raises(ValueError, match="height=40 is not a multiple of 16"):
            pipe("a cat", height=40, width=48, num_inference_steps=1)
        with pytest.raises(ValueError, match="width=50 is not a multiple of 16"):
            pipe("a cat", height=32, width=50, num_inference_steps=1)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == []


@pytest.mark.skipif(paddle.get_device().startswith("gpu"), reason="bfloat16 runs on GPU")
def test_bfloat16_on_cpu_is_refused_with_reason(folder):
    with pytest.raises(ValueError, match="bfloat16.*GPU"):
        FluxPipeline.from_pretrained(folder, dtype="bfloat16")


def test_each_image_depends_only_on_its_seed(pipe):
    kwargs = dict(height=32, width=32, num_inference_steps=2, max_sequence_length=8, output_type="np")
    batch = pipe("a red chair", seed=[5, 9], num_images_per_prompt=2, **kwargs)
    alone = pipe("a red chair", seed=9, **kwargs)
    assert batch.seeds == [5, 9] and alone.seeds == [9]
    np.testing.assert_allclose(batch.images[1], alone.images[0], atol=1e-5, rtol=0)
    assert np.abs(batch.images[0] - batch.images[1]).max() > 0.05
    again = pipe("a red chair", seed=5, num_images_per_prompt=2, **kwargs)
    assert again.seeds == [5, 6]
    np.testing.assert_allclose(again.images[0], batch.images[0], atol=1e-5, rtol=0)


def test_pil_output(pipe):
    out = pipe(["a cat", "a dog"], height=48, width=32, num_inference_steps=1, seed=0, max_sequence_length=8)
    assert [image.size for image in out.images] == [(32, 48), (32, 48)]


def make_lora_file(folder, path, sampling):
    """A rank-2 LoRA with random non-zero factors on two kinds of layers, saved in our format."""
    model = load_flux_transformer(folder / "transformer")
    inject_lora(model, LoraConfig(rank=2, alpha=4.0, target_modules=("attn.to_q", "proj_mlp")), "student")
    rng = np.random.default_rng(0)
    for _, layer in layers_with_adapter(model, "student"):
        adapter = layer.lora_adapters["student"]
        adapter.lora_B.set_value(paddle.to_tensor(rng.normal(0, 0.3, adapter.lora_B.shape).astype(np.float32)))
    save_lora(model, "student", path, sampling=sampling)
    return {name: (layer.lora_adapters["student"].lora_A.numpy(), layer.lora_adapters["student"].lora_B.numpy())
            for name, layer in layers_with_adapter(model, "student")}


def test_lora_metadata_sets_phase_edge_sigmas_guidance_and_scale(folder, tmp_path):
    sampling = dict(num_inference_steps=2, multiphase=2, num_euler_timesteps=8, guidance_scale=2.0, lora_scale=0.5)
    factors = make_lora_file(folder, tmp_path / "student.safetensors", sampling)
    student = new_pipe(folder)
    assert student.load_lora(tmp_path / "student.safetensors") == sampling
    seen_guidance = []

    def recording_runner(*args, **kwargs):
        seen_guidance.append(args[6].numpy().tolist())
        return student.transformer(*args, **kwargs)

    recording_runner.config = student.transformer.config
    student.set_transformer_runner(recording_runner)
    out = student("a cat", height=64, width=48, seed=3, max_sequence_length=8, output_type="np")

    # 12 image tokens: mu = 0.5 + (12 - 256) * 0.65 / 3840; edges at grid 0, 4, 8 of N = 8 -> t = 1, 1/2, 0.
    mu = 0.5 + (12 - 256) * (1.15 - 0.5) / (4096 - 256)
    middle = math.exp(mu) / (math.exp(mu) + (1 / 0.5 - 1))
    np.testing.assert_allclose(out.sigmas, [1.0, middle, 0.0], atol=1e-6, rtol=0)
    assert seen_guidance == [[2.0], [2.0]]

    # Same image as the base transformer with W + 0.5 * (alpha / rank) * A B folded in by hand.
    merged = new_pipe(folder)
    params = dict(merged.transformer.named_parameters())
    for name, (lora_a, lora_b) in factors.items():
        weight = params[f"{name}.weight"]
        weight.set_value(paddle.to_tensor(weight.numpy() + 0.5 * (4.0 / 2) * lora_a @ lora_b))
    expected = merged("a cat", height=64, width=48, seed=3, guidance_scale=2.0, sigmas=out.sigmas,
                      max_sequence_length=8, output_type="np")
    np.testing.assert_allclose(out.images, expected.images, atol=1e-5, rtol=0)
    base = new_pipe(folder)("a cat", height=64, width=48, seed=3, guidance_scale=2.0, sigmas=out.sigmas,
                            max_sequence_length=8, output_type="np")
    assert np.abs(base.images - out.images).max() > 1e-3  # the LoRA matters

    student.set_transformer_runner(None)
    student.fuse_lora()
    fused = student("a cat", height=64, width=48, seed=3, max_sequence_length=8, output_type="np")
    np.testing.assert_allclose(fused.images, out.images, atol=1e-5, rtol=0)

    uniform = student("a cat", height=64, width=48, seed=3, num_inference_steps=3, max_sequence_length=8,
                      output_type="np")
    assert len(uniform.sigmas) == 4  # another step count: FLUX's shifted linspace(1, 1/3, 3), then 0


def test_renoise_student_reuses_each_clean_prediction_with_seeded_step_noise(folder, tmp_path):
    from ppdiffusers_fast.pipelines.latents import pack_latents, seeded_step_noise

    sampling = dict(num_inference_steps=2, multiphase=2, num_euler_timesteps=8, sampler="renoise")
    make_lora_file(folder, tmp_path / "student.safetensors", sampling)
    student = new_pipe(folder)
    student.load_lora(tmp_path / "student.safetensors")
    calls = []

    def recording_runner(*args, **kwargs):
        velocity = student.transformer(*args, **kwargs)
        calls.append((args[0].numpy(), velocity[0].numpy()))
        return velocity

    recording_runner.config = student.transformer.config
    student.set_transformer_runner(recording_runner)
    out = student("a cat", height=64, width=48, seed=3, max_sequence_length=8, output_type="latent")
    middle = out.sigmas[1]
    (x_start, v_start), (x_middle, v_middle) = calls
    eps = pack_latents(seeded_step_noise([3], 0, [16, 8, 6])).numpy()  # 64 x 48 pixels -> 16 x 8 x 6 latent
    np.testing.assert_allclose(x_middle, (1 - middle) * (x_start - v_start) + middle * eps, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out.images.numpy(), x_middle - middle * v_middle, atol=1e-5, rtol=0)
    euler = new_pipe(folder)
    make_lora_file(folder, tmp_path / "euler.safetensors", dict(sampling, sampler="euler"))
    euler.load_lora(tmp_path / "euler.safetensors")
    assert np.abs(euler("a cat", height=64, width=48, seed=3, max_sequence_length=8, output_type="latent")
                  .images.numpy() - out.images.numpy()).max() > 1e-3


def test_explicit_lora_scale_overrides_metadata(folder, tmp_path):
    make_lora_file(folder, tmp_path / "student.safetensors", dict(lora_scale=0.5))
    student = new_pipe(folder)
    student.load_lora(tmp_path / "student.safetensors", scale=1.5)
    assert student.loras["student"].scale == 1.5
    assert all(layer.lora_adapters["student"].scale == 1.5
               for _, layer in layers_with_adapter(student.transformer, "student"))
