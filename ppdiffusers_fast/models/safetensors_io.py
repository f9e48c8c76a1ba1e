"""The project's one home for safetensors files: header checks, reading, atomic writing.

Reading and writing go through the ``safetensors`` package (memory-mapped ``safe_open``; nothing is unpickled).
Its Paddle API maps a tensor without copying and knows ``BF16`` and ``F8_E4M3``; its numpy API cannot
represent bfloat16, so :func:`load_file` widens bfloat16 / float8 to float32 (exact).

Format: 8-byte little-endian header length N, N bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [b, e]},
"__metadata__": {str: str}}``, then the raw little-endian tensor bytes (offsets relative to the data start).

:func:`read_header` checks the header before any tensor is read, and every error names the file and the key.
The package refuses the same corrupt files, but its messages name neither the file nor, for size and range
errors, the tensor (``tests/models/test_safetensors_io.py`` writes each corrupt case and checks both).
"""
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple, Union

import numpy as np
import paddle
from safetensors import SafetensorError, safe_open
from safetensors.paddle import save_file as _paddle_save_file

__all__ = ["SafetensorsFileError", "DTYPE_BYTES", "read_header", "open_file", "load_file", "save_file",
           "float32_to_bf16_bits"]

# safetensors dtype name -> bytes per element (the dtypes Paddle can hold)
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}
_WIDENED = ("BF16", "F8_E4M3", "F8_E5M2")  # numpy has no such dtype: load_file returns float32
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsFileError(ValueError):
    """A file is not a valid safetensors file; the message names the file and, where one is at fault, the key."""


