"""The one strict loader of safetensors weights into Paddle models, and the FLUX transformer's load and save.

Layouts:
- PyTorch layout (diffusers / transformers folders, Black Forest Labs single files): ``torch.nn.Linear`` weights
  are ``[out, in]`` and are transposed to Paddle's ``[in, out]`` here; one file, or shards listed in an index json.
- Paddle layout (written by :func:`save_paddle_safetensors`, metadata ``layout=paddle``): ``[in, out]``.

A load is planned first: each model tensor gets a :class:`SourceTensor` (file, key, and for single-file layouts a
row range, a half swap or an fp8 scale). Every check (files present, headers valid, every key used, every shape
right) runs on the headers before any tensor is read; a failure raises :class:`WeightLoadError` listing every
missing, unexpected and mis-shaped key. Then each shard is mapped once (``safetensors`` ``safe_open``, zero copy)
and each tensor is transposed and cast at most once, in Paddle, into a buffer that becomes the parameter
(parameters are created without storage under ``paddle.LazyGuard``): one tensor's temporaries at a time.
"""
import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import paddle
from tqdm.auto import tqdm

from . import safetensors_io
from .transformer_flux import FluxTransformer2DModel

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
PADDLE_LAYOUT = "paddle"
_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}
_FP8 = ("F8_E4M3", "F8_E5M2")
_MAX_LISTED = 30
_PROGRESS_BYTES = 512 * 1024 * 1024  # show a bar over shards for loads larger than this
# re-map a shard after reading this many bytes of it: the pages read so far leave the resident memory
# (measured on a 1.31 B fp32 load: without it the peak holds a whole shard more, ~0.9 GB)
_REMAP_BYTES = 256 * 1024 * 1024


class WeightLoadError(ValueError):
    """Weights do not fit the model: lists missing, unexpected and shape-mismatched keys."""


