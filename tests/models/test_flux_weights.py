"""Weight loading and saving: diffusers-layout safetensors (sharded / single, fp32 / bf16), strict key and shape
errors, Paddle-layout round trip, and the safetensors reader/writer itself."""
import json
import shutil
import struct

import numpy as np
import paddle
import pytest

from ppdiffusers_fast.models import flux_embeddings, safetensors_io
from ppdiffusers_fast.models.weights import (
    WeightLoadError,
    load_flux_transformer,
    load_paddle_safetensors,
    load_state_dict_strict,
    save_paddle_safetensors,
)


def _io(folder):
    return dict(np.load(folder / "io.npz"))


def _sample(model, io):
    with paddle.no_grad():
        out = model(
            paddle.to_tensor(io["hidden_states"]).astype(model.x_embedder.weight.dtype),
            paddle.to_tensor(io["encoder_hidden_states"]).astype(model.x_embedder.weight.dtype),
            paddle.to_tensor(io["pooled_projections"]).astype(model.x_embedder.weight.dtype),
            paddle.to_tensor(io["timestep"]), paddle.to_tensor(io["img_ids"]), paddle.to_tensor(io["txt_ids"]),
            guidance=paddle.to_tensor(io["guidance"]) if "guidance" in io else None,
        )
    return out.sample.astype("float32").numpy()


@pytest.fixture
def case(fixtures_dir):
    return fixtures_dir / "transformer" / "tiny_guidance"


