"""The tiny FLUX components of the demo and their FLUX.1-dev folder layout, written in PyTorch layout.

Every weight file of the folder is a PyTorch-layout (diffusers / transformers) safetensors file: ``nn.Linear``
weights are stored ``[out, in]`` (Paddle keeps ``[in, out]``), everything else as is, with the key names of
diffusers / transformers. ``FluxPipeline.from_pretrained`` therefore reads the demo folder through the same
path as the real FLUX.1-dev checkpoint (``models/flux_folder.py``, ``models/weights.py``).

    model_index.json                    component classes, as diffusers writes them
    scheduler/scheduler_config.json     FLUX.1-dev's flow-matching scheduler (dynamic shift)
    text_encoder/    config.json, model.safetensors                       CLIPTextModel (frozen, random)
    text_encoder_2/  config.json, model.safetensors                       T5EncoderModel (frozen, random)
    tokenizer/       vocab.json, merges.txt, tokenizer_config.json, ...  CLIP BPE from the prompts
    tokenizer_2/     spiece.model, tokenizer_config.json, ...            T5 sentencepiece from the prompts
    vae/             config.json, diffusion_pytorch_model.safetensors     AutoencoderKL, FLUX VAE config
    transformer/     config.json, diffusion_pytorch_model.safetensors     FluxTransformer2DModel
    demo_config.json resolution, T5 length, guidance and metrics the demo uses
"""
import json
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import paddle

from ppdiffusers_fast.models import safetensors_io
from ppdiffusers_fast.models.transformer_flux import FluxTransformer2DModel
from ppdiffusers_fast.models.weights import linear_weight_names
from .config import DemoModelConfig

__all__ = ["clip_text_config", "t5_config", "build_text_encoders", "build_vae", "build_transformer",
           "save_torch_layout", "write_json", "write_model_index", "write_scheduler_config", "count_parameters"]

DIFFUSERS_VERSION = "0.30.0.dev0"  # the version FLUX.1-dev's folder names; only informative
FLUX1_DEV_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": DIFFUSERS_VERSION,
    "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
}
MODEL_INDEX = {
    "_class_name": "FluxPipeline", "_diffusers_version": DIFFUSERS_VERSION,
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
}


def write_json(path, value) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, default=list) + "\n", encoding="utf-8")
    tmp.replace(path)


def clip_text_config(vocab_size: int, cfg: DemoModelConfig) -> dict:
    """Hugging Face ``config.json`` of the tiny CLIP text model (``eos_token_id=2``: pooled at ``argmax(ids)``,
    as FLUX.1's CLIP; the tokenizer gives end-of-text the largest id)."""
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": vocab_size,
            "hidden_size": cfg.text_hidden_size, "intermediate_size": 2 * cfg.text_hidden_size,
            "projection_dim": cfg.text_hidden_size, "num_hidden_layers": cfg.text_layers,
            "num_attention_heads": cfg.text_heads, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5, "attention_dropout": 0.0, "initializer_range": 0.02, "initializer_factor": 1.0,
            "bos_token_id": vocab_size - 2, "eos_token_id": 2, "pad_token_id": 1, "torch_dtype": "float32"}


def t5_config(vocab_size: int, cfg: DemoModelConfig) -> dict:
    """Hugging Face ``config.json`` of the tiny T5 encoder (gated GELU as T5 v1.1 / FLUX.1's T5-XXL)."""
    return {"architectures": ["T5EncoderModel"], "model_type": "t5", "vocab_size": vocab_size,
            "d_model": cfg.t5_d_model, "d_kv": cfg.t5_d_model // cfg.text_heads, "d_ff": 2 * cfg.t5_d_model,
            "num_layers": cfg.text_layers, "num_decoder_layers": cfg.text_layers, "num_heads": cfg.text_heads,
            "relative_attention_num_buckets": 8, "relative_attention_max_distance": 16,
            "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new", "is_gated_act": True,
            "dropout_rate": 0.0, "layer_norm_epsilon": 1e-6, "initializer_factor": 1.0, "is_encoder_decoder": False,
            "use_cache": False, "tie_word_embeddings": False, "pad_token_id": 0, "eos_token_id": 1,
            "torch_dtype": "float32"}


