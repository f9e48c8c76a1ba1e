"""FLUX weights as single files, in the layouts Black Forest Labs and ComfyUI ship them.

- Transformer: ``flux1-dev.safetensors`` / ``flux1-schnell.safetensors`` (Black Forest Labs names:
  ``double_blocks.N.img_attn.qkv``, ``single_blocks.N.linear1``, ``img_in``, ``time_in``, ``vector_in``,
  ``guidance_in``, ``final_layer.adaLN_modulation.1``, ...), also with ComfyUI's ``model.diffusion_model.`` prefix.
  Fused projections are split by rows (qkv -> q, k, v; ``linear1`` -> q, k, v, mlp); the final norm's modulation
  is stored ``[shift, scale]`` and the model wants ``[scale, shift]``, so its halves are swapped. The config is
  read from the keys: block counts from the indices, width from ``img_in``, head size from the q/k norm,
  dev (guidance embedding) vs schnell from ``guidance_in``.
- VAE: ``ae.safetensors`` (original autoencoder names: ``encoder.down.N.block.M``, ``mid.attn_1.q`` as 1x1 convs,
  decoder ``up`` blocks in reverse order).
- Text encoders: ``clip_l.safetensors`` and ``t5xxl_fp16.safetensors`` (transformers names, optional prefixes).
- float8 (``F8_E4M3`` / ``F8_E5M2``) tensors, as in community fp8 files, are upcast to the compute dtype; when the
  file carries a per-tensor ``<layer>.scale_weight`` (ComfyUI's scaled fp8) the weight is multiplied by it.

Every key of a file is used (or is a known scale / marker key), every shape is checked, and errors name the key,
before any tensor is read. Configs come from a ``config.json`` when one is given (a FLUX.1-dev-layout folder's
``transformer/``, ``vae/``, ``text_encoder/``, ``text_encoder_2/``), else from the keys, with FLUX.1's values for
what the keys cannot tell (rotary axes 16/56/56 for 128-channel heads, CLIP heads of 64 channels, 32 norm
groups, the VAE's scaling and shift factors).
"""
import json
import re
from pathlib import Path
from typing import Dict, List, Optional, Union

from .. import compat
from .weights import (SourceTensor, WeightLoadError, build_uninitialised, finish_loading, load_sources,
                      read_file_entries)

__all__ = ["read_single_file", "bfl_transformer_sources", "load_bfl_transformer", "bfl_vae_sources", "load_bfl_vae",
           "load_clip_l", "load_t5", "FP8_NOTE"]

FP8_NOTE = ("float8 tensors are upcast to the compute dtype when loaded (times their per-tensor scale_weight "
            "when the file has one); memory and speed are those of the compute dtype")
TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
VAE_PREFIXES = ("first_stage_model.", "vae.")
CLIP_PREFIXES = ("text_encoders.clip_l.transformer.", "cond_stage_model.transformer.", "transformer.")
T5_PREFIXES = ("text_encoders.t5xxl.transformer.",)
FLUX_VAE_FACTORS = {"scaling_factor": 0.3611, "shift_factor": 0.1159}
_SCALE_SUFFIXES = ("scale_weight", "scale_input")
_MARKERS = ("scaled_fp8",)


