"""Minimal, framework-free reader and writer of the safetensors format (numpy only, bfloat16 included).

Format: 8-byte little-endian header length N, N bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [b, e]},
"__metadata__": {str: str}}``, then the raw little-endian tensor bytes (offsets relative to the data start).
The ``safetensors`` package's numpy API cannot return bfloat16; here bfloat16 is widened to float32 exactly
(the bf16 bits are the upper half of the float32 bits). Nothing is unpickled.
"""
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

_NUMPY_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_header(path) -> Tuple[Dict[str, dict], Dict[str, str], int]:
    """Return ``(tensors, metadata, data_start)``: ``tensors[name] = {"dtype", "shape", "data_offsets"}``."""
    path = Path(path)
    file_size = path.stat().st_size
    with open(path, "rb") as handle:
        raw_len = handle.read(8)
        if len(raw_len) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > min(_MAX_HEADER_BYTES, file_size - 8):
            raise ValueError(f"{path}: not a safetensors file (header length {header_len} exceeds the file)")
        try:
            header = json.loads(handle.read(header_len).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: corrupt safetensors header ({err})") from err
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    for name, info in header.items():
        begin, end = info["data_offsets"]
        if data_start + end > file_size or begin > end:
            raise ValueError(f"{path}: tensor {name!r} lies outside the file (truncated download?)")
    return header, metadata, data_start


def read_tensor(path, info: dict, data_start: int, mmap: Optional[np.memmap] = None) -> np.ndarray:
    """Read one tensor described by its header entry; BF16 is returned as float32 (exact)."""
    begin, end = info["data_offsets"]
    buffer = mmap if mmap is not None else np.memmap(path, dtype=np.uint8, mode="r")
    raw = buffer[data_start + begin: data_start + end]
    dtype_name = info["dtype"]
    shape = [int(d) for d in info["shape"]]
    if dtype_name == "BF16":
        bits = np.frombuffer(raw.tobytes(), dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    if dtype_name not in _NUMPY_DTYPES:
        raise ValueError(f"{path}: unsupported safetensors dtype {dtype_name}")
    dtype = np.dtype(_NUMPY_DTYPES[dtype_name]).newbyteorder("<")
    return np.frombuffer(raw.tobytes(), dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=False)


def load_file(path) -> Dict[str, np.ndarray]:
    """Read every tensor of a safetensors file into numpy (BF16 widened to float32)."""
    header, _, data_start = read_header(path)
    mmap = np.memmap(path, dtype=np.uint8, mode="r")
    return {name: read_tensor(path, info, data_start, mmap) for name, info in header.items()}


def float32_to_bf16_bits(array: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (round to nearest even) and return the 16-bit patterns as uint16."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + 0x7FFF
    return ((bits + rounding) >> 16).astype(np.uint16)


def save_file(tensors: Dict[str, Tuple[np.ndarray, str]], path, metadata: Optional[Dict[str, str]] = None) -> None:
    """Write ``{name: (array, dtype_name)}`` atomically (temporary file, then rename).

    ``dtype_name`` is a safetensors dtype ("F32", "BF16", ...); for "BF16" pass the uint16 bit patterns.
    """
    path = Path(path)
    header: Dict[str, dict] = {}
    offset = 0
    blobs = []
    for name in sorted(tensors):
        array, dtype_name = tensors[name]
        blob = np.ascontiguousarray(array).astype(np.asarray(array).dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": dtype_name, "shape": list(np.shape(array)), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(struct.pack("<Q", len(header_bytes)))
            handle.write(header_bytes)
            for blob in blobs:
                handle.write(blob)
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.remove(tmp_name)
        raise
