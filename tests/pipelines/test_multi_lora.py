"""Several LoRAs live together in FluxPipeline (a few-step student plus style LoRAs), on the tiny fixture folder.

Each LoRA adds ``scale_a * (alpha_a / r_a) * A_a B_a`` to its Linears, so the live sum, the fused weights and the
base weights with the deltas added by hand (numpy) must give the same images.
"""
from pathlib import Path

import numpy as np
import paddle
import pytest
from PIL import Image

from ppdiffusers_fast.command_line import UsageError
from ppdiffusers_fast.inference import generate_cli
from ppdiffusers_fast.models.lora import LoraConfig, inject_lora, layers_with_adapter, live_adapters
from ppdiffusers_fast.models.lora_io import export_diffusers_lora, save_lora
from ppdiffusers_fast.models.weights import load_flux_transformer
from ppdiffusers_fast.pipelines.pipeline_flux import FluxPipeline, pair_lora_scales

FOLDER = Path(__file__).resolve().parents[1] / "fixtures" / "pipeline" / "tiny_flux"
STUDENT_SAMPLING = dict(num_inference_steps=2, multiphase=2, num_euler_timesteps=8, guidance_scale=2.0,
                        lora_scale=0.5)
CALL = dict(height=32, width=48, seed=3, max_sequence_length=8, output_type="np", num_inference_steps=2)


def new_pipe():
    pipeline = FluxPipeline.from_pretrained(FOLDER)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def write_lora(path, targets, seed, rank=2, alpha=4.0, sampling=None, diffusers_format=False):
    """A LoRA with random non-zero A and B on ``targets``; returns ``{module: (A [in, r], B [r, out], alpha/r)}``."""
    model = load_flux_transformer(FOLDER / "transformer")
    inject_lora(model, LoraConfig(rank=rank, alpha=alpha, target_modules=targets), "lora")
    rng = np.random.default_rng(seed)
    factors = {}
    for name, layer in layers_with_adapter(model, "lora"):
        adapter = layer.lora_adapters["lora"]
        for param in (adapter.lora_A, adapter.lora_B):
            param.set_value(paddle.to_tensor(rng.normal(0, 0.3, param.shape).astype(np.float32)))
        factors[name] = (adapter.lora_A.numpy(), adapter.lora_B.numpy(), alpha / rank)
    if diffusers_format:
        export_diffusers_lora(model, "lora", path)
    else:
        save_lora(model, "lora", path, sampling=sampling)
    return factors


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """A student (our format, sampling metadata) and a style LoRA (diffusers format) sharing the to_q layers."""
    folder = tmp_path_factory.mktemp("loras")
    student = write_lora(folder / "student.safetensors", ("attn.to_q", "proj_mlp"), seed=0, sampling=STUDENT_SAMPLING)
    style = write_lora(folder / "style.safetensors", ("attn.to_q", "ff.net.2"), seed=1, rank=3, alpha=1.5,
                       diffusers_format=True)
    return {"folder": folder, "student": student, "style": style}


def hand_merged_pipe(*scaled_factors):
    """The base pipeline with ``W + sum scale * (alpha / r) * A B`` written into its weights with numpy."""
    pipe = new_pipe()
    params = dict(pipe.transformer.named_parameters())
    for scale, factors in scaled_factors:
        for name, (lora_a, lora_b, scaling) in factors.items():
            weight = params[f"{name}.weight"]
            weight.set_value(paddle.to_tensor(weight.numpy() + scale * scaling * lora_a @ lora_b))
    return pipe


def test_two_loras_live_equal_their_merged_sum(loras):
    pipe = new_pipe()
    pipe.load_lora(loras["folder"] / "student.safetensors")  # scale 0.5 from its metadata
    pipe.load_lora(loras["folder"] / "style.safetensors", scale=0.7)
    assert [(lora.name, lora.style, lora.scale) for lora in pipe.loras.values()] == [
        ("student", "ours", 0.5), ("style", "peft", 0.7)]
    assert live_adapters(pipe.transformer) == ("student", "style")
    assert pipe.lora_sampling == STUDENT_SAMPLING  # from the one file that carries sampling settings
    out = pipe("a cat", **CALL)
    live = out.images
    assert len(out.sigmas) == 3  # the student's phase edges

    hand = dict(CALL, guidance_scale=2.0, sigmas=out.sigmas, num_inference_steps=None)
    expected = hand_merged_pipe((0.5, loras["student"]), (0.7, loras["style"]))("a cat", **hand).images
    student_only = hand_merged_pipe((0.5, loras["student"]))("a cat", **hand).images
    np.testing.assert_allclose(live, expected, atol=1e-5, rtol=0)
    assert np.abs(live - student_only).max() > 1e-3  # the style LoRA matters

    pipe.fuse_lora()  # both adapters folded: sum of the deltas
    np.testing.assert_allclose(pipe("a cat", **CALL).images, live, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="already fused"):
        pipe.load_lora(loras["folder"] / "style.safetensors")


