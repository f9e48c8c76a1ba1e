"""Atomic, resumable training checkpoints (safetensors + JSON; nothing is pickled).

Layout of ``<output_dir>/checkpoint-<step>/``:

    trainable.safetensors         every adapter and trainable head of the method (structured names),
                                  plus extra state such as an EMA adapter; stored as float32
    optimizer-<group>.safetensors AdamW moments, beta powers and master weights, "<param>::<state>"
    training_state.json           step, per-group scheduler state and learning rate, world size
    rank-<r>.json                 RNG states (paddle, numpy, python) and data position of rank r, and the
                                  SHA-256 of rank r's trainable tensors (``arrays_digest``: equal on every
                                  rank of a data-parallel run, and equal to trainable.safetensors')
    config.json                   the resolved training config

A checkpoint is written into ``<output_dir>/.tmp-checkpoint-<step>-<pid>/`` and renamed to its final
name only when complete (``os.replace`` of a directory on the same file system), so a process killed
while writing leaves the previous checkpoints untouched; stale temporary folders are ignored when
looking for the latest checkpoint and removed by the next save. Only the newest ``total_limit``
checkpoints are kept.

Resuming reads and checks every file first (:func:`read_checkpoint`); ``latest`` falls back to the newest intact
checkpoint and says which newer ones it skipped and why (:func:`find_resume_checkpoint`).
"""
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..models.finite import describe_non_finite, non_finite_names
from ..models.safetensors_io import load_file, save_file

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TEMP_PREFIX = ".tmp-checkpoint-"
STATE_FILE = "training_state.json"
TRAINABLE_FILE = "trainable.safetensors"
FORMAT_VERSION = 1


def optimizer_file(group: str) -> str:
    return f"optimizer-{group}.safetensors"


def rank_file(rank: int) -> str:
    return f"rank-{rank}.json"


def save_arrays(arrays: Dict[str, np.ndarray], path) -> None:
    """Write float arrays as F32 safetensors (bf16/fp16 widen exactly)."""
    save_file({name: (np.asarray(a, dtype=np.float32), "F32") for name, a in arrays.items()}, path)


def arrays_digest(arrays: Dict[str, np.ndarray]) -> str:
    """SHA-256 over the names, shapes and float32 bytes of ``arrays``, in name order (as ``save_arrays`` stores them)."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name], dtype=np.float32)
        digest.update(f"{name}:{list(value.shape)}:".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def write_json(payload, path) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())


def read_json(path) -> dict:
    with open(path, "r", encoding="utf-8") as handle:
        return json.load(handle)


def list_checkpoints(output_dir) -> List[Path]:
    """Complete checkpoints in ``output_dir``, oldest first (temporary folders excluded)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = CHECKPOINT_PATTERN.match(child.name)
        if match and child.is_dir() and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


class CorruptCheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or inconsistent; the message names the file and the problem."""

    def __init__(self, file: Path, problem: str):
        super().__init__(f"checkpoint file {file}: {problem}")
        self.file, self.problem = Path(file), problem


@dataclass
class CheckpointContents:
    """Everything a resume needs, read and checked before any of it is applied."""

    path: Path
    state: dict  # training_state.json
    trainable: Dict[str, np.ndarray]  # trainable.safetensors
    optimizers: Dict[str, Dict[str, np.ndarray]]  # group -> optimizer-<group>.safetensors
    ranks: Dict[int, dict]  # rank -> rank-<r>.json


def _read_json_file(file: Path, required: Sequence[str]) -> dict:
    if not file.is_file():
        raise CorruptCheckpointError(file, "missing")
    try:
        payload = read_json(file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptCheckpointError(file, f"unreadable JSON ({error})") from None
    if not isinstance(payload, dict):
        raise CorruptCheckpointError(file, f"holds a JSON {type(payload).__name__}, not an object")
    missing = [key for key in required if key not in payload]
    if missing:
        raise CorruptCheckpointError(file, f"lacks {', '.join(missing)}")
    return payload


def _read_arrays_file(file: Path) -> Dict[str, np.ndarray]:
    if not file.is_file():
        raise CorruptCheckpointError(file, "missing")
    try:
        arrays = load_file(file)
    except Exception as error:  # a truncated or damaged file: the reader names what is wrong
        raise CorruptCheckpointError(file, f"unreadable safetensors ({error})") from None
    bad = non_finite_names(arrays)
    if bad:
        raise CorruptCheckpointError(file, f"NaN or infinite values in {describe_non_finite(bad)}")
    return arrays


def read_checkpoint(path) -> CheckpointContents:
    """Read and check every file of the checkpoint folder ``path`` (nothing is applied here).

    Checks: each JSON file parses to an object with its keys, the format version, a rank file for every rank
    of the run that wrote it, every safetensors file reads completely and is finite, and the trainable tensors
    match the SHA-256 each rank recorded. Raises :class:`CorruptCheckpointError` naming the first bad file.
    """
    path = Path(path)
    state_file = path / STATE_FILE
    state = _read_json_file(state_file, ("format", "step", "world_size", "groups"))
    if state["format"] != FORMAT_VERSION:
        raise CorruptCheckpointError(state_file, f"format {state['format']}, expected {FORMAT_VERSION}")
    if not isinstance(state["groups"], dict) or not isinstance(state["world_size"], int) or state["world_size"] < 1:
        raise CorruptCheckpointError(state_file, "malformed 'groups' or 'world_size'")
    if (path / "config.json").exists():
        _read_json_file(path / "config.json", ())
    ranks = {rank: _read_json_file(path / rank_file(rank), ("rng", "data")) for rank in range(state["world_size"])}
    trainable = _read_arrays_file(path / TRAINABLE_FILE)
    digest = None
    for rank, rank_state in ranks.items():
        recorded = rank_state.get("trainable_sha256")
        if recorded is not None:
            digest = digest or arrays_digest(trainable)
            if recorded != digest:
                raise CorruptCheckpointError(path / TRAINABLE_FILE, f"its tensors do not match the SHA-256 recorded "
                                                                    f"in {rank_file(rank)}")
    optimizers = {group: _read_arrays_file(path / optimizer_file(group)) for group in state["groups"]}
    return CheckpointContents(path, state, trainable, optimizers, ranks)


def _all_checkpoint_folders(output_dir) -> List[Path]:
    """Every ``checkpoint-<step>`` folder in ``output_dir``, newest first, complete or not."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), child) for child in root.iterdir()
             if (m := CHECKPOINT_PATTERN.match(child.name)) and child.is_dir()]
    return [path for _, path in sorted(found, reverse=True)]


