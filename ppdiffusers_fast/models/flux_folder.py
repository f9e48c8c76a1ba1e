"""A local FLUX.1-dev-layout folder: its expected files, and loading its components from PyTorch safetensors.

Layout (as ``black-forest-labs/FLUX.1-dev`` and diffusers' ``save_pretrained`` write it)::

    model_index.json
    scheduler/scheduler_config.json
    text_encoder/    config.json, model.safetensors                  (CLIPTextModel, pooled output)
    text_encoder_2/  config.json, model.safetensors or model.safetensors.index.json + shards  (T5EncoderModel)
    tokenizer/       vocab.json, merges.txt                          (CLIP BPE)
    tokenizer_2/     spiece.model                                    (T5 sentencepiece)
    transformer/     config.json, diffusion_pytorch_model.safetensors or its index + shards
    vae/             config.json, diffusion_pytorch_model.safetensors (AutoencoderKL, 16 latent channels)

:func:`check_flux_folder` lists every missing item by name before anything is loaded. Weights are read from
the safetensors files directly by the strict loader of ``models/weights.py`` (nothing is unpickled, nothing is
written into the folder): each model is built from its ``config.json`` without storage, ``torch.nn.Linear``
weights are transposed to Paddle's ``[in, out]``, and every key and shape is checked before a tensor is read.
"""
import inspect
import json
from pathlib import Path
from typing import List, Optional, Sequence, Union

from .. import compat
from .weights import build_uninitialised, finish_loading, load_weights_into, normalize_dtype
__all__ = ["SUBFOLDERS", "check_flux_folder", "load_text_encoders", "load_tokenizers", "load_vae", "read_scheduler_config",
           "FluxFolderError"]

# FLUX.1's scheduler settings, used when the folder given for the tokenizers has no scheduler/ config
FLUX_DEV_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                      "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}
FLUX_SCHNELL_SCHEDULER = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False}

# sub-folder -> (config file, alternatives of weight files (a single file or an index json), other files)
SUBFOLDERS = {
    "scheduler": ("scheduler_config.json", None, ()),
    "text_encoder": ("config.json", ("model.safetensors", "model.safetensors.index.json"), ()),
    "text_encoder_2": ("config.json", ("model.safetensors", "model.safetensors.index.json"), ()),
    "tokenizer": (None, None, ("vocab.json", "merges.txt")),
    "tokenizer_2": (None, None, ("spiece.model",)),
    "transformer": ("config.json", ("diffusion_pytorch_model.safetensors",
                                    "diffusion_pytorch_model.safetensors.index.json"), ()),
    "vae": ("config.json", ("diffusion_pytorch_model.safetensors",), ()),
}


class FluxFolderError(FileNotFoundError):
    """The model folder lacks sub-folders or files; the message names each of them."""