def _check_entry(path: Path, name, info) -> Tuple[int, int]:
    """Validate one header entry; return its ``(begin, end)`` data offsets."""
    if not isinstance(name, str):
        raise SafetensorsFileError(f"{path}: tensor name {name!r} is not a string")
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise SafetensorsFileError(f"{path}: tensor {name!r}: header entry must be an object with dtype, shape "
                                   f"and data_offsets, got {info!r}"[:300])
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in DTYPE_BYTES:
        raise SafetensorsFileError(f"{path}: tensor {name!r}: unsupported dtype {dtype!r} "
                                   f"(supported: {', '.join(DTYPE_BYTES)})")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise SafetensorsFileError(f"{path}: tensor {name!r}: shape must be a list of non-negative integers, "
                                   f"got {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
        raise SafetensorsFileError(f"{path}: tensor {name!r}: data_offsets must be [begin, end] with "
                                   f"0 <= begin <= end, got {offsets!r}")
    expected = int(np.prod(shape, dtype=np.int64)) * DTYPE_BYTES[dtype]
    if offsets[1] - offsets[0] != expected:
        raise SafetensorsFileError(f"{path}: tensor {name!r}: {offsets[1] - offsets[0]} bytes at data_offsets "
                                   f"{offsets} but {dtype} x {shape} needs {expected}")
    return offsets[0], offsets[1]


def read_header(path) -> Tuple[Dict[str, dict], Dict[str, str], int]:
    """Read and check a safetensors header without reading any tensor.

    Checks: the header is a JSON object; each entry has a known dtype, a shape and data offsets sized for
    dtype x shape; the tensors' byte ranges lie inside the file, in order, without gaps or overlaps, and cover
    the data exactly (a truncated download fails here). Raises :class:`SafetensorsFileError` naming the file
    and the key.

    Returns:
        ``(tensors, metadata, data_start)`` with ``tensors[name] = {"dtype", "shape", "data_offsets"}``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no safetensors file at {path}")
    file_size = path.stat().st_size
    with open(path, "rb") as handle:
        raw_len = handle.read(8)
        if len(raw_len) != 8:
            raise SafetensorsFileError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > min(_MAX_HEADER_BYTES, file_size - 8):
            raise SafetensorsFileError(f"{path}: not a safetensors file (header length {header_len} exceeds the "
                                       f"file of {file_size} bytes)")
        try:
            header = json.loads(handle.read(header_len).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise SafetensorsFileError(f"{path}: corrupt safetensors header ({err})") from err
    if not isinstance(header, dict):
        raise SafetensorsFileError(f"{path}: the safetensors header must be a JSON object, got "
                                   f"{type(header).__name__}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsFileError(f"{path}: __metadata__ must be an object of strings")
    data_start = 8 + header_len
    data_size = file_size - data_start
    spans = sorted((_check_entry(path, name, info), name) for name, info in header.items())
    position, previous = 0, None
    for (begin, end), name in spans:
        if begin != position:
            what = "overlaps" if begin < position else "leaves a gap after"
            raise SafetensorsFileError(f"{path}: tensor {name!r} at data_offsets [{begin}, {end}] {what} "
                                       f"{previous!r} (ends at {position})" if previous else
                                       f"{path}: tensor {name!r}: data must start at offset 0, got {begin}")
        if end > data_size:
            raise SafetensorsFileError(f"{path}: tensor {name!r} lies outside the file (ends at byte {end} of "
                                       f"{data_size} data bytes; truncated download?)")
        position, previous = end, name
    if position != data_size:
        raise SafetensorsFileError(f"{path}: {data_size - position} bytes after the last tensor {previous!r} "
                                   f"(the file is not a single safetensors file)")
    return header, metadata, data_start


def open_file(path, framework: str = "paddle", check_header: bool = True):
    """``safe_open(path, framework)`` after :func:`read_header`'s checks; use it as a context manager.

    With ``framework="paddle"``, ``handle.get_tensor(name)`` returns a Paddle tensor that views the memory-mapped
    file (no copy; bfloat16 and float8 kept): copy (cast, transpose, ``clone``) before the handle closes if the
    values must outlive it. ``framework="np"`` copies and has no bfloat16. ``handle.get_slice(name)[rows]`` reads
    only the rows asked for. ``check_header=False`` skips the checks for a file whose header was just checked.
    """
    if check_header:
        read_header(path)
    try:
        return safe_open(str(path), framework=framework)
    except SafetensorError as err:
        raise SafetensorsFileError(f"{path}: {err}") from err


def load_file(path) -> Dict[str, np.ndarray]:
    """Every tensor of a safetensors file as numpy; bfloat16 and float8 are widened to float32 (exact)."""
    header, _, _ = read_header(path)
    arrays = {}
    with open_file(path) as handle:
        for name, info in header.items():
            tensor = handle.get_tensor(name)
            if info["dtype"] in _WIDENED:
                tensor = tensor.astype("float32")
            arrays[name] = np.array(tensor.numpy(), copy=True)  # own the memory: the mapping closes below
    return arrays


def float32_to_bf16_bits(array: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (round to nearest even) and return the 16-bit patterns as uint16."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + 0x7FFF
    return ((bits + rounding) >> 16).astype(np.uint16)


_PADDLE_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
TensorLike = Union[np.ndarray, paddle.Tensor, Tuple[np.ndarray, str]]


def _as_paddle(name: str, value: TensorLike) -> paddle.Tensor:
    """A contiguous CPU Paddle tensor for ``value``; ``(uint16 bits, "BF16")`` pairs become bfloat16 exactly."""
    if isinstance(value, tuple):
        array, dtype_name = value
        if dtype_name == "BF16":  # bf16 bit patterns: widen to float32 (exact) and narrow back (exact)
            bits = np.asarray(array, dtype=np.uint16).astype(np.uint32) << 16
            return paddle.to_tensor(bits.view(np.float32)).astype("bfloat16")
        if dtype_name not in _PADDLE_DTYPE_NAMES:
            raise ValueError(f"tensor {name!r}: cannot write dtype {dtype_name!r}")
        return paddle.to_tensor(np.ascontiguousarray(array, dtype=_PADDLE_DTYPE_NAMES[dtype_name]))
    if isinstance(value, paddle.Tensor):
        return value.detach().cpu().contiguous()
    return paddle.to_tensor(np.ascontiguousarray(value))


def save_file(tensors: Mapping[str, TensorLike], path, metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write tensors atomically (temporary file in the same folder, then rename); returns the path.

    Values are numpy arrays, Paddle tensors (bfloat16 kept), or ``(array, safetensors dtype)`` pairs where
    ``(uint16 bit patterns, "BF16")`` writes bfloat16. Metadata values are written as strings.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    converted = {name: _as_paddle(name, value) for name, value in tensors.items()}
    fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=str(path.parent))
    os.close(fd)
    try:
        _paddle_save_file(converted, tmp_name,
                          metadata={str(k): str(v) for k, v in metadata.items()} if metadata else None)
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.remove(tmp_name)
        raise
    return path
