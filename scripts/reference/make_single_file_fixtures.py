"""Build the single-file layout fixtures (Black Forest Labs / ComfyUI) from the tiny diffusers pipeline fixture.

Run in the PyTorch reference environment after ``make_pipeline_fixtures.py``:

    /work/venv-ref/bin/python scripts/reference/make_single_file_fixtures.py

Reads ``tests/fixtures/pipeline/tiny_flux/`` and writes ``tests/fixtures/single_file/``:

- ``flux1-tiny.safetensors``: the transformer in Black Forest Labs names (fused ``qkv`` / ``linear1``, final norm
  modulation stored ``[shift, scale]``), written by the reverse of diffusers' conversion and checked here:
  diffusers' own conversion (``convert_flux_transformer_checkpoint_to_diffusers``, which ``from_single_file``
  uses; its hard-coded width 3072 set to the tiny model's) must read it back to exactly the original weights.
- ``ae-tiny.safetensors``: the VAE in original autoencoder names (attention projections as 1x1 convolutions,
  decoder ``up`` blocks in reverse order), checked the same way with ``AutoencoderKL.from_single_file``.
- ``clip_l-tiny.safetensors`` / ``t5xxl-tiny.safetensors``: the text encoders as ComfyUI ships them
  (transformers names, one file each; fp32 here so that the pipeline runs of the diffusers folder apply).
- ``flux1-tiny-fp8-scaled.safetensors``: the transformer with every 2-D weight as float8_e4m3fn and a per-tensor
  ``scale_weight`` (ComfyUI's scaled fp8, with its ``scaled_fp8`` marker); ``flux1-tiny-fp8-expected.safetensors``
  holds torch's upcast values ``float(w8) * scale`` (float32) under the same names.
- ``outputs.npz``: the transformer output of diffusers' single-file-loaded model on fixed inputs, and the VAE
  decode of a fixed latent by diffusers' single-file-loaded VAE.
"""
import inspect
import re
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from diffusers.loaders import single_file_utils
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2] / "tests" / "fixtures"
SOURCE = ROOT / "pipeline" / "tiny_flux"
OUT = ROOT / "single_file"

LINEARS = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
           "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
           "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
           "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
           "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
           "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
           "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer"}
DOUBLE = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin", "attn.to_out.0": "img_attn.proj",
          "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
          "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}
DOUBLE_NORMS = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}


def to_bfl_transformer(state, num_layers, num_single_layers):
    """diffusers names -> Black Forest Labs names (the reverse of diffusers' single-file conversion)."""
    out = {}
    for ours, bfl in LINEARS.items():
        for part in ("weight", "bias"):
            if f"{ours}.{part}" in state:
                out[f"{bfl}.{part}"] = state[f"{ours}.{part}"]
    for part in ("weight", "bias"):
        scale, shift = state[f"norm_out.linear.{part}"].chunk(2, dim=0)
        out[f"final_layer.adaLN_modulation.1.{part}"] = torch.cat([shift, scale], dim=0)
    for i in range(num_layers):
        d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for ours, bfl in DOUBLE.items():
            for part in ("weight", "bias"):
                out[f"{b}.{bfl}.{part}"] = state[f"{d}.{ours}.{part}"]
        for ours, bfl in DOUBLE_NORMS.items():
            out[f"{b}.{bfl}.scale"] = state[f"{d}.{ours}.weight"]
        for part in ("weight", "bias"):
            out[f"{b}.img_attn.qkv.{part}"] = torch.cat([state[f"{d}.attn.to_{x}.{part}"] for x in "qkv"])
            out[f"{b}.txt_attn.qkv.{part}"] = torch.cat([state[f"{d}.attn.add_{x}_proj.{part}"] for x in "qkv"])
    for i in range(num_single_layers):
        s, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for part in ("weight", "bias"):
            out[f"{b}.linear1.{part}"] = torch.cat([state[f"{s}.attn.to_{x}.{part}"] for x in "qkv"]
                                                   + [state[f"{s}.proj_mlp.{part}"]])
            out[f"{b}.linear2.{part}"] = state[f"{s}.proj_out.{part}"]
            out[f"{b}.modulation.lin.{part}"] = state[f"{s}.norm.linear.{part}"]
        out[f"{b}.norm.query_norm.scale"] = state[f"{s}.attn.norm_q.weight"]
        out[f"{b}.norm.key_norm.scale"] = state[f"{s}.attn.norm_k.weight"]
    assert sum(v.numel() for v in out.values()) == sum(v.numel() for v in state.values())
    return {k: v.contiguous() for k, v in out.items()}


