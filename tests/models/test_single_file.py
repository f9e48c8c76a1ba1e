"""Single-file layouts (Black Forest Labs transformer and autoencoder, ComfyUI prefixes and text encoders, fp8)
against diffusers (fixtures from scripts/reference/make_single_file_fixtures.py), and their strict errors."""
import json
from pathlib import Path

import numpy as np
import paddle
import pytest

from ppdiffusers_fast.models import flux_embeddings, safetensors_io
from ppdiffusers_fast.models.flux_folder import FluxFolderError
from ppdiffusers_fast.models.single_file import (infer_bfl_transformer_config, infer_t5_config, load_bfl_transformer,
                                                 load_bfl_vae, read_single_file)
from ppdiffusers_fast.models.weights import WeightLoadError, load_flux_transformer
from ppdiffusers_fast.pipelines.pipeline_flux import FluxPipeline

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
FILES = FIXTURES / "single_file"
FOLDER = FIXTURES / "pipeline" / "tiny_flux"
TRANSFORMER_CONFIG = FOLDER / "transformer" / "config.json"


def _forward(model, io):
    with paddle.no_grad():
        out = model(*(paddle.to_tensor(io[k]) for k in ("hidden_states", "encoder_hidden_states",
                                                          "pooled_projections", "timestep", "img_ids", "txt_ids")),
                    guidance=paddle.to_tensor(io["guidance"]))
    return out.sample.numpy()


def _same_parameters(a, b):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert np.array_equal(x.astype("float32").numpy(), y.astype("float32").numpy()), name


def _rewrite(source, target, rename=lambda k: k, drop=(), extra=None):
    """Copy a safetensors file with renamed / dropped / added keys (values unchanged)."""
    tensors = {rename(k): v for k, v in safetensors_io.load_file(source).items() if k not in drop}
    tensors.update(extra or {})
    return safetensors_io.save_file(tensors, target)


@pytest.fixture(scope="module")
def io():
    return dict(np.load(FILES / "outputs.npz"))


@pytest.fixture(scope="module")
def bfl_model():
    return load_bfl_transformer(FILES / "flux1-tiny.safetensors", config_file=TRANSFORMER_CONFIG)


def test_bfl_transformer_matches_diffusers(bfl_model, io, monkeypatch):
    # torch's float32 timestep frequencies (1 ulp apart at a few entries), so that only the loading is under test
    table = np.load(FIXTURES / "transformer" / "tiny_guidance" / "io.npz")["time_frequencies"]
    monkeypatch.setattr(flux_embeddings, "timestep_frequencies", lambda *a, **k: paddle.to_tensor(table))
    ours = _forward(bfl_model, io)
    assert np.abs(ours - io["sample"]).max() <= 1e-5
    _same_parameters(bfl_model, load_flux_transformer(FOLDER / "transformer"))  # same as the diffusers folder


def test_comfyui_prefix_gives_the_same_model(bfl_model, tmp_path):
    path = _rewrite(FILES / "flux1-tiny.safetensors", tmp_path / "flux1-comfy.safetensors",
                    rename=lambda k: "model.diffusion_model." + k)
    _same_parameters(bfl_model, load_bfl_transformer(path, config_file=TRANSFORMER_CONFIG))


def test_config_is_read_from_the_keys():
    tensors = read_single_file(FILES / "flux1-tiny.safetensors")
    expected = json.loads(TRANSFORMER_CONFIG.read_text())
    inferred = infer_bfl_transformer_config(tensors, "f", axes_dims_rope=expected["axes_dims_rope"])
    for key, value in inferred.items():
        assert value == (expected[key] or expected["in_channels"] if key == "out_channels" else expected[key]), key
    with pytest.raises(WeightLoadError, match="heads of 16 channels"):
        infer_bfl_transformer_config(tensors, "f")
    t5 = infer_t5_config(read_single_file(FILES / "t5xxl-tiny.safetensors"), "t5")
    t5_expected = json.loads((FOLDER / "text_encoder_2" / "config.json").read_text())
    for key in ("vocab_size", "d_model", "num_heads", "d_kv", "d_ff", "num_layers", "relative_attention_num_buckets",
                "is_gated_act", "dense_act_fn"):
        assert t5[key] == t5_expected[key], key


