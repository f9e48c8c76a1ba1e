"""Safetensors header checks: each corrupt file is refused before any tensor is read, naming the file and the key.

Every case is also opened with the ``safetensors`` package itself, to record what it refuses on its own (it
refuses all of these, but its messages name neither the file nor, for size and range errors, the tensor).
"""
import json
import struct

import numpy as np
import paddle
import pytest
from safetensors import SafetensorError, safe_open

from ppdiffusers_fast.models import safetensors_io
from ppdiffusers_fast.models.lora_io import read_safetensors
from ppdiffusers_fast.models.safetensors_io import SafetensorsFileError


def _write(path, header, data_bytes):
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data_bytes)
    return path


def _entry(begin, end, shape=(2,), dtype="F32"):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


CORRUPT = {
    # name: (header, data bytes, words our message must contain)
    "negative offset": ({"w": _entry(-8, 0)}, 8, ["'w'", "data_offsets"]),
    "begin after end": ({"w": _entry(8, 0)}, 8, ["'w'", "data_offsets"]),
    "overlap": ({"a": _entry(0, 8), "b": _entry(4, 12)}, 12, ["'b'", "overlaps", "'a'"]),
    "gap": ({"a": _entry(0, 8), "b": _entry(16, 24)}, 24, ["'b'", "gap", "'a'"]),
    "size not dtype x shape": ({"w": _entry(0, 8, shape=(3,))}, 8, ["'w'", "F32 x [3] needs 12"]),
    "outside the file": ({"w": _entry(0, 128, shape=(32,))}, 8, ["'w'", "outside the file"]),
    "header is a list": ([1, 2], 8, ["must be a JSON object", "list"]),
    "entry is not an object": ({"w": 5}, 8, ["'w'", "header entry must be an object"]),
    "unknown dtype": ({"w": _entry(0, 8, dtype="F99")}, 8, ["'w'", "unsupported dtype 'F99'"]),
    "trailing bytes": ({"w": _entry(0, 8)}, 16, ["8 bytes after the last tensor 'w'"]),
    "metadata not strings": ({"__metadata__": {"a": 1}, "w": _entry(0, 8)}, 8, ["__metadata__"]),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_header_is_refused_naming_file_and_key(tmp_path, case):
    header, data_bytes, words = CORRUPT[case]
    path = _write(tmp_path / "bad.safetensors", header, data_bytes)
    with pytest.raises(SafetensorError) as theirs:  # the package refuses it too ...
        with safe_open(str(path), framework="np") as handle:
            [handle.get_tensor(k) for k in handle.keys()]
    assert str(path) not in str(theirs.value)  # ... without naming the file
    with pytest.raises(SafetensorsFileError) as ours:
        safetensors_io.read_header(path)
    message = str(ours.value)
    assert message.startswith(str(path)), message
    for word in words:
        assert word in message, (word, message)
    for reader in (safetensors_io.load_file, read_safetensors):  # every reader checks first
        with pytest.raises(SafetensorsFileError, match="bad.safetensors"):
            reader(path)


def test_valid_file_with_keys_in_any_order_is_read(tmp_path):
    header = {"b": _entry(0, 8), "a": _entry(8, 16)}  # JSON order differs from data order: valid
    path = _write(tmp_path / "ok.safetensors", header, 16)
    tensors, _, data_start = safetensors_io.read_header(path)
    assert set(tensors) == {"a", "b"} and data_start == path.stat().st_size - 16
    assert {k: v.tolist() for k, v in safetensors_io.load_file(path).items()} == {"a": [0.0, 0.0], "b": [0.0, 0.0]}


def test_short_file_and_huge_header_length(tmp_path):
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\1\2\3")
    with pytest.raises(SafetensorsFileError, match="shorter than 8 bytes"):
        safetensors_io.read_header(short)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 10 ** 12) + b"{}")
    with pytest.raises(SafetensorsFileError, match="header length 1000000000000 exceeds"):
        safetensors_io.read_header(huge)


def test_save_and_load_dtypes_round_trip(tmp_path):
    """numpy, Paddle (bfloat16 kept) and bf16 bit-pattern inputs; bf16 widened to float32 exactly on load."""
    values = np.array([1.0, -2.0, 0.5, 1.0 + 2.0 ** -7], dtype=np.float32)  # exact in bfloat16
    path = safetensors_io.save_file({
        "np32": values, "i64": np.arange(3, dtype=np.int64),
        "pd_bf16": paddle.to_tensor(values).astype("bfloat16"),
        "bits": (safetensors_io.float32_to_bf16_bits(values), "BF16"),
    }, tmp_path / "sub" / "x.safetensors", metadata={"k": 3})
    header, metadata, _ = safetensors_io.read_header(path)
    assert {k: v["dtype"] for k, v in header.items()} == {"np32": "F32", "i64": "I64", "pd_bf16": "BF16",
                                                          "bits": "BF16"}
    assert metadata == {"k": "3"}
    loaded = safetensors_io.load_file(path)
    for key in ("np32", "pd_bf16", "bits"):
        assert loaded[key].dtype == np.float32 and np.array_equal(loaded[key], values), key
    assert loaded["i64"].tolist() == [0, 1, 2]
    assert not list(path.parent.glob("*.tmp"))


def test_float8_is_widened_exactly(tmp_path):
    values = np.array([0.0, 1.0, -1.5, 448.0, 2.0 ** -9, 0.875], dtype=np.float32)  # exact in e4m3fn
    path = safetensors_io.save_file({"w": paddle.to_tensor(values).astype(paddle.float8_e4m3fn)},
                                    tmp_path / "f8.safetensors")
    assert safetensors_io.read_header(path)[0]["w"]["dtype"] == "F8_E4M3"
    assert np.array_equal(safetensors_io.load_file(path)["w"], values)
