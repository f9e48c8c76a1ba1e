"""Load and save FLUX transformer weights as safetensors, with strict key and shape checks.

Two layouts:
- diffusers (PyTorch) layout, as in FLUX.1-dev's ``transformer/`` folder: ``torch.nn.Linear`` weights are
  ``[out, in]``; one ``diffusion_pytorch_model.safetensors`` or shards listed in
  ``diffusion_pytorch_model.safetensors.index.json``.
- Paddle layout (written by :func:`save_paddle_safetensors`, metadata ``layout=paddle``): ``[in, out]``.

Every check (files present, keys, shapes) runs on the safetensors headers before any tensor is read, and a
failure raises :class:`WeightLoadError` listing every missing, unexpected and mis-shaped key.
"""
import json
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Tuple, Union

import numpy as np
import paddle

from . import safetensors_io
from .transformer_flux import FluxTransformer2DModel

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
PADDLE_LAYOUT = "paddle"
_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}
_MAX_LISTED = 30


class WeightLoadError(ValueError):
    """Weights do not fit the model: lists missing, unexpected and shape-mismatched keys."""


def _normalize_dtype(dtype) -> str:
    name = str(dtype).replace("paddle.", "")
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of float32, bfloat16, float16")
    return _DTYPES[name]


def linear_weight_names(model: paddle.nn.Layer) -> set:
    """Names of the ``nn.Linear`` weights (stored transposed between PyTorch and Paddle)."""
    return {f"{name}.weight" for name, layer in model.named_sublayers() if isinstance(layer, paddle.nn.Linear)}