def find_resume_checkpoint(resume_from: Optional[str], output_dir) -> Tuple[Optional[CheckpointContents], List[str]]:
    """``(contents or None, notes)`` for ``--resume_from_checkpoint``, every file read and checked.

    ``None``/"" -> no resume. ``"latest"`` -> the newest intact checkpoint in ``output_dir`` (None when there is
    none); ``notes`` says which newer ones were skipped and why. A path (or a folder name in ``output_dir``)
    -> that checkpoint, or :class:`CorruptCheckpointError` naming its bad file.
    """
    if not resume_from:
        return None, []
    if resume_from == "latest":
        notes = []
        for path in _all_checkpoint_folders(output_dir):
            try:
                return read_checkpoint(path), notes
            except CorruptCheckpointError as error:
                notes.append(f"skipped {path.name}: {error}")
        return None, notes
    path = Path(resume_from)
    if not path.is_absolute() and not path.exists():
        path = Path(output_dir) / resume_from
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {resume_from}: {path} is not a checkpoint folder")
    return read_checkpoint(path), []


def resolve_resume_path(resume_from: Optional[str], output_dir) -> Optional[Path]:
    """The folder :func:`find_resume_checkpoint` resumes from (None for a fresh start)."""
    contents, _ = find_resume_checkpoint(resume_from, output_dir)
    return None if contents is None else contents.path


class CheckpointWriter:
    """Writes checkpoint folders atomically and prunes old ones.

    ``write(step, fill)`` calls ``fill(temp_dir)`` to write the files, then renames. In data-parallel runs
    the trainer lets every rank write its ``rank-<r>.json`` into the same temporary folder (shared file
    system) between barriers; only rank 0 renames and prunes.
    """

    def __init__(self, output_dir, total_limit: Optional[int] = None):
        self.output_dir = Path(output_dir)
        self.total_limit = total_limit

    def temp_dir(self, step: int) -> Path:
        return self.output_dir / f"{TEMP_PREFIX}{step}"

    def final_dir(self, step: int) -> Path:
        return self.output_dir / f"checkpoint-{step}"

    def remove_stale_temp_dirs(self) -> None:
        if not self.output_dir.is_dir():
            return
        for child in self.output_dir.iterdir():
            if child.name.startswith(TEMP_PREFIX) and child.is_dir():
                shutil.rmtree(child, ignore_errors=True)

    def begin(self, step: int) -> Path:
        """Create an empty temporary folder for ``step``."""
        self.remove_stale_temp_dirs()
        temp = self.temp_dir(step)
        temp.mkdir(parents=True)
        return temp

    def commit(self, step: int) -> Path:
        """Rename the finished temporary folder to ``checkpoint-<step>`` and prune old checkpoints."""
        temp, final = self.temp_dir(step), self.final_dir(step)
        if not (temp / STATE_FILE).is_file():
            raise RuntimeError(f"checkpoint {temp} is incomplete (no {STATE_FILE}); not committing it")
        if final.exists():  # the same step saved again (e.g. the end of a resumed run): replace it
            trash = self.output_dir / f"{TEMP_PREFIX}{step}-replaced"
            os.replace(final, trash)
            os.replace(temp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(temp, final)
        self.prune()
        return final

    def abort(self, step: int) -> None:
        shutil.rmtree(self.temp_dir(step), ignore_errors=True)

    def prune(self) -> None:
        if not self.total_limit:
            return
        checkpoints = list_checkpoints(self.output_dir)
        for old in checkpoints[: max(len(checkpoints) - self.total_limit, 0)]:
            shutil.rmtree(old, ignore_errors=True)

    def write(self, step: int, fill: Callable[[Path], None]) -> Path:
        """Single-process convenience: ``begin``, ``fill(temp)``, ``commit`` (temporary folder removed on error)."""
        temp = self.begin(step)
        try:
            fill(temp)
        except BaseException:
            self.abort(step)
            raise
        return self.commit(step)


def load_trainable(path) -> Dict[str, np.ndarray]:
    return load_file(Path(path) / TRAINABLE_FILE)


def load_optimizer_arrays(path, group: str) -> Dict[str, np.ndarray]:
    file = Path(path) / optimizer_file(group)
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint {path} has no optimizer state for group '{group}' ({file.name})")
    return load_file(file)


def load_training_state(path) -> dict:
    state = read_json(Path(path) / STATE_FILE)
    if state.get("format") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {path} has format {state.get('format')}, expected {FORMAT_VERSION}")
    return state


def load_rank_state(path, rank: int) -> dict:
    file = Path(path) / rank_file(rank)
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint {path} has no state for rank {rank} ({file.name}); "
                                "resume with the world size it was written with")
    return read_json(file)