def test_schnell_file_without_guidance_embedding(tmp_path, io):
    path = _rewrite(FILES / "flux1-tiny.safetensors", tmp_path / "schnell.safetensors",
                    drop=[f"guidance_in.{l}.{p}" for l in ("in_layer", "out_layer") for p in ("weight", "bias")])
    tensors = read_single_file(path)
    config = infer_bfl_transformer_config(tensors, path, axes_dims_rope=[4, 4, 8])
    assert config["guidance_embeds"] is False
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(config))
    model = load_bfl_transformer(path, config_file=config_file)
    assert model.time_text_embed.guidance_embedder is None


@pytest.mark.parametrize("change, message", [
    ("extra", r"keys not used by the model \(1\): double_blocks\.0\.img_attn\.extra\.weight"),
    ("missing", r"missing key 'single_blocks\.1\.linear2\.bias'"),
    ("fused_rows", r"'double_blocks\.0\.img_attn\.qkv\.weight' has 95 rows, expected 96 \(32 \+ 32 \+ 32\)"),
    ("shape", r"x_embedder\.weight from img_in\.weight \(checkpoint \[63, 32\], model \[64, 32\]\)"),
])
def test_strict_errors_name_the_key(tmp_path, change, message):
    tensors = safetensors_io.load_file(FILES / "flux1-tiny.safetensors")
    if change == "extra":
        tensors["double_blocks.0.img_attn.extra.weight"] = np.zeros((2, 2), np.float32)
    elif change == "missing":
        del tensors["single_blocks.1.linear2.bias"]
    elif change == "fused_rows":
        tensors["double_blocks.0.img_attn.qkv.weight"] = tensors["double_blocks.0.img_attn.qkv.weight"][:-1]
    else:
        tensors["img_in.weight"] = tensors["img_in.weight"][:, :-1]
    path = safetensors_io.save_file(tensors, tmp_path / "bad.safetensors")
    with pytest.raises(WeightLoadError, match=message):
        load_bfl_transformer(path, config_file=TRANSFORMER_CONFIG)


def test_scaled_fp8_is_upcast_with_its_scale(tmp_path):
    header, _, _ = safetensors_io.read_header(FILES / "flux1-tiny-fp8-scaled.safetensors")
    assert header["img_in.weight"]["dtype"] == "F8_E4M3" and "img_in.scale_weight" in header
    ours = load_bfl_transformer(FILES / "flux1-tiny-fp8-scaled.safetensors", config_file=TRANSFORMER_CONFIG)
    # torch's float(w8) * scale, stored in float32 under the same names
    expected = load_bfl_transformer(FILES / "flux1-tiny-fp8-expected.safetensors", config_file=TRANSFORMER_CONFIG)
    _same_parameters(ours, expected)


def _decode_e4m3fn(bits: np.ndarray) -> np.ndarray:
    """float8_e4m3fn bit patterns -> float32, by hand: sign, 4 exponent bits (bias 7), 3 mantissa bits."""
    bits = bits.astype(np.int32)
    sign = np.where(bits & 0x80, -1.0, 1.0)
    exponent, mantissa = (bits >> 3) & 0xF, bits & 0x7
    normal = (1 + mantissa / 8.0) * 2.0 ** (exponent - 7)
    subnormal = (mantissa / 8.0) * 2.0 ** -6
    return (sign * np.where(exponent == 0, subnormal, normal)).astype(np.float32)


def test_plain_fp8_round_trip_is_exact(tmp_path):
    tensors = safetensors_io.load_file(FILES / "flux1-tiny.safetensors")
    stored = {k: paddle.to_tensor(v * 50).astype(paddle.float8_e4m3fn) for k, v in tensors.items()}
    path = safetensors_io.save_file(stored, tmp_path / "fp8.safetensors")
    model = load_bfl_transformer(path, config_file=TRANSFORMER_CONFIG)
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    header, _, start = safetensors_io.read_header(path)
    begin, end = header["img_in.weight"]["data_offsets"]
    by_hand = _decode_e4m3fn(np.asarray(raw[start + begin:start + end])).reshape(header["img_in.weight"]["shape"])
    assert np.array_equal(model.x_embedder.weight.numpy(), by_hand.T)  # Paddle Linear: [in, out]
    assert np.abs(by_hand).max() > 1 and np.unique(by_hand).size > 16  # a real spread of fp8 values


