"""Reading pickled weight files (PyTorch ``.pth``, Paddle ``.pdparams``) without importing torch or paddle.

Unpickling can run arbitrary code, so the callers refuse unless the user passes an explicit trust flag.
Even then the unpicklers here resolve only an allow-list of globals (OrderedDict, numpy array
reconstruction with non-object dtypes, torch's tensor/storage rebuild markers, which are mapped to
plain numpy functions defined below); any other global raises ``pickle.UnpicklingError`` naming it.

Supported containers:
* PyTorch zip format (torch >= 1.6): ``<root>/data.pkl`` + ``<root>/data/<key>`` raw storages;
* PyTorch legacy format: magic number, protocol, system info, the pickle, storage keys, then each
  storage as an int64 element count followed by its raw bytes;
* Paddle ``paddle.save`` files: a pickle of ``{name: numpy array}`` (optionally ``(name, array)`` tuples).
"""
import collections
import io
import pickle
import struct
import zipfile

import numpy as np

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
    from numpy._core.multiarray import scalar as _np_scalar
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct
    from numpy.core.multiarray import scalar as _np_scalar

TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
TORCH_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_, "UntypedStorage": np.uint8,
}


def _safe_dtype(spec, align=False, copy=False):
    dtype = np.dtype(spec, align, copy)
    if dtype.hasobject:
        raise pickle.UnpicklingError(f"refusing a numpy object dtype ({dtype}) in a weight file")
    return dtype


def _safe_reconstruct(cls, shape, dtype_code):
    if cls is not np.ndarray:
        raise pickle.UnpicklingError(f"refusing to reconstruct {cls!r}; only numpy.ndarray is allowed")
    return _np_reconstruct(cls, shape, dtype_code)


def _safe_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError("refusing a numpy object scalar in a weight file")
    return _np_scalar(dtype, data)


NUMPY_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "tuple"): tuple,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _safe_dtype,
    ("numpy.core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy.core.multiarray", "scalar"): _safe_scalar,
    ("numpy._core.multiarray", "scalar"): _safe_scalar,
}


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only the globals in ``allowed`` ({(module, name): object})."""

    def __init__(self, file, allowed, persistent_load=None):
        super().__init__(file)
        self._allowed = allowed
        self._persistent_load = persistent_load

    def find_class(self, module, name):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"global '{module}.{name}' is not allowed in a weight file (allowed: "
                f"{sorted(f'{m}.{n}' for m, n in self._allowed)})") from None

    def persistent_load(self, pid):
        if self._persistent_load is None:
            raise pickle.UnpicklingError("persistent ids are not expected in this file")
        return self._persistent_load(pid)


class _StorageType:
    """Stands for ``torch.FloatStorage`` etc.: only its numpy dtype is used."""

    def __init__(self, name):
        self.name = name
        self.dtype = TORCH_STORAGE_DTYPES[name]


class _Storage:
    """A flat storage; ``data`` is filled when its bytes are read (immediately for zip files)."""

    def __init__(self, dtype, numel):
        self.dtype = dtype
        self.numel = numel
        self.data = None

    def set_bytes(self, raw, big_endian=False):
        if self.dtype == "bfloat16":
            bits = np.frombuffer(raw, dtype=">u2" if big_endian else "<u2").astype(np.uint32) << 16
            self.data = bits.view(np.float32)
        else:
            dtype = np.dtype(self.dtype).newbyteorder(">" if big_endian else "<")
            self.data = np.frombuffer(raw, dtype=dtype).astype(np.dtype(self.dtype).newbyteorder("="))
        if self.data.size != self.numel:
            raise ValueError(f"storage holds {self.data.size} elements, expected {self.numel}")


class _DeferredTensor:
    """A tensor view of a storage whose bytes are not read yet (legacy torch files)."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def materialize(self):
        data = self.storage.data
        if data is None:
            raise ValueError("a tensor refers to a storage that the file does not contain")
        if not self.size:
            return np.array(data[self.offset])
        itemsize = data.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(data[self.offset:], shape=self.size,
                                               strides=[s * itemsize for s in self.stride])
        return np.array(view)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    return _DeferredTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *unused):
    return data