def test_same_lora_twice_at_a_and_b_equals_once_at_a_plus_b(loras):
    twice = new_pipe()
    twice.load_lora(loras["folder"] / "style.safetensors", scale=0.3)
    twice.load_lora(loras["folder"] / "style.safetensors", scale=0.9)
    assert list(twice.loras) == ["style", "style_2"]
    once = new_pipe()
    once.load_lora(loras["folder"] / "style.safetensors", scale=1.2)
    np.testing.assert_allclose(twice("a cat", **CALL).images, once("a cat", **CALL).images, atol=1e-5, rtol=0)


def test_loading_order_does_not_matter(loras):
    forward, backward = new_pipe(), new_pipe()
    forward.load_loras([loras["folder"] / "student.safetensors", loras["folder"] / "style.safetensors"], [1.0, 0.6])
    backward.load_loras([loras["folder"] / "style.safetensors", loras["folder"] / "student.safetensors"], [0.6, 1.0])
    assert forward.lora_sampling == backward.lora_sampling == STUDENT_SAMPLING
    a, b = forward("a cat", **CALL), backward("a cat", **CALL)
    np.testing.assert_allclose(a.sigmas, b.sigmas, atol=0, rtol=0)
    np.testing.assert_allclose(a.images, b.images, atol=1e-5, rtol=0)


def test_two_loras_with_different_sampling_settings_are_refused_naming_both(loras, tmp_path):
    other = tmp_path / "other_student.safetensors"
    write_lora(other, ("attn.to_k",), seed=2, sampling=dict(STUDENT_SAMPLING, num_inference_steps=4, multiphase=4))
    same = tmp_path / "same_settings.safetensors"
    write_lora(same, ("attn.to_k",), seed=3, sampling=dict(STUDENT_SAMPLING, lora_scale=1.0))
    pipe = new_pipe()
    pipe.load_lora(loras["folder"] / "student.safetensors")
    with pytest.raises(ValueError, match=r"student\.safetensors and .*other_student\.safetensors both carry sampling "
                                         r"settings and they differ \(multiphase: 2 vs 4, num_inference_steps"):
        pipe.load_lora(other)
    assert list(pipe.loras) == ["student"] and "other_student" not in str(live_adapters(pipe.transformer))
    pipe.load_lora(same)  # equal settings (its own lora_scale aside) agree
    assert pipe.loras["same_settings"].scale == 1.0 and pipe.lora_sampling == STUDENT_SAMPLING


def test_scales_pair_one_per_file_or_one_for_all():
    assert pair_lora_scales(["a", "b"], None) == [None, None]
    assert pair_lora_scales(["a", "b"], [0.5]) == [0.5, 0.5]
    assert pair_lora_scales(["a", "b"], [0.5, 2]) == [0.5, 2.0]
    with pytest.raises(ValueError, match="got 3 LoRA scales for 2 LoRA files"):
        pair_lora_scales(["a", "b"], [1, 2, 3])


def test_generation_cli_takes_several_loras_with_their_scales(loras, tmp_path, capsys):
    common = ["--pretrained_model_name_or_path", str(FOLDER), "--prompt", "a cat", "--height", "32", "--width", "48",
              "--step", "2", "--seed", "3", "--max_sequence_length", "8", "--path_to_lora",
              str(loras["folder"] / "student.safetensors"), str(loras["folder"] / "style.safetensors")]
    paths = generate_cli.main(common + ["--lora_scale", "0.5", "0.7", "--output_dir", str(tmp_path / "cli")])
    out = capsys.readouterr().out
    assert "adapter 'student', scale 0.5" in out and "adapter 'style', scale 0.7" in out
    pipe = new_pipe()
    pipe.load_loras([loras["folder"] / "student.safetensors", loras["folder"] / "style.safetensors"], [0.5, 0.7])
    expected = pipe("a cat", **dict(CALL, output_type="pil")).images[0]
    mine = np.asarray(Image.open(paths[0]).convert("RGB"), dtype=np.int32)
    assert np.abs(mine - np.asarray(expected, dtype=np.int32)).max() <= 1


def test_generation_cli_checks_loras_before_loading_the_model(loras, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the LoRA arguments were checked")

    monkeypatch.setattr(FluxPipeline, "from_pretrained", no_loading)
    other = tmp_path / "other.safetensors"
    write_lora(other, ("attn.to_k",), seed=2, sampling=dict(STUDENT_SAMPLING, guidance_scale=3.5))
    base = ["--pretrained_model_name_or_path", str(FOLDER), "--output_dir", str(tmp_path), "--path_to_lora",
            str(loras["folder"] / "student.safetensors"), str(loras["folder"] / "style.safetensors")]
    with pytest.raises(UsageError, match="got 3 LoRA scales for 2 LoRA files"):
        generate_cli.main(base + ["--lora_scale", "1", "2", "3"])
    with pytest.raises(UsageError, match=r"student\.safetensors and .*other\.safetensors .*guidance_scale: 2.0 vs 3.5"):
        generate_cli.main(base[:-1] + [str(other)])
    with pytest.raises(UsageError, match="missing.safetensors"):
        generate_cli.main(base + [str(tmp_path / "missing.safetensors")])