def _format_names(names: List[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f", ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


def check_keys_and_shapes(expected: Mapping[str, Iterable[int]], found: Mapping[str, Iterable[int]],
                          source: str = "checkpoint") -> None:
    """Raise :class:`WeightLoadError` unless ``found`` has exactly the keys and shapes of ``expected``."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = sorted(
        f"{key} (checkpoint {list(found[key])}, model {list(expected[key])})"
        for key in set(expected) & set(found)
        if [int(d) for d in found[key]] != [int(d) for d in expected[key]]
    )
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_format_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_format_names(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {_format_names(mismatched)}")
    if problems:
        raise WeightLoadError(f"{source} does not match the model:\n  " + "\n  ".join(problems))


def _model_shapes(model: paddle.nn.Layer) -> Dict[str, List[int]]:
    return {name: [int(d) for d in param.shape] for name, param in model.state_dict().items()}


def _assign(param: paddle.Tensor, array: np.ndarray) -> None:
    value = paddle.to_tensor(np.ascontiguousarray(array, dtype=np.float32))
    param.set_value(value.astype(param.dtype) if value.dtype != param.dtype else value)


def load_state_dict_strict(model: paddle.nn.Layer, state_dict: Mapping[str, Union[np.ndarray, paddle.Tensor]],
                           source: str = "state dict") -> paddle.nn.Layer:
    """Copy a Paddle-layout state dict into ``model`` after checking every key and shape (all or nothing)."""
    found = {k: list(v.shape) for k, v in state_dict.items()}
    check_keys_and_shapes(_model_shapes(model), found, source)
    params = model.state_dict()
    for key, value in state_dict.items():
        array = value.astype("float32").numpy() if isinstance(value, paddle.Tensor) else np.asarray(value)
        _assign(params[key], array)
    return model


# ---------------------------------------------------------------------------------------------- checkpoint files
def resolve_weight_files(folder_or_file: Union[str, Path]) -> List[Path]:
    """The safetensors files of a transformer folder (index json, single file, or one ``*.safetensors``)."""
    path = Path(folder_or_file)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: weights must be a .safetensors file")
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no weights at {path}")
    index = path / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: no 'weight_map' in the index")
        files = [path / name for name in sorted(set(weight_map.values()))]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{index} lists shard files that do not exist: {', '.join(absent)}")
        return files
    single = path / WEIGHTS_NAME
    if single.is_file():
        return [single]
    candidates = sorted(path.glob("*.safetensors"))
    if len(candidates) == 1:
        return candidates
    raise FileNotFoundError(
        f"{path}: expected {WEIGHTS_NAME}, or {INDEX_NAME} with its shards, or exactly one .safetensors file "
        f"(found {len(candidates)})"
    )


def _read_headers(files: List[Path]) -> Tuple[Dict[str, Tuple[Path, dict, int]], Dict[str, str]]:
    """Map each tensor name to (file, header entry, data start); reject names present in two files."""
    entries: Dict[str, Tuple[Path, dict, int]] = {}
    metadata: Dict[str, str] = {}
    for file in files:
        header, meta, data_start = safetensors_io.read_header(file)
        metadata.update(meta)
        for name, info in header.items():
            if name in entries:
                raise WeightLoadError(f"key {name!r} appears in both {entries[name][0]} and {file}")
            entries[name] = (file, info, data_start)
    return entries, metadata


def load_weights_into(model: paddle.nn.Layer, folder_or_file: Union[str, Path],
                      layout: Optional[str] = None) -> paddle.nn.Layer:
    """Load safetensors weights into ``model`` with strict checks.

    Args:
        layout: "diffusers" (Linear weights ``[out, in]``, transposed here) or "paddle"; by default read from
            the file metadata (``layout=paddle``), else diffusers.
    """
    files = resolve_weight_files(folder_or_file)
    entries, metadata = _read_headers(files)
    layout = layout or (PADDLE_LAYOUT if metadata.get("layout") == PADDLE_LAYOUT else "diffusers")
    transposed = linear_weight_names(model) if layout != PADDLE_LAYOUT else set()
    found_shapes = {}
    for name, (_, info, _) in entries.items():
        shape = [int(d) for d in info["shape"]]
        found_shapes[name] = shape[::-1] if name in transposed and len(shape) == 2 else shape
    check_keys_and_shapes(_model_shapes(model), found_shapes, source=f"{folder_or_file} ({layout} layout)")

    params = model.state_dict()
    by_file: Dict[Path, List[str]] = {}
    for name, (file, _, _) in entries.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        mmap = np.memmap(file, dtype=np.uint8, mode="r")
        for name in names:
            _, info, data_start = entries[name]
            array = safetensors_io.read_tensor(file, info, data_start, mmap)
            if name in transposed:
                array = array.T
            _assign(params[name], array)
        del mmap
    return model


def load_flux_transformer(folder_or_file: Union[str, Path], dtype: str = "float32") -> FluxTransformer2DModel:
    """Build a :class:`FluxTransformer2DModel` from ``config.json`` and load its safetensors weights.

    ``folder_or_file`` is a diffusers ``transformer/`` folder (sharded or single file) or one ``.safetensors``
    file with ``config.json`` beside it. Weights may be fp32, bf16 or fp16 and are cast to ``dtype``.
    Parameters are created lazily (``paddle.LazyGuard``) so no memory is spent on a random initialisation.
    """
    dtype = _normalize_dtype(dtype)
    path = Path(folder_or_file)
    config_path = (path if path.is_dir() else path.parent) / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} at {config_path}")
    config = json.loads(config_path.read_text())
    resolve_weight_files(path)  # fail on absent files before building the model
    previous_dtype = paddle.get_default_dtype()
    paddle.set_default_dtype(dtype)
    try:
        with paddle.LazyGuard():
            model = FluxTransformer2DModel.from_config(config)
    finally:
        paddle.set_default_dtype(previous_dtype)
    load_weights_into(model, path)
    uninitialised = [n for n, p in model.named_parameters() if not p._is_initialized()]
    if uninitialised:
        raise WeightLoadError(f"parameters left uninitialised: {_format_names(uninitialised)}")
    model.eval()
    return model


# ---------------------------------------------------------------------------------------------- saving
def paddle_state_arrays(model: paddle.nn.Layer) -> Dict[str, Tuple[np.ndarray, str]]:
    """``{name: (array, safetensors dtype)}`` of a model's state dict, bf16 kept bit-exact."""
    arrays = {}
    for name, tensor in model.state_dict().items():
        if tensor.dtype == paddle.bfloat16:
            bits = safetensors_io.float32_to_bf16_bits(tensor.astype("float32").numpy())
            arrays[name] = (bits, "BF16")
        elif tensor.dtype == paddle.float16:
            arrays[name] = (tensor.numpy(), "F16")
        else:
            arrays[name] = (tensor.astype("float32").numpy(), "F32")
    return arrays


def save_paddle_safetensors(model: paddle.nn.Layer, path: Union[str, Path], save_config: bool = True) -> Path:
    """Write the model's weights in Paddle layout to ``path`` (a ``.safetensors`` file, written atomically).

    With ``save_config`` and a model that has a config, ``config.json`` is written beside it, so that
    :func:`load_flux_transformer` reads the folder back.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: the file name must end in .safetensors")
    safetensors_io.save_file(paddle_state_arrays(model), path, metadata={"format": "pd", "layout": PADDLE_LAYOUT})
    if save_config and hasattr(model, "config"):
        config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
        config["_class_name"] = type(model).__name__
        tmp = path.parent / (CONFIG_NAME + ".tmp")
        tmp.write_text(json.dumps(config, indent=2, default=list) + "\n")
        tmp.replace(path.parent / CONFIG_NAME)
    return path


def load_paddle_safetensors(model: paddle.nn.Layer, path: Union[str, Path]) -> paddle.nn.Layer:
    """Load a file written by :func:`save_paddle_safetensors` into ``model`` (strict)."""
    return load_weights_into(model, path, layout=PADDLE_LAYOUT)