def to_original_vae(state, num_blocks):
    """diffusers AutoencoderKL names -> original autoencoder names (attention projections as 1x1 convs)."""
    out = {}
    for key, value in state.items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = re.sub(r"mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m.group(1)) + 1}", new)
        new = new.replace("mid_block.attentions.0.group_norm", "mid.attn_1.norm")
        new = re.sub(r"mid_block\.attentions\.0\.to_(q|k|v)", r"mid.attn_1.\1", new)
        new = new.replace("mid_block.attentions.0.to_out.0", "mid.attn_1.proj_out")
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets", r"encoder.down.\1.block", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets",
                     lambda m: f"decoder.up.{num_blocks - 1 - int(m.group(1))}.block", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0",
                     lambda m: f"decoder.up.{num_blocks - 1 - int(m.group(1))}.upsample", new)
        if ".attn_1." in new and new.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[new] = value.contiguous()
    return out


def scaled_fp8(bfl_state):
    """Every 2-D weight as float8_e4m3fn with a per-tensor scale; returns (file tensors, expected upcast)."""
    stored, expected = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}, {}
    for key, value in bfl_state.items():
        if key.endswith(".weight") and value.ndim == 2:
            scale = (value.abs().max() / 448.0).float().reshape(())
            w8 = (value / scale).to(torch.float8_e4m3fn)
            stored[key] = w8
            stored[key[: -len("weight")] + "scale_weight"] = scale
            expected[key] = w8.float() * scale
        else:
            stored[key] = value
            expected[key] = value
    return stored, expected


def diffusers_bfl_converter(inner_dim):
    """diffusers' ``convert_flux_transformer_checkpoint_to_diffusers`` with its hard-coded FLUX width (3072)
    replaced by the tiny model's, so that its own conversion logic runs on the tiny file."""
    source = inspect.getsource(single_file_utils.convert_flux_transformer_checkpoint_to_diffusers)
    assert source.count("inner_dim = 3072") == 1
    namespace = dict(vars(single_file_utils))
    exec(source.replace("inner_dim = 3072", f"inner_dim = {inner_dim}"), namespace)  # trusted: the installed diffusers source
    return namespace["convert_flux_transformer_checkpoint_to_diffusers"]


def same_state(a, b, what):
    assert set(a) == set(b), (what, sorted(set(a) ^ set(b))[:10])
    for key in a:
        assert torch.equal(a[key], b[key]), (what, key)


def main():
    torch.manual_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    transformer = FluxTransformer2DModel.from_pretrained(SOURCE / "transformer").eval()
    config = transformer.config
    bfl = to_bfl_transformer(transformer.state_dict(), config.num_layers, config.num_single_layers)
    save_file(bfl, str(OUT / "flux1-tiny.safetensors"))
    convert = diffusers_bfl_converter(config.num_attention_heads * config.attention_head_dim)
    theirs = FluxTransformer2DModel.from_config(config).eval()
    theirs.load_state_dict(convert(load_file(str(OUT / "flux1-tiny.safetensors"))), strict=True)
    same_state(transformer.state_dict(), theirs.state_dict(), "transformer")  # the reverse mapping is diffusers'

    stored, expected = scaled_fp8(bfl)
    save_file(stored, str(OUT / "flux1-tiny-fp8-scaled.safetensors"))
    save_file(expected, str(OUT / "flux1-tiny-fp8-expected.safetensors"))

    vae = AutoencoderKL.from_pretrained(SOURCE / "vae").eval()
    original = to_original_vae(vae.state_dict(), len(vae.config.block_out_channels))
    save_file(original, str(OUT / "ae-tiny.safetensors"))
    their_vae = AutoencoderKL.from_single_file(str(OUT / "ae-tiny.safetensors"), config=str(SOURCE),
                                               subfolder="vae").eval()
    same_state(vae.state_dict(), their_vae.state_dict(), "vae")

    save_file(load_file(str(SOURCE / "text_encoder" / "model.safetensors")), str(OUT / "clip_l-tiny.safetensors"))
    save_file(load_file(str(SOURCE / "text_encoder_2" / "model.safetensors")), str(OUT / "t5xxl-tiny.safetensors"))

    generator = torch.Generator().manual_seed(1)
    inputs = {"hidden_states": torch.randn(2, 12, config.in_channels, generator=generator),
              "encoder_hidden_states": torch.randn(2, 5, config.joint_attention_dim, generator=generator),
              "pooled_projections": torch.randn(2, config.pooled_projection_dim, generator=generator),
              "timestep": torch.tensor([0.25, 0.8]), "guidance": torch.tensor([3.5, 1.0]),
              "img_ids": torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(3.0), torch.arange(4.0),
                                                    indexing="ij"), -1).reshape(12, 3),
              "txt_ids": torch.zeros(5, 3)}
    latent = torch.randn(1, vae.config.latent_channels, 4, 3, generator=generator)
    with torch.no_grad():
        sample = theirs(**inputs, return_dict=False)[0]
        decoded = their_vae.decode(latent).sample
    np.savez(OUT / "outputs.npz", **{k: v.numpy() for k, v in inputs.items()}, sample=sample.numpy(),
             vae_latent=latent.numpy(), vae_decoded=decoded.numpy())
    print("wrote", sorted(p.name for p in OUT.iterdir()))


if __name__ == "__main__":
    main()