def check_flux_folder(folder: Union[str, Path], require: Sequence[str] = tuple(SUBFOLDERS),
                      need_index: bool = True) -> Path:
    """Raise :class:`FluxFolderError` naming every missing sub-folder or file of a FLUX.1-dev-layout folder.

    Args:
        require: the sub-folders needed (all by default).
        need_index: ``model_index.json`` is required (not for a folder that only supplies tokenizers).
    Returns:
        the folder as a ``Path``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FluxFolderError(f"model folder {folder} does not exist (expected the FLUX.1-dev layout: "
                              f"model_index.json, {', '.join(s + '/' for s in SUBFOLDERS)})")
    missing: List[str] = []
    if need_index and not (folder / "model_index.json").is_file():
        missing.append("model_index.json")
    for sub in require:
        config, weights, others = SUBFOLDERS[sub]
        if not (folder / sub).is_dir():
            missing.append(f"{sub}/ (sub-folder)")
            continue
        if config and not (folder / sub / config).is_file():
            missing.append(f"{sub}/{config}")
        if weights and not any((folder / sub / name).is_file() for name in weights):
            missing.append(f"{sub}/{' or '.join(weights)}")
        missing += [f"{sub}/{name}" for name in others if not (folder / sub / name).is_file()]
    if missing:
        raise FluxFolderError(f"{folder} is not a complete FLUX.1-dev-layout folder; missing: " + ", ".join(missing))
    return folder


def _read_config(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err})") from err


def load_text_encoders(folder: Union[str, Path], dtype: str = "float32"):
    """``(CLIPTextModel, T5EncoderModel)`` (``ppdiffusers.transformers``) from ``text_encoder/`` and
    ``text_encoder_2/``."""
    compat.apply()
    from ppdiffusers.transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    folder = Path(folder)
    models = []
    for sub, config_cls, model_cls in (("text_encoder", CLIPTextConfig, CLIPTextModel),
                                      ("text_encoder_2", T5Config, T5EncoderModel)):
        config = config_cls.from_dict(_read_config(folder / sub / "config.json"))
        model = build_uninitialised(lambda: model_cls(config), normalize_dtype(dtype))
        load_weights_into(model, folder / sub, layout="diffusers")
        models.append(finish_loading(model, folder / sub))
    return tuple(models)


def load_vae(folder: Union[str, Path], dtype: str = "float32"):
    """ppdiffusers ``AutoencoderKL`` from ``vae/`` (FLUX config: 16 latent channels, shift and scaling factors)."""
    compat.apply()
    from ppdiffusers import AutoencoderKL

    sub = Path(folder) / "vae"
    accepted = inspect.signature(AutoencoderKL.__init__).parameters
    config = {k: v for k, v in _read_config(sub / "config.json").items() if k in accepted or k.startswith("_")}
    model = build_uninitialised(lambda: AutoencoderKL.from_config(config), normalize_dtype(dtype))
    load_weights_into(model, sub, layout="diffusers")
    for name in ("scaling_factor", "shift_factor"):
        if model.config.get(name) is None:
            raise ValueError(f"{sub / 'config.json'}: the FLUX VAE needs {name}")
    return finish_loading(model, sub)


def load_tokenizers(folder: Union[str, Path]):
    """``(CLIPTokenizer, T5Tokenizer)`` from ``tokenizer/`` (vocab.json, merges.txt) and ``tokenizer_2/``
    (spiece.model)."""
    compat.apply()
    from ppdiffusers.transformers import CLIPTokenizer, T5Tokenizer

    folder = Path(folder)
    return (CLIPTokenizer.from_pretrained(str(folder / "tokenizer")),
            T5Tokenizer.from_pretrained(str(folder / "tokenizer_2")))


def read_scheduler_config(folder: Union[str, Path], guidance_embeds: bool = True) -> dict:
    """``scheduler/scheduler_config.json`` of a FLUX.1-dev-layout folder (for ``FlowMatchEulerDiscreteScheduler``);
    when the folder has none, FLUX.1-dev's settings, or FLUX.1-schnell's for a model without guidance embedding."""
    path = Path(folder) / "scheduler" / "scheduler_config.json"
    if path.is_file():
        return _read_config(path)
    return dict(FLUX_DEV_SCHEDULER if guidance_embeds else FLUX_SCHNELL_SCHEDULER)


# ---------------------------------------------------------------------------------------------- single files
def load_single_file_transformer(transformer: Union[str, Path], folder: Optional[Union[str, Path]],
                                 dtype: str = "float32"):
    """The FLUX transformer from a Black Forest Labs / ComfyUI file (its config from ``folder``'s
    ``transformer/config.json`` when present, else from the keys), in ``dtype``."""
    from . import single_file

    return single_file.load_bfl_transformer(transformer, dtype, single_file.component_configs(folder)["transformer"])


def load_single_file_vae(vae: Union[str, Path], folder: Optional[Union[str, Path]]):
    """The float32 ``AutoencoderKL`` from ``ae.safetensors`` (its config from ``folder``'s ``vae/`` when present)."""
    from . import single_file

    return single_file.load_bfl_vae(vae, "float32", single_file.component_configs(folder)["vae"])


def load_single_file_text_encoders(clip_l: Union[str, Path], t5: Union[str, Path],
                                   folder: Optional[Union[str, Path]], dtype: str = "float32"):
    """``(CLIPTextModel, T5EncoderModel)`` from ``clip_l.safetensors`` / ``t5xxl_*.safetensors`` (configs from
    ``folder``'s ``text_encoder/`` and ``text_encoder_2/`` when present), in ``dtype``."""
    from . import single_file

    configs = single_file.component_configs(folder)
    return single_file.load_clip_l(clip_l, dtype, configs["clip_l"]), single_file.load_t5(t5, dtype, configs["t5"])


def load_single_file_components(transformer: Union[str, Path], vae: Union[str, Path], clip_l: Union[str, Path],
                                t5: Union[str, Path], tokenizers: Union[str, Path], dtype: str = "float32") -> dict:
    """Every pipeline component from single files (Black Forest Labs / ComfyUI layouts, fp8 upcast).

    Args:
        transformer: ``flux1-dev.safetensors`` / ``flux1-schnell.safetensors`` (optionally ComfyUI-prefixed).
        vae: ``ae.safetensors``. clip_l: ``clip_l.safetensors``. t5: ``t5xxl_fp16.safetensors`` (or fp8).
        tokenizers: a folder with ``tokenizer/`` (vocab.json, merges.txt) and ``tokenizer_2/`` (spiece.model), as
            in FLUX.1-dev's repository; its ``config.json`` files and ``scheduler/`` are used when present.
    Returns:
        the models and tokenizers as keyword arguments of ``FluxPipeline``, and ``scheduler_config``. The VAE
        stays float32; the rest take ``dtype``.
    """
    named = {"transformer": transformer, "vae": vae, "clip_l": clip_l, "t5": t5}
    absent = [f"{kind}={path}" for kind, path in named.items() if not Path(path).is_file()]
    check_flux_folder(tokenizers, require=("tokenizer", "tokenizer_2"), need_index=False)
    if absent:
        raise FluxFolderError("single files not found: " + ", ".join(absent))
    dtype = normalize_dtype(dtype)
    model = load_single_file_transformer(transformer, tokenizers, dtype)
    tokenizer, tokenizer_2 = load_tokenizers(tokenizers)
    text_encoder, text_encoder_2 = load_single_file_text_encoders(clip_l, t5, tokenizers, dtype)
    return {"transformer": model, "vae": load_single_file_vae(vae, tokenizers), "text_encoder": text_encoder,
            "text_encoder_2": text_encoder_2, "tokenizer": tokenizer, "tokenizer_2": tokenizer_2,
            "scheduler_config": read_scheduler_config(tokenizers, bool(model.config.guidance_embeds))}
