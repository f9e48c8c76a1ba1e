"""The COCO-10k prompt set: one caption per image, chosen with a fixed seed, saved with its SHA-256.

Sources (chosen by extension):
* ``.json``: COCO captions annotations (``captions_val2014.json`` / ``captions_val2017.json``): a dict with an
  ``annotations`` list of ``{"image_id", "id", "caption"}``;
* ``.tsv``: a header row with a ``caption`` (or ``prompt``) column and optionally ``image_id``; one row per caption;
* ``.txt``: one prompt per line (each line is its own "image").

Selection (deterministic for a given source and seed): group captions by image (sorted by image id, the
captions of an image sorted by annotation id / line), draw ``num_prompts`` images without replacement with
``numpy.random.default_rng(seed)``, keep them in image order, then draw one caption per image from the same
generator. Whitespace inside a caption is collapsed to single spaces.

The saved list (JSON) records the source file's SHA-256, the seed, and ``sha256`` = SHA-256 of the UTF-8 JSON
array of the prompt strings (compact separators), which identifies the prompt set in every report.
"""
import csv
import hashlib
import io
import json
import os
import tempfile
from dataclasses import dataclass, field

import numpy as np

PROMPT_LIST_FORMAT = "ppdiffusers_fast.prompt_list.v1"


class PromptFileError(ValueError):
    """An invalid prompt or caption file; the message names the file and the reason (line or key)."""


@dataclass
class PromptList:
    """The chosen prompts, in generation order; ``image_ids[i]`` / ``caption_ids[i]`` trace each back to its source."""

    prompts: list
    image_ids: list
    caption_ids: list
    source: str = ""
    source_sha256: str = ""
    seed: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def sha256(self):
        return prompts_sha256(self.prompts)

    def __len__(self):
        return len(self.prompts)