# ---------------------------------------------------------------------------------------------- reading
def read_single_file(path: Union[str, Path], prefixes=()) -> Dict[str, SourceTensor]:
    """``{name: SourceTensor}`` of one file, with a prefix every key shares removed and fp8 scales attached.

    ``<layer>.scale_weight`` becomes the ``scale_key`` of ``<layer>.weight``; ``<layer>.scale_input`` (an
    activation scale for fp8 matmuls, not needed once the weight is upcast) and the ``scaled_fp8`` marker are
    consumed. A scale without its float8 weight is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no single-file weights at {path}")
    entries, _ = read_file_entries([path])
    for prefix in prefixes:
        if entries and all(key.startswith(prefix) for key in entries):
            entries = {key[len(prefix):]: src for key, src in entries.items()}
            break
    tensors = {key: src for key, src in entries.items()
               if key not in _MARKERS and not key.endswith(_SCALE_SUFFIXES)}
    for key, src in entries.items():
        if key.endswith(".scale_weight"):
            weight = key[: -len("scale_weight")] + "weight"
            if weight not in tensors or not tensors[weight].dtype.startswith("F8"):
                raise WeightLoadError(f"{path}: {src.key!r} scales {weight!r}, which is not a float8 tensor here")
            if src.shape not in ((), (1,)):
                raise WeightLoadError(f"{path}: {src.key!r} must be a per-tensor scale, got shape {list(src.shape)}")
            old = tensors[weight]
            tensors[weight] = SourceTensor(old.file, old.key, old.shape, old.dtype, old.offset, old.nbytes,
                                           scale_key=src.key)
    return tensors


def _take(pool: Dict[str, SourceTensor], name: str, path) -> SourceTensor:
    if name not in pool:
        raise WeightLoadError(f"{path}: missing key {name!r}")
    return pool.pop(name)


def _split_rows(src: SourceTensor, target_names: List[str], sizes: List[int]) -> Dict[str, SourceTensor]:
    """One fused projection (``[sum(sizes), ...]``) split by rows into several targets."""
    if src.shape[0] != sum(sizes):
        raise WeightLoadError(f"{src.file}: {src.key!r} has {src.shape[0]} rows, expected {sum(sizes)} "
                              f"({' + '.join(map(str, sizes))})")
    out, begin = {}, 0
    for name, size in zip(target_names, sizes):
        out[name] = SourceTensor(src.file, src.key, (size,) + tuple(src.shape[1:]), src.dtype, src.offset,
                                 src.nbytes, rows=(begin, begin + size), scale_key=src.scale_key)
        begin += size
    return out


def _refuse_leftovers(pool: Dict[str, SourceTensor], path) -> None:
    if pool:
        names = sorted(src.key for src in pool.values())
        raise WeightLoadError(f"{path}: keys not used by the model ({len(names)}): {', '.join(names[:30])}")


def _block_count(keys, pattern: str) -> int:
    indices = {int(m.group(1)) for key in keys for m in [re.match(pattern, key)] if m}
    if indices and indices != set(range(max(indices) + 1)):
        raise WeightLoadError(f"block indices {sorted(indices)} of {pattern!r} are not 0..N-1")
    return len(indices)


def _read_config(config_file: Optional[Union[str, Path]]) -> Optional[dict]:
    if config_file is None or not Path(config_file).is_file():
        return None
    try:
        return json.loads(Path(config_file).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file}: invalid JSON ({err})") from err


# ---------------------------------------------------------------------------------------------- transformer
_LINEAR_PAIRS = {  # Black Forest Labs name -> our name, for a Linear's weight and bias
    "img_in": "x_embedder", "txt_in": "context_embedder", "final_layer.linear": "proj_out",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
}
_DOUBLE_LINEARS = {"img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
                   "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
                   "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
                   "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2"}
_DOUBLE_NORMS = {"img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
                 "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k"}
_SINGLE_LINEARS = {"linear2": "proj_out", "modulation.lin": "norm.linear"}
_SINGLE_NORMS = {"norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k"}


def infer_bfl_transformer_config(tensors: Dict[str, SourceTensor], path,
                                 axes_dims_rope: Optional[List[int]] = None) -> dict:
    """Our transformer's config from Black Forest Labs key names and shapes (see the module docstring).

    ``axes_dims_rope``: the rotary axes, which the keys do not hold; FLUX.1's ``[16, 56, 56]`` for 128-channel heads.
    """
    for key in ("img_in.weight", "txt_in.weight", "vector_in.in_layer.weight", "final_layer.linear.weight",
                "double_blocks.0.img_attn.norm.query_norm.scale"):
        if key not in tensors:
            raise WeightLoadError(f"{path}: missing key {key!r}: not a Black Forest Labs FLUX transformer file")
    inner, in_channels = tensors["img_in.weight"].shape
    head_dim = tensors["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    if inner % head_dim:
        raise WeightLoadError(f"{path}: width {inner} is not a multiple of the head size {head_dim}")
    if axes_dims_rope is None and head_dim != 128:
        raise WeightLoadError(f"{path}: heads of {head_dim} channels; the rotary axes are known for FLUX.1's 128 "
                              f"only: give the transformer's config.json")
    return {"patch_size": 1, "in_channels": in_channels, "out_channels": tensors["final_layer.linear.weight"].shape[0],
            "num_layers": _block_count(tensors, r"double_blocks\.(\d+)\."),
            "num_single_layers": _block_count(tensors, r"single_blocks\.(\d+)\."),
            "attention_head_dim": head_dim, "num_attention_heads": inner // head_dim,
            "joint_attention_dim": tensors["txt_in.weight"].shape[1],
            "pooled_projection_dim": tensors["vector_in.in_layer.weight"].shape[1],
            "guidance_embeds": "guidance_in.in_layer.weight" in tensors,
            "axes_dims_rope": list(axes_dims_rope or [16, 56, 56])}


def bfl_transformer_sources(tensors: Dict[str, SourceTensor], config: dict, path) -> Dict[str, SourceTensor]:
    """Map Black Forest Labs names to ours (PyTorch layout); every key must be used."""
    pool = dict(tensors)
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    sources: Dict[str, SourceTensor] = {}

    def linear(bfl: str, ours: str) -> None:
        for part in ("weight", "bias"):
            sources[f"{ours}.{part}"] = _take(pool, f"{bfl}.{part}", path)

    def fused(bfl: str, ours: List[str], sizes: List[int]) -> None:
        for part in ("weight", "bias"):
            sources.update(_split_rows(_take(pool, f"{bfl}.{part}", path), [f"{o}.{part}" for o in ours], sizes))

    for bfl, ours in _LINEAR_PAIRS.items():
        if bfl.startswith("guidance_in") and not config["guidance_embeds"]:
            continue
        linear(bfl, ours)
    for part in ("weight", "bias"):  # [shift, scale] -> [scale, shift]
        src = _take(pool, f"final_layer.adaLN_modulation.1.{part}", path)
        sources[f"norm_out.linear.{part}"] = SourceTensor(src.file, src.key, src.shape, src.dtype, src.offset,
                                                          src.nbytes, swap_halves=True, scale_key=src.scale_key)
    for i in range(config["num_layers"]):
        bfl, ours = f"double_blocks.{i}", f"transformer_blocks.{i}"
        for b, o in _DOUBLE_LINEARS.items():
            linear(f"{bfl}.{b}", f"{ours}.{o}")
        for b, o in _DOUBLE_NORMS.items():
            sources[f"{ours}.{o}.weight"] = _take(pool, f"{bfl}.{b}.scale", path)
        fused(f"{bfl}.img_attn.qkv", [f"{ours}.attn.to_{x}" for x in "qkv"], [inner] * 3)
        fused(f"{bfl}.txt_attn.qkv", [f"{ours}.attn.add_{x}_proj" for x in "qkv"], [inner] * 3)
    for i in range(config["num_single_layers"]):
        bfl, ours = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        for b, o in _SINGLE_LINEARS.items():
            linear(f"{bfl}.{b}", f"{ours}.{o}")
        for b, o in _SINGLE_NORMS.items():
            sources[f"{ours}.{o}.weight"] = _take(pool, f"{bfl}.{b}.scale", path)
        fused(f"{bfl}.linear1", [f"{ours}.attn.to_{x}" for x in "qkv"] + [f"{ours}.proj_mlp"],
              [inner] * 3 + [4 * inner])
    _refuse_leftovers(pool, path)
    return sources


def load_bfl_transformer(path: Union[str, Path], dtype: str = "float32",
                         config_file: Optional[Union[str, Path]] = None):
    """Our ``FluxTransformer2DModel`` from a Black Forest Labs / ComfyUI single file (strict, fp8 upcast).

    Args:
        config_file: a diffusers ``transformer/config.json``; by default the config is read from the keys.
    """
    from .transformer_flux import FluxTransformer2DModel

    tensors = read_single_file(path, TRANSFORMER_PREFIXES)
    config = _read_config(config_file) or infer_bfl_transformer_config(tensors, path)
    sources = bfl_transformer_sources(tensors, config, path)
    model = build_uninitialised(lambda: FluxTransformer2DModel.from_config(config), dtype)
    load_sources(model, sources, f"{path} (Black Forest Labs layout)")
    return finish_loading(model, path)


# ---------------------------------------------------------------------------------------------- VAE
def _vae_rename(key: str, num_blocks: int) -> str:
    """Original autoencoder name -> diffusers ``AutoencoderKL`` name."""
    key = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", key)
    key = re.sub(r"\.mid\.block_(\d)\.", lambda m: f".mid_block.resnets.{int(m.group(1)) - 1}.", key)
    key = re.sub(r"\.mid\.attn_1\.norm\.", ".mid_block.attentions.0.group_norm.", key)
    key = re.sub(r"\.mid\.attn_1\.(q|k|v)\.", lambda m: f".mid_block.attentions.0.to_{m.group(1)}.", key)
    key = re.sub(r"\.mid\.attn_1\.proj_out\.", ".mid_block.attentions.0.to_out.0.", key)
    key = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", key)
    key = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", key)
    key = re.sub(r"^decoder\.up\.(\d+)\.block\.",
                 lambda m: f"decoder.up_blocks.{num_blocks - 1 - int(m.group(1))}.resnets.", key)
    key = re.sub(r"^decoder\.up\.(\d+)\.upsample\.",
                 lambda m: f"decoder.up_blocks.{num_blocks - 1 - int(m.group(1))}.upsamplers.0.", key)
    return key.replace(".nin_shortcut.", ".conv_shortcut.")


def infer_bfl_vae_config(tensors: Dict[str, SourceTensor], path) -> dict:
    """A diffusers ``AutoencoderKL`` config from original autoencoder keys (FLUX.1's norm groups and factors)."""
    for key in ("encoder.conv_in.weight", "decoder.conv_in.weight", "decoder.conv_out.weight"):
        if key not in tensors:
            raise WeightLoadError(f"{path}: missing key {key!r}: not an original-layout autoencoder file")
    num_blocks = _block_count(tensors, r"encoder\.down\.(\d+)\.")
    channels = [tensors[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in range(num_blocks)]
    return {"in_channels": tensors["encoder.conv_in.weight"].shape[1],
            "out_channels": tensors["decoder.conv_out.weight"].shape[0],
            "latent_channels": tensors["decoder.conv_in.weight"].shape[1],
            "block_out_channels": channels, "layers_per_block": _block_count(tensors, r"encoder\.down\.0\.block\.(\d+)"),
            "down_block_types": ["DownEncoderBlock2D"] * num_blocks, "up_block_types": ["UpDecoderBlock2D"] * num_blocks,
            "act_fn": "silu", "norm_num_groups": 32, "use_quant_conv": "quant_conv.weight" in tensors,
            "use_post_quant_conv": "post_quant_conv.weight" in tensors, "mid_block_add_attention": True,
            **FLUX_VAE_FACTORS}


def bfl_vae_sources(tensors: Dict[str, SourceTensor], num_blocks: int) -> Dict[str, SourceTensor]:
    """Rename every key; the attention's 1x1 convolutions ``[C, C, 1, 1]`` become Linear weights ``[C, C]``."""
    sources = {}
    for key, src in tensors.items():
        name = _vae_rename(key, num_blocks)
        if ".attentions.0." in name and name.endswith(".weight") and len(src.shape) == 4:
            src = SourceTensor(src.file, src.key, tuple(src.shape[:2]), src.dtype, src.offset, src.nbytes,
                               scale_key=src.scale_key)
        sources[name] = src
    return sources


def load_bfl_vae(path: Union[str, Path], dtype: str = "float32", config_file: Optional[Union[str, Path]] = None):
    """ppdiffusers ``AutoencoderKL`` from ``ae.safetensors`` (original autoencoder names), strict."""
    import inspect

    compat.apply()
    from ppdiffusers import AutoencoderKL

    tensors = read_single_file(path, VAE_PREFIXES)
    config = _read_config(config_file) or infer_bfl_vae_config(tensors, path)
    accepted = inspect.signature(AutoencoderKL.__init__).parameters
    config = {k: v for k, v in config.items() if k in accepted or k.startswith("_")}
    sources = bfl_vae_sources(tensors, len(config["block_out_channels"]))
    model = build_uninitialised(lambda: AutoencoderKL.from_config(config), dtype)
    load_sources(model, sources, f"{path} (original autoencoder layout)")
    return finish_loading(model, path)


# ---------------------------------------------------------------------------------------------- text encoders
_CLIP_UNUSED = ("text_projection.weight", "logit_scale", "text_model.embeddings.position_ids")


def infer_clip_config(tensors: Dict[str, SourceTensor], path) -> dict:
    """CLIP-L text config from the keys (heads of 64 channels, FLUX.1's token ids and activation)."""
    key = "text_model.embeddings.token_embedding.weight"
    if key not in tensors:
        raise WeightLoadError(f"{path}: missing key {key!r}: not a CLIP text encoder file")
    vocab, hidden = tensors[key].shape
    return {"vocab_size": vocab, "hidden_size": hidden, "num_attention_heads": hidden // 64,
            "num_hidden_layers": _block_count(tensors, r"text_model\.encoder\.layers\.(\d+)\."),
            "intermediate_size": tensors["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
            "max_position_embeddings": tensors["text_model.embeddings.position_embedding.weight"].shape[0],
            "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 768,
            "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}


def load_clip_l(path: Union[str, Path], dtype: str = "float32", config_file: Optional[Union[str, Path]] = None):
    """``CLIPTextModel`` (ppdiffusers.transformers) from ``clip_l.safetensors``.

    The keys FLUX does not use (``text_projection.weight``, ``logit_scale``, ``position_ids``) are skipped.
    """
    compat.apply()
    from ppdiffusers.transformers import CLIPTextConfig, CLIPTextModel

    tensors = {k: v for k, v in read_single_file(path, CLIP_PREFIXES).items() if k not in _CLIP_UNUSED}
    config = CLIPTextConfig.from_dict(_read_config(config_file) or infer_clip_config(tensors, path))
    model = build_uninitialised(lambda: CLIPTextModel(config), dtype)
    load_sources(model, tensors, f"{path} (CLIP text encoder)")
    return finish_loading(model, path)


def infer_t5_config(tensors: Dict[str, SourceTensor], path) -> dict:
    """T5 encoder config from the keys (heads from the relative attention bias, gated-GELU when ``wi_1``)."""
    key = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    if "shared.weight" not in tensors or key not in tensors:
        raise WeightLoadError(f"{path}: missing key 'shared.weight' or {key!r}: not a T5 encoder file")
    vocab, d_model = tensors["shared.weight"].shape
    buckets, heads = tensors[key].shape
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_1.weight" in tensors
    d_ff = tensors["encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"].shape[0]
    return {"vocab_size": vocab, "d_model": d_model, "num_heads": heads,
            "d_kv": tensors["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0] // heads, "d_ff": d_ff,
            "num_layers": _block_count(tensors, r"encoder\.block\.(\d+)\."), "relative_attention_num_buckets": buckets,
            "relative_attention_max_distance": 128, "feed_forward_proj": "gated-gelu" if gated else "relu",
            "dense_act_fn": "gelu_new" if gated else "relu", "is_gated_act": gated, "layer_norm_epsilon": 1e-6,
            "tie_word_embeddings": False}


def load_t5(path: Union[str, Path], dtype: str = "float32", config_file: Optional[Union[str, Path]] = None):
    """``T5EncoderModel`` (ppdiffusers.transformers) from ``t5xxl_fp16.safetensors`` (or its fp8 variants)."""
    compat.apply()
    from ppdiffusers.transformers import T5Config, T5EncoderModel

    tensors = read_single_file(path, T5_PREFIXES)
    config = T5Config.from_dict(_read_config(config_file) or infer_t5_config(tensors, path))
    model = build_uninitialised(lambda: T5EncoderModel(config), dtype)
    load_sources(model, tensors, f"{path} (T5 encoder)")
    return finish_loading(model, path)


def is_bfl_transformer(path: Union[str, Path]) -> bool:
    """True when the file has Black Forest Labs transformer names (optionally prefixed); reads the header only."""
    return "img_in.weight" in read_single_file(path, TRANSFORMER_PREFIXES)


def component_configs(folder: Optional[Union[str, Path]]) -> Dict[str, Optional[Path]]:
    """Config files a FLUX.1-dev-layout folder offers (None where absent)."""
    names = {"transformer": "transformer/config.json", "vae": "vae/config.json",
             "clip_l": "text_encoder/config.json", "t5": "text_encoder_2/config.json"}
    if folder is None:
        return {kind: None for kind in names}
    return {kind: (Path(folder) / name if (Path(folder) / name).is_file() else None) for kind, name in names.items()}