def _torch_globals():
    allowed = dict(NUMPY_GLOBALS)
    allowed[("torch._utils", "_rebuild_tensor_v2")] = _rebuild_tensor
    allowed[("torch._utils", "_rebuild_tensor")] = _rebuild_tensor
    allowed[("torch._utils", "_rebuild_parameter")] = _rebuild_parameter
    for name in TORCH_STORAGE_DTYPES:
        allowed[("torch", name)] = _StorageType(name)
        allowed[("torch.storage", name)] = _StorageType(name)
    return allowed


def _materialize(obj):
    if isinstance(obj, _DeferredTensor):
        return obj.materialize()
    if isinstance(obj, dict):
        return collections.OrderedDict((k, _materialize(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialize(v) for v in obj)
    return obj


def _check_storage_pid(pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
        raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")


def _load_torch_zip(path):
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise ValueError(f"{path}: expected one '<root>/data.pkl' in the zip archive, found {pickles}")
        root = pickles[0][: -len("data.pkl")]
        big_endian = False
        if root + "byteorder" in names:
            big_endian = archive.read(root + "byteorder").decode().strip() == "big"
        storages = {}

        def persistent_load(pid):
            _check_storage_pid(pid)
            storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
            if key not in storages:
                storage = _Storage(storage_type.dtype, numel)
                storage.set_bytes(archive.read(f"{root}data/{key}"), big_endian)
                storages[key] = storage
            return storages[key]

        result = RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), _torch_globals(), persistent_load).load()
    return _materialize(result)


def _load_torch_legacy(path):
    allowed = _torch_globals()
    with open(path, "rb") as handle:
        magic = RestrictedUnpickler(handle, allowed).load()
        if magic != TORCH_LEGACY_MAGIC:
            raise ValueError(f"{path}: not a PyTorch file (no zip archive and no legacy magic number)")
        RestrictedUnpickler(handle, allowed).load()  # protocol version
        sys_info = RestrictedUnpickler(handle, allowed).load()
        if not sys_info.get("little_endian", True):
            raise ValueError(f"{path}: big-endian legacy PyTorch files are not supported")
        storages = {}

        def persistent_load(pid):
            _check_storage_pid(pid)
            storage_type, root_key, numel, view = pid[1], str(pid[2]), int(pid[4]), pid[5]
            if view is not None:
                raise pickle.UnpicklingError(f"{path}: storage views are not supported")
            storages.setdefault(root_key, _Storage(storage_type.dtype, numel))
            return storages[root_key]

        result = RestrictedUnpickler(handle, allowed, persistent_load).load()
        keys = RestrictedUnpickler(handle, allowed).load()
        for key in keys:
            storage = storages[str(key)]
            (count,) = struct.unpack("<q", handle.read(8))
            itemsize = 2 if storage.dtype == "bfloat16" else np.dtype(storage.dtype).itemsize
            storage.set_bytes(handle.read(count * itemsize))
    return _materialize(result)


def load_torch_checkpoint(path):
    """Arrays of a PyTorch ``.pth`` file (zip or legacy format), as nested dicts of numpy arrays."""
    if zipfile.is_zipfile(path):
        return _load_torch_zip(path)
    return _load_torch_legacy(path)


def load_paddle_checkpoint(path):
    """Arrays of a ``paddle.save`` file; ``(name, array)`` tuple values are unwrapped."""
    with open(path, "rb") as handle:
        result = RestrictedUnpickler(handle, NUMPY_GLOBALS).load()
    if not isinstance(result, dict):
        raise ValueError(f"{path}: expected a dict of arrays, got {type(result).__name__}")
    arrays = collections.OrderedDict()
    for key, value in result.items():
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], np.ndarray):
            value = value[1]
        if isinstance(value, np.ndarray):
            arrays[key] = value
    return arrays
