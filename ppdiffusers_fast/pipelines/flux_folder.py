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
the safetensors files directly (nothing is unpickled, nothing is written into the folder): each model is
built from its ``config.json`` without initialisation, ``torch.nn.Linear`` weights are transposed to
Paddle's ``[in, out]``, and every key and shape is checked (``models.weights.check_keys_and_shapes``).
"""
import inspect
import json
from pathlib import Path
from typing import Dict, List, Sequence, Union

import numpy as np
import paddle

from .. import compat
from ..models import safetensors_io
from ..models.weights import WeightLoadError, check_keys_and_shapes, linear_weight_names

__all__ = ["SUBFOLDERS", "check_flux_folder", "weight_files", "load_torch_safetensors", "load_text_encoders",
           "load_tokenizers", "load_vae", "load_scheduler", "FluxFolderError"]

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


def check_flux_folder(folder: Union[str, Path], require: Sequence[str] = tuple(SUBFOLDERS)) -> Path:
    """Raise :class:`FluxFolderError` naming every missing sub-folder or file of a FLUX.1-dev-layout folder.

    Args:
        require: the sub-folders needed (all by default).
    Returns:
        the folder as a ``Path``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FluxFolderError(f"model folder {folder} does not exist (expected the FLUX.1-dev layout: "
                              f"model_index.json, {', '.join(s + '/' for s in SUBFOLDERS)})")
    missing: List[str] = []
    if not (folder / "model_index.json").is_file():
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


def weight_files(subfolder: Union[str, Path]) -> List[Path]:
    """The safetensors files of a component folder: the single file, or the shards its index json lists."""
    subfolder = Path(subfolder)
    indexes = sorted(subfolder.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text()).get("weight_map") or {}
        files = [subfolder / name for name in sorted(set(weight_map.values()))]
        absent = [str(f) for f in files if not f.is_file()]
        if not files or absent:
            raise FluxFolderError(f"{indexes[0]} lists shard files that are missing: {', '.join(absent) or 'none'}")
        return files
    files = sorted(subfolder.glob("*.safetensors"))
    if len(files) != 1:
        raise FluxFolderError(f"{subfolder}: expected one .safetensors file or an index json, found {len(files)}")
    return files


def load_torch_safetensors(model: paddle.nn.Layer, files: Sequence[Path]) -> paddle.nn.Layer:
    """Load PyTorch-layout safetensors into ``model`` (strict keys and shapes; Linear weights transposed).

    Tied parameters (one tensor under several names, e.g. T5's ``shared`` and ``encoder.embed_tokens``)
    count as present when any of their names is in the files.
    """
    state = model.state_dict()
    aliases: Dict[int, List[str]] = {}
    for name, tensor in state.items():
        aliases.setdefault(id(tensor), []).append(name)
    entries = {}
    for file in files:
        header, _, data_start = safetensors_io.read_header(file)
        for name, info in header.items():
            if name in entries:
                raise WeightLoadError(f"key {name!r} appears in both {entries[name][0]} and {file}")
            entries[name] = (file, info, data_start)
    transposed = linear_weight_names(model)
    found = {}
    for name, (_, info, _) in entries.items():
        shape = [int(d) for d in info["shape"]]
        found[name] = shape[::-1] if name in transposed and len(shape) == 2 else shape
    for names in aliases.values():  # a tied tensor loaded under one name fills the others
        present = [n for n in names if n in found]
        for name in names:
            if present and name not in found:
                found[name] = found[present[0]]
    expected = {name: [int(d) for d in tensor.shape] for name, tensor in state.items()}
    check_keys_and_shapes(expected, found, source=", ".join(str(f) for f in files))
    maps = {file: np.memmap(file, dtype=np.uint8, mode="r") for file in files}
    for name, (file, info, data_start) in entries.items():
        array = safetensors_io.read_tensor(file, info, data_start, maps[file])
        array = np.ascontiguousarray(array.T if name in transposed else array)
        target = state[name]
        value = paddle.to_tensor(array)
        target.set_value(value.astype(target.dtype) if value.dtype != target.dtype else value)
    return model


def _build_uninitialised(build, dtype: str):
    """Build a model with parameters of ``dtype`` and no random initialisation (weights are loaded next)."""
    from paddlenlp.transformers.model_utils import no_init_weights

    previous = paddle.get_default_dtype()
    paddle.set_default_dtype(dtype)
    try:
        with paddle.LazyGuard(), no_init_weights():
            model = build()
    finally:
        paddle.set_default_dtype(previous)
    return model


def _finish(model, subfolder):
    left = [n for n, p in model.named_parameters() if not p._is_initialized()]
    if left:
        raise WeightLoadError(f"{subfolder}: parameters left without weights: {', '.join(left[:20])}")
    model.eval()
    return model


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
        model = _build_uninitialised(lambda: model_cls(config), dtype)
        load_torch_safetensors(model, weight_files(folder / sub))
        models.append(_finish(model, folder / sub))
    return tuple(models)


def load_vae(folder: Union[str, Path], dtype: str = "float32"):
    """ppdiffusers ``AutoencoderKL`` from ``vae/`` (FLUX config: 16 latent channels, shift and scaling factors)."""
    compat.apply()
    from ppdiffusers import AutoencoderKL

    sub = Path(folder) / "vae"
    accepted = inspect.signature(AutoencoderKL.__init__).parameters
    config = {k: v for k, v in _read_config(sub / "config.json").items() if k in accepted or k.startswith("_")}
    model = _build_uninitialised(lambda: AutoencoderKL.from_config(config), dtype)
    load_torch_safetensors(model, weight_files(sub))
    for name in ("scaling_factor", "shift_factor"):
        if model.config.get(name) is None:
            raise ValueError(f"{sub / 'config.json'}: the FLUX VAE needs {name}")
    return _finish(model, sub)


def load_tokenizers(folder: Union[str, Path]):
    """``(CLIPTokenizer, T5Tokenizer)`` from ``tokenizer/`` (vocab.json, merges.txt) and ``tokenizer_2/``
    (spiece.model)."""
    compat.apply()
    from ppdiffusers.transformers import CLIPTokenizer, T5Tokenizer

    folder = Path(folder)
    return (CLIPTokenizer.from_pretrained(str(folder / "tokenizer")),
            T5Tokenizer.from_pretrained(str(folder / "tokenizer_2")))


def load_scheduler(folder: Union[str, Path]):
    """Our ``FlowMatchEulerDiscreteScheduler`` (dynamic shift) from ``scheduler/scheduler_config.json``."""
    from ..schedulers.scheduling_flow_match_euler import FlowMatchEulerDiscreteScheduler

    config = _read_config(Path(folder) / "scheduler" / "scheduler_config.json")
    return FlowMatchEulerDiscreteScheduler.from_config(config)