def test_bfl_vae_matches_diffusers(io):
    vae = load_bfl_vae(FILES / "ae-tiny.safetensors", config_file=FOLDER / "vae" / "config.json")
    with paddle.no_grad():
        decoded = vae.decode(paddle.to_tensor(io["vae_latent"])).sample.numpy()
    assert np.abs(decoded - io["vae_decoded"]).max() <= 1e-5


def test_pipeline_from_single_files_matches_diffusers():
    pipe = FluxPipeline.from_single_files(transformer=FILES / "flux1-tiny.safetensors", vae=FILES / "ae-tiny.safetensors",
                                          clip_l=FILES / "clip_l-tiny.safetensors", t5=FILES / "t5xxl-tiny.safetensors",
                                          tokenizers=FOLDER)
    pipe.set_progress_bar_config(disable=True)
    runs = json.loads((FOLDER.parent / "runs.json").read_text())
    reference = np.load(FOLDER.parent / "run_single.npz")
    out = pipe(**runs["single"], latents=paddle.to_tensor(reference["latents"]), output_type="np")
    assert np.abs(out.images - reference["image"]).max() <= 1e-3  # the diffusers folder's tolerance


def test_missing_single_file_is_named_before_loading(tmp_path):
    with pytest.raises(FluxFolderError, match=r"vae=.*nowhere\.safetensors"):
        FluxPipeline.from_single_files(transformer=FILES / "flux1-tiny.safetensors", vae=tmp_path / "nowhere.safetensors",
                                       clip_l=FILES / "clip_l-tiny.safetensors", t5=FILES / "t5xxl-tiny.safetensors",
                                       tokenizers=FOLDER)


SINGLE_FILE_FLAGS = ["--transformer_file", str(FILES / "flux1-tiny.safetensors"), "--vae_file",
                     str(FILES / "ae-tiny.safetensors"), "--clip_l_file", str(FILES / "clip_l-tiny.safetensors"),
                     "--t5_file", str(FILES / "t5xxl-tiny.safetensors")]


def test_generation_cli_single_files_give_the_folder_images(tmp_path):
    from PIL import Image

    from ppdiffusers_fast.inference import generate_cli

    common = ["--pretrained_model_name_or_path", str(FOLDER), "--prompt", "a cat", "--height", "32", "--width", "32",
              "--step", "2", "--seed", "3", "--max_sequence_length", "8"]
    from_folder = generate_cli.main(common + ["--output_dir", str(tmp_path / "folder")])
    from_files = generate_cli.main(common + SINGLE_FILE_FLAGS + ["--output_dir", str(tmp_path / "files")])
    assert [p.name for p in from_files] == [p.name for p in from_folder]
    for a, b in zip(from_folder, from_files):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


@pytest.mark.parametrize("flags, message", [
    (SINGLE_FILE_FLAGS[:4], r"missing: --clip_l_file, --t5_file"),
    (SINGLE_FILE_FLAGS[:-1] + ["/nowhere/t5.safetensors"], r"file not found: --t5_file /nowhere/t5\.safetensors"),
])
def test_single_file_flags_are_checked_before_loading(flags, message):
    from ppdiffusers_fast.evaluation import coco_cli
    from ppdiffusers_fast.inference import generate_cli

    with pytest.raises(ValueError, match=message):  # a UsageError: one "error: ..." line, exit code 2
        generate_cli.main(["--pretrained_model_name_or_path", str(FOLDER)] + flags)
    args = coco_cli.build_parser().parse_args(["--pretrained_model_name_or_path", str(FOLDER), "--output_dir",
                                               "unused"] + flags)
    with pytest.raises(ValueError, match=message):
        coco_cli.validate_args(args)


def test_training_teacher_from_a_single_file(tmp_path, bfl_model):
    """--pretrained_teacher_model accepts a Black Forest Labs file: load_flux_transformer reads it (config beside)."""
    import shutil

    shutil.copy(FILES / "flux1-tiny.safetensors", tmp_path / "flux1-tiny.safetensors")
    shutil.copy(TRANSFORMER_CONFIG, tmp_path / "config.json")
    _same_parameters(bfl_model, load_flux_transformer(tmp_path / "flux1-tiny.safetensors"))