def normalize_dtype(dtype) -> str:
    """``"float32" | "bfloat16" | "float16"`` for any of their spellings (``paddle.bfloat16``, ``"bf16"``, ...)."""
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
                          source: str = "checkpoint", stored_names: Optional[Mapping[str, str]] = None) -> None:
    """Raise :class:`WeightLoadError` unless ``found`` has exactly the keys and shapes of ``expected``.

    ``stored_names``: the file's key for a model name where they differ (named in shape errors).
    """
    stored_names = stored_names or {}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = sorted(
        f"{key}{' from ' + stored_names[key] if stored_names.get(key, key) != key else ''} "
        f"(checkpoint {list(found[key])}, model {list(expected[key])})"
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


def _assign(param: paddle.Tensor, value: paddle.Tensor) -> None:
    """Make ``value`` (a tensor this loader owns, already of ``param``'s dtype) the parameter's storage.

    An uninitialised (lazily created) CPU parameter takes the buffer as is (no copy); otherwise the values are
    copied into the parameter on its device.
    """
    if value.dtype != param.dtype:
        value = value.astype(param.dtype)
    if not param._is_initialized() and paddle.get_device() == "cpu":
        value._share_buffer_to(param)
    else:
        param.set_value(value)


def load_state_dict_strict(model: paddle.nn.Layer, state_dict: Mapping[str, Union[np.ndarray, paddle.Tensor]],
                           source: str = "state dict") -> paddle.nn.Layer:
    """Copy a Paddle-layout state dict into ``model`` after checking every key and shape (all or nothing)."""
    found = {k: list(v.shape) for k, v in state_dict.items()}
    check_keys_and_shapes(_model_shapes(model), found, source)
    params = model.state_dict()
    for key, value in state_dict.items():
        tensor = value if isinstance(value, paddle.Tensor) else paddle.to_tensor(np.ascontiguousarray(value))
        params[key].set_value(tensor.astype(params[key].dtype))
    return model


# ---------------------------------------------------------------------------------------------- planning a load
@dataclass(frozen=True)
class SourceTensor:
    """Where one model tensor comes from, in PyTorch layout.

    ``rows``: take rows ``[begin, end)`` of the stored tensor (a fused qkv / linear1 split); ``swap_halves``:
    exchange the two halves along the first axis (Black Forest Labs' final norm stores ``[shift, scale]``, the
    model ``[scale, shift]``); ``scale_key``: float8 weight multiplied by this per-tensor scale when upcast.
    ``shape`` is the resulting PyTorch-layout shape (a stored 1x1 convolution may be read as a Linear weight).
    """

    file: Path
    key: str
    shape: Tuple[int, ...]
    dtype: str
    offset: int = 0  # where the stored tensor starts in the file's data (read in file order)
    nbytes: int = 0  # size of the stored tensor
    rows: Optional[Tuple[int, int]] = None
    swap_halves: bool = False
    scale_key: Optional[str] = None


def resolve_weight_files(folder_or_file: Union[str, Path]) -> List[Path]:
    """The safetensors files of a component folder: one file, the shards an ``*.safetensors.index.json``
    lists, ``diffusion_pytorch_model.safetensors``, or the folder's only ``*.safetensors`` file."""
    path = Path(folder_or_file)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: weights must be a .safetensors file")
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no weights at {path}")
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if indexes:
        index = path / INDEX_NAME if (path / INDEX_NAME).is_file() else indexes[0]
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except json.JSONDecodeError as err:
            raise ValueError(f"{index}: invalid JSON ({err})") from err
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: no 'weight_map' in the index")
        files = [path / name for name in sorted(set(weight_map.values()))]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{index} lists shard files that do not exist: {', '.join(absent)}")
        return files
    if (path / WEIGHTS_NAME).is_file():
        return [path / WEIGHTS_NAME]
    candidates = sorted(path.glob("*.safetensors"))
    if len(candidates) == 1:
        return candidates
    raise FileNotFoundError(
        f"{path}: expected {WEIGHTS_NAME}, an index json with its shards, or exactly one .safetensors file "
        f"(found {len(candidates)})"
    )


def read_file_entries(files: Sequence[Path]) -> Tuple[Dict[str, SourceTensor], Dict[str, str]]:
    """``({key: SourceTensor}, merged metadata)`` from the headers of ``files``; a key in two files is an error."""
    entries: Dict[str, SourceTensor] = {}
    metadata: Dict[str, str] = {}
    for file in files:
        header, meta, _ = safetensors_io.read_header(file)
        metadata.update(meta)
        for key, info in header.items():
            if key in entries:
                raise WeightLoadError(f"key {key!r} appears in both {entries[key].file} and {file}")
            begin, end = info["data_offsets"]
            entries[key] = SourceTensor(Path(file), key, tuple(int(d) for d in info["shape"]), info["dtype"],
                                        offset=begin, nbytes=end - begin)
    return entries, metadata


# ---------------------------------------------------------------------------------------------- loading
def _read(get_view, source: SourceTensor) -> Tuple[paddle.Tensor, bool]:
    """The source tensor as Paddle, PyTorch layout; returns ``(tensor, owned)`` (``owned``: not a file view)."""
    tensor, owned = get_view(source.key), False
    if source.rows is not None:
        tensor = tensor[source.rows[0]:source.rows[1]]
    if source.swap_halves:
        half = tensor.shape[0] // 2
        tensor, owned = paddle.concat([tensor[half:], tensor[:half]], axis=0), True
    if tuple(tensor.shape) != source.shape:  # a 1x1 convolution [C, C, 1, 1] read as a Linear weight [C, C]
        tensor = tensor.reshape(source.shape)
    if source.dtype in _FP8:
        tensor, owned = tensor.astype("float32"), True
        if source.scale_key is not None:
            tensor = tensor * get_view(source.scale_key).astype("float32")
    return tensor, owned


def _convert(tensor: paddle.Tensor, owned: bool, dtype, transpose: bool) -> paddle.Tensor:
    """Transpose (2-D) and cast in one pass where Paddle allows; the result never views the file.

    Narrowing (float32 -> bfloat16) casts first so that the transpose moves half the bytes; otherwise the cast
    reads the transposed view directly (one strided pass instead of a transpose copy and a cast copy).
    """
    if paddle.empty([0], dtype=dtype).element_size() < tensor.element_size():
        tensor, owned = tensor.astype(dtype), True
    if transpose and 1 in tensor.shape:  # [1, n] <-> [n, 1] is a reshape (and a transposed view would be contiguous)
        tensor, transpose = tensor.reshape(tensor.shape[::-1]), False
    if transpose:
        tensor = paddle.transpose(tensor, [1, 0])  # a strided view
        return tensor.astype(dtype) if tensor.dtype != dtype else tensor.contiguous()
    if tensor.dtype != dtype:
        tensor, owned = tensor.astype(dtype), True
    return tensor if owned else tensor.clone()


def load_sources(model: paddle.nn.Layer, sources: Mapping[str, SourceTensor], description: str,
                 transposed: Optional[set] = None) -> paddle.nn.Layer:
    """Fill every parameter and buffer of ``model`` from ``sources`` (model name -> :class:`SourceTensor`).

    Args:
        transposed: model names whose source is a PyTorch ``[out, in]`` Linear weight (default: every
            ``nn.Linear`` weight); give ``set()`` for a Paddle-layout file.
    Tied tensors (one tensor under several names, e.g. T5's ``shared`` and ``encoder.embed_tokens``) are filled
    once from whichever of their names the sources have. Nothing is read before every key and shape checked.
    """
    state = model.state_dict()
    transposed = linear_weight_names(model) if transposed is None else transposed
    found = {name: list(src.shape[::-1]) if name in transposed and len(src.shape) == 2 else list(src.shape)
             for name, src in sources.items()}
    aliases: Dict[int, List[str]] = {}
    for name, tensor in state.items():
        aliases.setdefault(id(tensor), []).append(name)
    for names in aliases.values():  # a tied tensor loaded under one name fills the others
        present = [n for n in names if n in found]
        for name in names:
            if present and name not in found:
                found[name] = found[present[0]]
    check_keys_and_shapes(_model_shapes(model), found, source=description,
                          stored_names={name: src.key for name, src in sources.items()})

    by_file: Dict[Path, List[str]] = {}
    for name in sorted(sources, key=lambda n: (str(sources[n].file), sources[n].offset)):
        by_file.setdefault(sources[name].file, []).append(name)
    total_bytes = sum(f.stat().st_size for f in by_file)
    for file in tqdm(list(by_file), desc=f"loading {Path(description.split(' ')[0]).name}", unit="shard",
                     disable=total_bytes < _PROGRESS_BYTES, leave=False):
        for chunk in _chunks(by_file[file], sources):
            with safetensors_io.open_file(file, check_header=False) as handle:  # checked while planning
                # one view per stored key: Paddle refuses two live tensors over the same mapped pointer
                views: Dict[str, paddle.Tensor] = {}

                def get_view(key: str) -> paddle.Tensor:
                    if key not in views:
                        views[key] = handle.get_tensor(key)
                    return views[key]

                for name in chunk:
                    target = state[name]
                    tensor, owned = _read(get_view, sources[name])
                    _assign(target, _convert(tensor, owned, target.dtype, name in transposed and tensor.ndim == 2))
                    del tensor
                views.clear()
    return model


def _chunks(names: List[str], sources: Mapping[str, SourceTensor]) -> List[List[str]]:
    """Split one file's names into runs of at most ``_REMAP_BYTES`` stored bytes (at least one name each)."""
    chunks, size = [[]], 0
    for name in names:
        if chunks[-1] and size + sources[name].nbytes > _REMAP_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append(name)
        size += sources[name].nbytes
    return chunks


def load_weights_into(model: paddle.nn.Layer, folder_or_file: Union[str, Path],
                      layout: Optional[str] = None) -> paddle.nn.Layer:
    """Load a folder or file whose keys are the model's own names, with strict checks.

    Args:
        layout: "diffusers" (PyTorch layout: Linear weights ``[out, in]``, transposed here) or "paddle"; by
            default read from the file metadata (``layout=paddle``), else PyTorch layout.
    """
    files = resolve_weight_files(folder_or_file)
    entries, metadata = read_file_entries(files)
    layout = layout or (PADDLE_LAYOUT if metadata.get("layout") == PADDLE_LAYOUT else "diffusers")
    transposed = None if layout != PADDLE_LAYOUT else set()
    return load_sources(model, entries, f"{folder_or_file} ({layout} layout)", transposed)


def build_uninitialised(build, dtype: str):
    """Call ``build()`` with ``dtype`` as default and no storage or initialisation (weights are loaded next).

    paddlenlp's ``no_init_weights`` (which skips its models' ``init_weights``) is entered only when paddlenlp is
    already imported: the class ``build`` instantiates is imported before this call, so a paddlenlp model implies
    paddlenlp, and the FLUX transformer alone never pays for importing it.
    """
    previous = paddle.get_default_dtype()
    paddle.set_default_dtype(normalize_dtype(dtype))
    skip_paddlenlp_init = contextlib.nullcontext()
    if "paddlenlp" in sys.modules:
        from paddlenlp.transformers.model_utils import no_init_weights

        skip_paddlenlp_init = no_init_weights()
    try:
        with paddle.LazyGuard(), skip_paddlenlp_init:
            model = build()
    finally:
        paddle.set_default_dtype(previous)
    return model


def finish_loading(model: paddle.nn.Layer, source) -> paddle.nn.Layer:
    """Refuse parameters left without weights; switch to inference mode."""
    left = [n for n, p in model.named_parameters() if not p._is_initialized()]
    if left:
        raise WeightLoadError(f"{source}: parameters left without weights: {_format_names(left)}")
    model.eval()
    return model


def load_flux_transformer(folder_or_file: Union[str, Path], dtype: str = "float32") -> FluxTransformer2DModel:
    """Build a :class:`FluxTransformer2DModel` and load its safetensors weights (strict).

    ``folder_or_file`` is a diffusers ``transformer/`` folder (sharded or single file, ``config.json`` inside), one
    diffusers-layout ``.safetensors`` file with ``config.json`` beside it, or a Black Forest Labs / ComfyUI single
    file (``flux1-dev.safetensors``; config from its keys, or from a ``config.json`` beside it;
    see ``models/single_file.py``). Weights may be fp32, bf16, fp16 or fp8 and are cast to ``dtype``.
    """
    dtype = normalize_dtype(dtype)
    path = Path(folder_or_file)
    config_path = (path if path.is_dir() else path.parent) / CONFIG_NAME
    if path.is_file() and path.suffix == ".safetensors":
        from . import single_file

        if single_file.is_bfl_transformer(path):
            return single_file.load_bfl_transformer(path, dtype, config_path if config_path.is_file() else None)
    if not config_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} at {config_path}")
    config = json.loads(config_path.read_text())
    resolve_weight_files(path)  # fail on absent files before building the model
    model = build_uninitialised(lambda: FluxTransformer2DModel.from_config(config), dtype)
    load_weights_into(model, path)
    return finish_loading(model, path)


# ---------------------------------------------------------------------------------------------- saving
def save_paddle_safetensors(model: paddle.nn.Layer, path: Union[str, Path], save_config: bool = True) -> Path:
    """Write the model's weights in Paddle layout to ``path`` (a ``.safetensors`` file, written atomically).

    bfloat16 and float16 weights are written as they are. With ``save_config`` and a model that has a config,
    ``config.json`` is written beside it, so that :func:`load_flux_transformer` reads the folder back.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: the file name must end in .safetensors")
    safetensors_io.save_file(dict(model.state_dict()), path, metadata={"format": "pd", "layout": PADDLE_LAYOUT})
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
