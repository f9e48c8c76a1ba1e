"""Identities of models, weights and image sets for the evaluation protocol.

* ``sha256_file``: full SHA-256 of a file (LoRA, Inception weights), memoised on (path, size, mtime) in an
  optional JSON cache so reruns do not re-read large files.
* ``folder_fingerprint``: SHA-256 over a folder's files (sorted relative paths). Files up to
  ``full_hash_limit`` bytes contribute their full SHA-256; larger files contribute their size and, for
  ``.safetensors``, the SHA-256 of their header (every tensor's name, dtype, shape and offsets), which is
  fast on a 24 GB FLUX checkpoint yet changes with any change of layout. ``full_hash_limit=None`` hashes
  every byte. The mode is part of the returned description.
* ``image_set_fingerprint``: SHA-256 over the names, sizes and modification times of an image set's files
  (a cache key: a regenerated or replaced image invalidates cached features).
"""
import hashlib
import json
import os
import struct
import tempfile

DEFAULT_FULL_HASH_LIMIT = 64 * 1024 * 1024


class HashCache:
    """``{absolute path: [size, mtime_ns, sha256]}`` kept in a JSON file (or in memory when ``path`` is None)."""

    def __init__(self, path=None):
        self.path = path
        self.entries = {}
        if path and os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                self.entries = json.load(handle)

    def lookup(self, file_path):
        stat = os.stat(file_path)
        entry = self.entries.get(os.path.abspath(file_path))
        if entry and entry[0] == stat.st_size and entry[1] == stat.st_mtime_ns:
            return entry[2]
        return None

    def store(self, file_path, digest):
        stat = os.stat(file_path)
        self.entries[os.path.abspath(file_path)] = [stat.st_size, stat.st_mtime_ns, digest]
        if self.path:
            folder = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".", suffix=".json")
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(self.entries, handle, indent=1, sort_keys=True)
            os.replace(tmp, self.path)


def sha256_file(path, cache=None, chunk_size=1 << 20):
    """Full SHA-256 hex digest of ``path`` (memoised in ``cache`` when given)."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"file not found: {path}")
    if cache is not None:
        cached = cache.lookup(path)
        if cached:
            return cached
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    result = digest.hexdigest()
    if cache is not None:
        cache.store(path, result)
    return result


def safetensors_header_sha256(path):
    """SHA-256 of a safetensors file's 8-byte length prefix and JSON header."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{path}: too short for a safetensors file")
        (length,) = struct.unpack("<Q", prefix)
        header = handle.read(length)
    if len(header) != length:
        raise ValueError(f"{path}: truncated safetensors header")
    return hashlib.sha256(prefix + header).hexdigest()


def folder_fingerprint(folder, full_hash_limit=DEFAULT_FULL_HASH_LIMIT, cache=None):
    """``{"sha256": ..., "mode": ..., "num_files": n, "total_bytes": n}`` for a model folder or a single file."""
    folder = str(folder)
    if os.path.isfile(folder):
        return {"sha256": sha256_file(folder, cache), "mode": "file sha256", "num_files": 1,
                "total_bytes": os.path.getsize(folder)}
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"model folder not found: {folder}")
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files.extend(os.path.join(root, n) for n in names if not n.startswith("."))
    digest = hashlib.sha256()
    total = 0
    for path in sorted(files, key=lambda p: os.path.relpath(p, folder)):
        size = os.path.getsize(path)
        total += size
        relative = os.path.relpath(path, folder).replace(os.sep, "/")
        if full_hash_limit is None or size <= full_hash_limit:
            part = "sha256:" + sha256_file(path, cache)
        elif path.endswith(".safetensors"):
            part = "safetensors-header-sha256:" + safetensors_header_sha256(path)
        else:
            part = "size-only"
        digest.update(f"{relative}\t{size}\t{part}\n".encode("utf-8"))
    mode = "full sha256" if full_hash_limit is None else (
        f"sha256 of files <= {full_hash_limit} bytes; safetensors headers and sizes of larger files")
    return {"sha256": digest.hexdigest(), "mode": mode, "num_files": len(files), "total_bytes": total}


def image_set_fingerprint(paths):
    """SHA-256 over the base names, byte sizes and mtimes (ns) of ``paths`` (an image set's cache key)."""
    digest = hashlib.sha256()
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{os.path.basename(path)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode("utf-8"))
    return digest.hexdigest()