@pytest.fixture
def single_file_copy(case, tmp_path):
    """The sharded fixture merged into one diffusers-layout file (torch layout kept, fp32)."""
    shards = sorted((case / "transformer").glob("*.safetensors"))
    assert len(shards) > 1 and (case / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    tensors = {}
    for shard in shards:
        tensors.update(safetensors_io.load_file(shard))
    folder = tmp_path / "transformer"
    folder.mkdir()
    shutil.copy(case / "transformer" / "config.json", folder / "config.json")
    return folder, tensors


def _write(folder, tensors):
    safetensors_io.save_file({k: (v, "F32") for k, v in tensors.items()},
                             folder / "diffusion_pytorch_model.safetensors")
    return folder


def test_sharded_and_single_file_give_the_same_output(case, single_file_copy):
    io = _io(case)
    folder, tensors = single_file_copy
    sharded = _sample(load_flux_transformer(case / "transformer"), io)
    single = _sample(load_flux_transformer(_write(folder, tensors)), io)
    assert np.array_equal(sharded, single)
    also_file = _sample(load_flux_transformer(folder / "diffusion_pytorch_model.safetensors"), io)
    assert np.array_equal(sharded, also_file)


def test_missing_key_is_named(single_file_copy):
    folder, tensors = single_file_copy
    del tensors["transformer_blocks.1.attn.to_k.weight"]
    with pytest.raises(WeightLoadError, match=r"missing keys \(1\): transformer_blocks\.1\.attn\.to_k\.weight"):
        load_flux_transformer(_write(folder, tensors))


def test_unexpected_key_is_named(single_file_copy):
    folder, tensors = single_file_copy
    tensors["transformer_blocks.0.attn.extra_proj.weight"] = np.zeros([3, 3], np.float32)
    with pytest.raises(WeightLoadError, match=r"unexpected keys \(1\): transformer_blocks\.0\.attn\.extra_proj"):
        load_flux_transformer(_write(folder, tensors))


def test_wrong_shape_is_named(single_file_copy):
    folder, tensors = single_file_copy
    tensors["proj_out.weight"] = tensors["proj_out.weight"][:-1]
    with pytest.raises(WeightLoadError, match=r"shape mismatches \(1\): proj_out\.weight \(checkpoint \[32, 15\]"):
        load_flux_transformer(_write(folder, tensors))


def test_missing_shard_is_named(case, tmp_path):
    folder = tmp_path / "transformer"
    shutil.copytree(case / "transformer", folder)
    victim = sorted(folder.glob("*-00002-of-*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        load_flux_transformer(folder)


def test_truncated_file_is_rejected(single_file_copy):
    folder, tensors = single_file_copy
    path = _write(folder, tensors) / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="outside the file"):
        load_flux_transformer(folder)


def test_bf16_checkpoint_loads(case, monkeypatch):
    io = _io(case)
    # torch's float32 timestep frequencies, so that only the weight decoding is under test
    monkeypatch.setattr(flux_embeddings, "timestep_frequencies", lambda *a, **k: paddle.to_tensor(io["time_frequencies"]))
    bf16_folder = case / "transformer_bf16"
    header, _, _ = safetensors_io.read_header(bf16_folder / "diffusion_pytorch_model.safetensors")
    assert {info["dtype"] for info in header.values()} == {"BF16"}

    model_fp32 = load_flux_transformer(bf16_folder, dtype="float32")
    ours = _sample(model_fp32, io)
    # same bf16-rounded weights, fp32 compute in torch: only float32 arithmetic differences remain
    assert np.abs(ours - io["sample_bf16_weights"]).max() <= 1e-5
    # and close to the full-precision model within bf16 weight rounding
    scale = np.abs(io["sample"]).max()
    assert np.abs(ours - io["sample"]).max() <= 0.05 * scale

    model_bf16 = load_flux_transformer(bf16_folder, dtype="bfloat16")
    assert all(p.dtype == paddle.bfloat16 for p in model_bf16.parameters())
    for (name, p16), p32 in zip(model_bf16.named_parameters(), model_fp32.parameters()):
        assert np.array_equal(p16.astype("float32").numpy(), p32.numpy()), name


def test_paddle_safetensors_round_trip_is_exact(case, tmp_path):
    io = _io(case)
    model = load_flux_transformer(case / "transformer")
    path = save_paddle_safetensors(model, tmp_path / "saved" / "model.safetensors")
    assert not list(path.parent.glob("*.tmp"))
    _, metadata, _ = safetensors_io.read_header(path)
    assert metadata["layout"] == "paddle"
    reloaded = load_flux_transformer(path.parent)
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert np.array_equal(a.numpy(), b.numpy()), name
    assert np.array_equal(_sample(model, io), _sample(reloaded, io))

    bf16_model = load_flux_transformer(case / "transformer_bf16", dtype="bfloat16")
    bf16_path = save_paddle_safetensors(bf16_model, tmp_path / "bf16" / "model.safetensors")
    target = load_flux_transformer(case / "transformer", dtype="bfloat16")
    load_paddle_safetensors(target, bf16_path)
    for (name, a), b in zip(bf16_model.state_dict().items(), target.state_dict().values()):
        assert np.array_equal(a.astype("float32").numpy(), b.astype("float32").numpy()), name


def test_load_state_dict_strict(case):
    model = load_flux_transformer(case / "transformer")
    state = {k: v.numpy() * 2 for k, v in model.state_dict().items()}
    bad = dict(state)
    bad.pop("proj_out.bias")
    before = model.proj_out.weight.numpy().copy()
    with pytest.raises(WeightLoadError, match="proj_out.bias"):
        load_state_dict_strict(model, bad)
    assert np.array_equal(model.proj_out.weight.numpy(), before)  # nothing half-loaded
    load_state_dict_strict(model, state)
    assert np.array_equal(model.proj_out.weight.numpy(), before * 2)


def test_bf16_bits_by_hand(tmp_path):
    values = np.array([1.0, -2.0, 0.5, 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, 3.0e38], dtype=np.float32)
    bits = safetensors_io.float32_to_bf16_bits(values)
    # 1.0 = 0x3F80; 1+2^-8 is a tie -> even (0x3F80); 1+3*2^-8 is a tie -> even (0x3F82)
    assert bits.tolist() == [0x3F80, 0xC000, 0x3F00, 0x3F80, 0x3F82, 0x7F62]
    path = tmp_path / "x.safetensors"
    safetensors_io.save_file({"w": (bits.reshape(2, 3), "BF16"), "i": (np.arange(4, dtype=np.int64), "I64")}, path)
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    assert header["w"]["dtype"] == "BF16" and header["w"]["shape"] == [2, 3]
    loaded = safetensors_io.load_file(path)
    assert loaded["w"].dtype == np.float32
    np.testing.assert_array_equal(loaded["w"].ravel()[:5], [1.0, -2.0, 0.5, 1.0, 1.0 + 2 * 2.0 ** -7])
    assert loaded["i"].tolist() == [0, 1, 2, 3]


def test_linear_with_one_output_and_remapping_every_tensor(tmp_path, monkeypatch, case):
    """A [1, n] PyTorch weight becomes [n, 1]; re-mapping the file after every tensor loads the same model."""
    from ppdiffusers_fast.models import weights

    torch_weight = np.arange(5, dtype=np.float32).reshape(1, 5)  # Linear(5 -> 1) in PyTorch layout
    path = safetensors_io.save_file({"0.weight": torch_weight, "0.bias": np.ones(1, np.float32)},
                                    tmp_path / "one.safetensors")
    with paddle.LazyGuard():
        model = paddle.nn.Sequential(paddle.nn.Linear(5, 1))
    weights.load_weights_into(model, path)
    assert np.array_equal(model[0].weight.numpy(), torch_weight.T)

    whole = load_flux_transformer(case / "transformer_bf16", dtype="float32")
    monkeypatch.setattr(weights, "_REMAP_BYTES", 1)
    remapped = load_flux_transformer(case / "transformer_bf16", dtype="float32")
    for (name, a), b in zip(whole.state_dict().items(), remapped.state_dict().values()):
        assert np.array_equal(a.numpy(), b.numpy()), name


@pytest.mark.parametrize("folder, dtype", [("transformer_bf16", "bfloat16"), ("transformer_bf16", "float32"),
                                           ("transformer", "bfloat16"), ("transformer", "float32")])
def test_parameters_equal_a_plain_numpy_load(case, folder, dtype):
    """Bit for bit: bf16 widened exactly, transposed in numpy, cast by Paddle (what the loader did before)."""
    from ppdiffusers_fast.models.weights import linear_weight_names, resolve_weight_files

    model = load_flux_transformer(case / folder, dtype=dtype)
    transposed, params = linear_weight_names(model), model.state_dict()
    seen = set()
    for file in resolve_weight_files(case / folder):
        for name, array in safetensors_io.load_file(file).items():
            expected = paddle.to_tensor(np.ascontiguousarray(array.T if name in transposed else array)).astype(dtype)
            assert params[name].dtype == expected.dtype
            assert np.array_equal(params[name].astype("float32").numpy(), expected.astype("float32").numpy()), name
            seen.add(name)
    assert seen == set(params)
