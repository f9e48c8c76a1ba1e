"""One-time conversion of the published FID InceptionV3 weights to safetensors (pytorch-fid key names).

Sources:
* pytorch-fid ``pt_inception-2015-12-05-6726825d.pth`` (PyTorch pickle; keys ``Conv2d_1a_3x3.conv.weight``,
  ``Mixed_5b.branch_pool.bn.running_mean``, ..., plus ``fc.*``);
* PaddleMIX ``pp_inception-2015-12-05-6726825d.pdparams`` (Paddle pickle; paddle.vision layout
  ``inception_stem.conv_1a_3x3.0.weight``, ``inception_block_list.0.branch_pool_conv.1._mean``, ...);
* a ``.safetensors`` file in either layout (read without pickle).

Pickled files are read only with ``trust_pickle=True`` (the user vouches for the file) and then with a
restricted unpickler (``restricted_pickle.py``). The output holds float32 arrays named as pytorch-fid,
without the classifier (``fc``), and records the source file's SHA-256 in its metadata.
"""
import hashlib
import os
import re

import numpy as np

from .inception import check_reference_state_dict, is_ignored_key, reference_shapes

# Identifiers of the published files: the hash prefix in the pytorch-fid file name, and the MD5 that
# PaddleMIX checks after download.
KNOWN_SOURCES = {
    "pytorch-fid pt_inception-2015-12-05": ("sha256-prefix", "6726825d"),
    "PaddleMIX pp_inception-2015-12-05": ("md5", "8e2ae24c34c5c8b81d45167bb9361f4c"),
}
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".pdparams", ".pkl")
# paddle.vision stem names -> pytorch-fid names; paddle.vision block list index -> pytorch-fid block names.
STEM_NAMES = {"conv_1a_3x3": "Conv2d_1a_3x3", "conv_2a_3x3": "Conv2d_2a_3x3", "conv_2b_3x3": "Conv2d_2b_3x3",
              "conv_3b_1x1": "Conv2d_3b_1x1", "conv_4a_3x3": "Conv2d_4a_3x3"}
BLOCK_NAMES = ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
               "Mixed_7a", "Mixed_7b", "Mixed_7c"]
PADDLE_SEQUENTIAL_PARTS = {"0.weight": "conv.weight", "1.weight": "bn.weight", "1.bias": "bn.bias",
                           "1._mean": "bn.running_mean", "1._variance": "bn.running_var"}
_STEM_RE = re.compile(r"^inception_stem\.(conv_\w+?)\.(\d\.\w+)$")
_BLOCK_RE = re.compile(r"^inception_block_list\.(\d+)\.(\w+?)\.(\d\.\w+)$")


def file_digests(path, chunk_size=1 << 20):
    """``(sha256, md5)`` hex digests of a file, read in chunks."""
    sha256, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            sha256.update(chunk)
            md5.update(chunk)
    return sha256.hexdigest(), md5.hexdigest()


def recognize_source(sha256, md5):
    """Name of the published file these digests identify, or ``""``."""
    for name, (kind, value) in KNOWN_SOURCES.items():
        if (kind == "md5" and md5 == value) or (kind == "sha256-prefix" and sha256.startswith(value)):
            return name
    return ""


def canonical_key(name):
    """Any supported layout's key -> pytorch-fid key (unchanged when already canonical)."""
    match = _STEM_RE.match(name)
    if match and match.group(1) in STEM_NAMES and match.group(2) in PADDLE_SEQUENTIAL_PARTS:
        return f"{STEM_NAMES[match.group(1)]}.{PADDLE_SEQUENTIAL_PARTS[match.group(2)]}"
    match = _BLOCK_RE.match(name)
    if match and int(match.group(1)) < len(BLOCK_NAMES) and match.group(3) in PADDLE_SEQUENTIAL_PARTS:
        branch = "branch_pool" if match.group(2) == "branch_pool_conv" else match.group(2)
        return f"{BLOCK_NAMES[int(match.group(1))]}.{branch}.{PADDLE_SEQUENTIAL_PARTS[match.group(3)]}"
    if name.endswith(".bn._mean"):
        return name[: -len("_mean")] + "running_mean"
    if name.endswith(".bn._variance"):
        return name[: -len("_variance")] + "running_var"
    return name


def read_checkpoint(path, trust_pickle=False):
    """``{key: numpy array}`` from a .safetensors, .pth or .pdparams file (pickles need ``trust_pickle``)."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        from ..models.safetensors_io import load_file

        return load_file(path)
    if not path.endswith(PICKLE_SUFFIXES):
        raise ValueError(f"{path}: unsupported weight file type (expected one of .safetensors {PICKLE_SUFFIXES})")
    if not trust_pickle:
        raise PermissionError(
            f"{path} is a pickle file; reading it can execute code. Convert it only if you trust its source "
            "(e.g. you downloaded the published pytorch-fid or PaddleMIX file yourself): pass --trust_pickle "
            "(trust_pickle=True). Even then only an allow-list of globals is resolved.")
    from .restricted_pickle import load_paddle_checkpoint, load_torch_checkpoint

    if path.endswith(".pdparams"):
        return dict(load_paddle_checkpoint(path))
    state = load_torch_checkpoint(path)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return {k: v for k, v in state.items() if isinstance(v, np.ndarray)}


def canonical_state_dict(state_dict):
    """Rename keys to pytorch-fid names, drop the unused ones, check against the architecture, cast to float32.

    Returns ``(arrays, dropped_keys)``.
    """
    renamed = {}
    for key, value in state_dict.items():
        new_key = canonical_key(key)
        if new_key in renamed:
            raise KeyError(f"two keys map to {new_key!r} (one of them is {key!r})")
        renamed[new_key] = value
    dropped = sorted(k for k in renamed if is_ignored_key(k))
    used = check_reference_state_dict(renamed, reference_shapes())
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sorted(used.items())}, dropped


def convert_inception_weights(source, destination, trust_pickle=False):
    """Convert ``source`` to a pytorch-fid-named float32 safetensors file at ``destination`` (atomic write).

    Returns a report dict: ``source``, ``source_sha256``, ``source_md5``, ``recognized`` (name of the published
    file, or ""), ``num_tensors``, ``dropped_keys``, ``destination``, ``destination_sha256``.
    """
    from ..models.safetensors_io import save_file

    source, destination = str(source), str(destination)
    if not destination.endswith(".safetensors"):
        raise ValueError(f"the output must be a .safetensors file, got {destination}")
    sha256, md5 = file_digests(source)
    arrays, dropped = canonical_state_dict(read_checkpoint(source, trust_pickle=trust_pickle))
    recognized = recognize_source(sha256, md5)
    metadata = {"format": "pt", "layout": "pytorch-fid InceptionV3 pool3", "source_file": os.path.basename(source),
                "source_sha256": sha256, "source_md5": md5, "recognized": recognized}
    save_file(arrays, destination, metadata=metadata)  # atomic
    return {"source": source, "source_sha256": sha256, "source_md5": md5, "recognized": recognized,
            "num_tensors": len(arrays), "dropped_keys": dropped, "destination": destination,
            "destination_sha256": file_digests(destination)[0]}