def prompts_sha256(prompts):
    """SHA-256 of ``json.dumps(prompts, ensure_ascii=False, separators=(",", ":"))`` encoded as UTF-8."""
    payload = json.dumps(list(prompts), ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(payload).hexdigest()


def file_sha256(path, chunk_size=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _clean(caption):
    return " ".join(str(caption).split())


def _read_text(path):
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except UnicodeDecodeError as error:
        raise PromptFileError(f"{path}: not valid UTF-8 at byte {error.start}") from error


def _groups_from_coco_json(path):
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise PromptFileError(f"{path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}") from error
    if not isinstance(data, dict) or "annotations" not in data:
        found = sorted(data)[:10] if isinstance(data, dict) else type(data).__name__
        raise PromptFileError(f"{path}: a COCO captions file needs a top-level 'annotations' list (found {found})")
    annotations = data["annotations"]
    if not isinstance(annotations, list) or not annotations:
        raise PromptFileError(f"{path}: 'annotations' must be a non-empty list")
    groups = {}
    for position, annotation in enumerate(annotations):
        if not isinstance(annotation, dict):
            raise PromptFileError(f"{path}: annotations[{position}] is not an object")
        missing = [key for key in ("image_id", "caption") if key not in annotation]
        if missing:
            raise PromptFileError(f"{path}: annotations[{position}] lacks keys {missing}")
        caption = annotation["caption"]
        if not isinstance(caption, str) or not _clean(caption):
            raise PromptFileError(f"{path}: annotations[{position}] has an empty or non-text caption")
        caption_id = annotation.get("id", position)
        groups.setdefault(annotation["image_id"], []).append((caption_id, _clean(caption)))
    return groups


def _groups_from_tsv(path):
    lines = _read_text(path).splitlines()
    if not lines:
        raise PromptFileError(f"{path}: empty file")
    rows = list(csv.reader(io.StringIO("\n".join(lines)), delimiter="\t", quoting=csv.QUOTE_NONE))
    header = [h.strip().lower() for h in rows[0]]
    text_column = next((header.index(name) for name in ("caption", "prompt", "text") if name in header), None)
    if text_column is None:
        raise PromptFileError(f"{path}: line 1: the header needs a 'caption' or 'prompt' column, found {header}")
    image_column = header.index("image_id") if "image_id" in header else None
    groups = {}
    for line_number, row in enumerate(rows[1:], start=2):
        if not row or (len(row) == 1 and not row[0].strip()):
            if any(r and any(c.strip() for c in r) for r in rows[line_number - 1:]):
                raise PromptFileError(f"{path}: line {line_number}: empty line")
            continue
        if len(row) != len(header):
            raise PromptFileError(f"{path}: line {line_number}: expected {len(header)} tab-separated fields, "
                                  f"got {len(row)}")
        caption = _clean(row[text_column])
        if not caption:
            raise PromptFileError(f"{path}: line {line_number}: empty caption")
        key = row[image_column].strip() if image_column is not None else f"line{line_number:09d}"
        if image_column is not None and not key:
            raise PromptFileError(f"{path}: line {line_number}: empty image_id")
        groups.setdefault(key, []).append((line_number, caption))
    return groups


def _groups_from_txt(path):
    lines = _read_text(path).splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    groups = {}
    for line_number, line in enumerate(lines, start=1):
        caption = _clean(line)
        if not caption:
            raise PromptFileError(f"{path}: line {line_number}: empty line")
        groups[line_number] = [(line_number, caption)]
    return groups


def read_caption_groups(path):
    """``{image key: [(caption id, caption), ...]}`` from a .json / .tsv / .txt file (see module docstring)."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"captions file not found: {path}")
    lower = path.lower()
    if lower.endswith(".json"):
        groups = _groups_from_coco_json(path)
    elif lower.endswith(".tsv"):
        groups = _groups_from_tsv(path)
    elif lower.endswith(".txt"):
        groups = _groups_from_txt(path)
    else:
        raise PromptFileError(f"{path}: unsupported captions file type (use .json, .tsv or .txt)")
    if not groups:
        raise PromptFileError(f"{path}: no captions found")
    return groups


def _sort_key(value):
    return (0, value, "") if isinstance(value, int) else (1, 0, str(value))


def select_prompts(groups, num_prompts, seed, source="", source_sha256=""):
    """Choose ``num_prompts`` images and one caption each (see module docstring) -> :class:`PromptList`."""
    if num_prompts <= 0:
        raise ValueError(f"num_prompts must be positive, got {num_prompts}")
    image_keys = sorted(groups, key=_sort_key)
    if num_prompts > len(image_keys):
        raise PromptFileError(f"{source or 'captions'}: {num_prompts} prompts requested but only "
                              f"{len(image_keys)} images (prompt groups) are available")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(image_keys), size=num_prompts, replace=False))
    prompts, image_ids, caption_ids = [], [], []
    for position in chosen:
        key = image_keys[int(position)]
        captions = sorted(groups[key], key=lambda item: _sort_key(item[0]))
        caption_id, caption = captions[int(rng.integers(len(captions)))]
        prompts.append(caption)
        image_ids.append(key)
        caption_ids.append(caption_id)
    return PromptList(prompts=prompts, image_ids=image_ids, caption_ids=caption_ids, source=source,
                      source_sha256=source_sha256, seed=int(seed))


def save_prompt_list(path, prompt_list):
    """Write the list as JSON (atomically) with its SHA-256, the source digest and the seed."""
    payload = {
        "format": PROMPT_LIST_FORMAT, "sha256": prompt_list.sha256, "num_prompts": len(prompt_list),
        "seed": prompt_list.seed, "source": prompt_list.source, "source_sha256": prompt_list.source_sha256,
        "selection": "numpy default_rng(seed): images without replacement (sorted), then one caption per image",
        "items": [{"index": i, "prompt": p, "image_id": img, "caption_id": cap}
                  for i, (p, img, cap) in enumerate(zip(prompt_list.prompts, prompt_list.image_ids,
                                                        prompt_list.caption_ids))],
    }
    folder = os.path.dirname(os.path.abspath(str(path)))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, ensure_ascii=False, indent=1)
    os.replace(tmp, path)


def load_prompt_list(path):
    """Read a list written by :func:`save_prompt_list`; the stored SHA-256 must match the prompts."""
    try:
        payload = json.loads(_read_text(str(path)))
    except json.JSONDecodeError as error:
        raise PromptFileError(f"{path}: invalid JSON at line {error.lineno}: {error.msg}") from error
    if not isinstance(payload, dict) or payload.get("format") != PROMPT_LIST_FORMAT:
        raise PromptFileError(f"{path}: not a prompt list (format must be {PROMPT_LIST_FORMAT!r})")
    missing = [key for key in ("sha256", "items", "seed") if key not in payload]
    if missing:
        raise PromptFileError(f"{path}: prompt list lacks keys {missing}")
    items = payload["items"]
    prompt_list = PromptList(prompts=[item["prompt"] for item in items], image_ids=[item["image_id"] for item in items],
                             caption_ids=[item["caption_id"] for item in items], source=payload.get("source", ""),
                             source_sha256=payload.get("source_sha256", ""), seed=int(payload["seed"]))
    if prompt_list.sha256 != payload["sha256"]:
        raise PromptFileError(f"{path}: the prompts do not match the stored SHA-256 (file edited or corrupted)")
    return prompt_list


def prepare_prompts(list_path, captions_file=None, num_prompts=10000, seed=0):
    """Load the saved list at ``list_path`` if it exists (and matches the request), else build and save it.

    Reuse requires the same source digest, seed and count; a mismatch raises instead of overwriting.
    """
    if os.path.isfile(str(list_path)):
        saved = load_prompt_list(list_path)
        if captions_file is not None:
            wanted = {"source_sha256": file_sha256(captions_file), "seed": int(seed), "num_prompts": int(num_prompts)}
            have = {"source_sha256": saved.source_sha256, "seed": saved.seed, "num_prompts": len(saved)}
            differing = {k: (have[k], wanted[k]) for k in wanted if have[k] != wanted[k]}
            if differing:
                raise ValueError(f"{list_path} was made with other settings {differing} (saved, requested); "
                                 "use another output folder or delete the list")
        return saved
    if captions_file is None:
        raise ValueError(f"no prompt list at {list_path} and no captions file given")
    groups = read_caption_groups(captions_file)
    prompt_list = select_prompts(groups, num_prompts, seed, source=os.path.basename(str(captions_file)),
                                 source_sha256=file_sha256(captions_file))
    save_prompt_list(list_path, prompt_list)
    return prompt_list