def build_text_encoders(clip_config: dict, t5_config_dict: dict):
    """Randomly initialised ``(CLIPTextModel, T5EncoderModel)`` of ``ppdiffusers.transformers``, in eval mode."""
    from ppdiffusers.transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip = CLIPTextModel(CLIPTextConfig.from_dict(clip_config))
    t5 = T5EncoderModel(T5Config.from_dict(t5_config_dict))
    clip.eval()
    t5.eval()
    return clip, t5


def build_vae(cfg: DemoModelConfig, scaling_factor: float = 1.0, shift_factor: float = 0.0):
    """ppdiffusers ``AutoencoderKL`` with the FLUX VAE configuration style (16 latent channels, no quant convs)."""
    from ppdiffusers import AutoencoderKL

    levels = len(cfg.vae_block_out_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels,
                         block_out_channels=tuple(cfg.vae_block_out_channels), layers_per_block=1, act_fn="silu",
                         latent_channels=cfg.latent_channels, norm_num_groups=cfg.vae_norm_num_groups,
                         sample_size=cfg.resolution, scaling_factor=float(scaling_factor),
                         shift_factor=float(shift_factor), use_quant_conv=False, use_post_quant_conv=False)


def vae_config_json(vae) -> dict:
    """diffusers-style ``vae/config.json`` (ppdiffusers' keys plus the ones diffusers' FLUX VAE also writes)."""
    ppdiffusers_only = ("down_block_out_channels", "up_block_out_channels")  # None here; unknown to diffusers
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_") and k not in ppdiffusers_only}
    config.update({"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, "force_upcast": True,
                   "mid_block_add_attention": True, "latents_mean": None, "latents_std": None})
    return config


def build_transformer(cfg: DemoModelConfig) -> FluxTransformer2DModel:
    """The tiny FLUX transformer (no guidance embedding: the teacher uses true classifier-free guidance)."""
    if sum(cfg.axes_dims_rope) != cfg.attention_head_dim:
        raise ValueError(f"axes_dims_rope {cfg.axes_dims_rope} must sum to attention_head_dim {cfg.attention_head_dim}")
    return FluxTransformer2DModel(patch_size=1, in_channels=4 * cfg.latent_channels, out_channels=None,
                                  num_layers=cfg.num_layers, num_single_layers=cfg.num_single_layers,
                                  attention_head_dim=cfg.attention_head_dim,
                                  num_attention_heads=cfg.num_attention_heads, joint_attention_dim=cfg.t5_d_model,
                                  pooled_projection_dim=cfg.text_hidden_size, guidance_embeds=False,
                                  axes_dims_rope=tuple(cfg.axes_dims_rope))


def transformer_config_json(model: FluxTransformer2DModel) -> dict:
    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    config.update({"_class_name": "FluxTransformer2DModel", "_diffusers_version": DIFFUSERS_VERSION})
    return config


def torch_layout_arrays(model: paddle.nn.Layer) -> Dict[str, Tuple[np.ndarray, str]]:
    """``{name: (float32 array, "F32")}`` with Linear weights transposed to PyTorch's ``[out, in]``.

    A tensor shared by several names (T5's ``shared`` / ``encoder.embed_tokens``) is written once, under its
    first name, as ``transformers`` does.
    """
    transposed = linear_weight_names(model)
    arrays, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        array = tensor.astype("float32").numpy()
        arrays[name] = (np.ascontiguousarray(array.T if name in transposed else array), "F32")
    return arrays


def save_torch_layout(model: paddle.nn.Layer, path, config: Optional[dict] = None) -> Path:
    """Write ``model``'s weights as a PyTorch-layout safetensors file (atomic), and ``config.json`` beside it."""
    path = Path(path)
    safetensors_io.save_file(torch_layout_arrays(model), path, metadata={"format": "pt"})
    if config is not None:
        write_json(path.parent / "config.json", config)
    return path


def write_model_index(folder) -> None:
    write_json(Path(folder) / "model_index.json", MODEL_INDEX)


def write_scheduler_config(folder) -> None:
    write_json(Path(folder) / "scheduler" / "scheduler_config.json", FLUX1_DEV_SCHEDULER)


def count_parameters(model: paddle.nn.Layer) -> int:
    return int(sum(int(np.prod(p.shape)) for p in model.parameters()))
