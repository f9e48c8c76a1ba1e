"""Download filtered LAION URLs into webdataset tar shards with img2dataset (``scripts/download_laion_images.py``).

Input: the LAION filter's output folder (``filelist.txt`` naming ``part-*.parquet``) or parquet files with a
URL and a caption column (any spelling ``laion_columns.map_columns`` knows: ``url``/``URL``,
``caption``/``TEXT``). Output folder, as img2dataset writes it::

    00000.tar            webdataset shard: <key>.jpg (re-encoded image), <key>.txt (caption), <key>.json (metadata)
    00000.parquet        one row per input URL of the shard: key, url, caption, status, error_message, sizes
    00000_stats.json     written when the shard is finished (a rerun skips shards that have one)
    download_summary/    settings.json (checked on a rerun), summary.json and summary.md (counts per outcome)
    _inputs/             links to the input parquet files, numbered, so shard ids stay fixed across reruns

Resize policy for FLUX training: the aspect ratio is kept; an image whose short side is larger than
``image_size`` is scaled down so that its short side equals ``image_size`` (area interpolation); an image whose
short side is smaller is counted as ``too_small`` and not written (never upscaled).

Outcomes (every input URL falls in exactly one; they add up to the input rows once all shards are done):

==================== =====================================================================
downloaded           fetched, decoded, large enough: written to a shard
http_or_network      HTTP error (404, 403, ...), refused connection, timeout, DNS failure
not_an_image         fetched but not decodable as an image (HTML page, truncated file)
too_small            short side below ``image_size``
other_error          anything else img2dataset reports (its message is kept in the summary)
==================== =====================================================================
"""
import glob
import json
import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from .laion_columns import check_columns, map_columns
from .laion_filter import resolve_input_files
from .laion_summary import write_json_and_markdown

OUTCOMES = ("downloaded", "http_or_network", "not_an_image", "too_small", "other_error")
SUMMARY_FOLDER = "download_summary"
INPUTS_FOLDER = "_inputs"
TOO_SMALL_MESSAGE = "image too small"  # img2dataset's message for min_image_size
NOT_AN_IMAGE_MESSAGE = "Image decoding error"  # img2dataset's message when OpenCV cannot decode the bytes


class DownloadInputError(ValueError):
    """The download input cannot be used (missing file, missing column, settings differ from a previous run)."""


@dataclass
class DownloadConfig:
    image_size: int = 1024        # minimum short side; larger images are scaled down to it
    processes: int = 1            # download processes (img2dataset multiprocessing)
    threads: int = 64             # download threads per process
    samples_per_shard: int = 10000
    timeout: float = 10.0         # seconds per request
    retries: int = 0              # extra tries per URL after a failed request
    encode_format: str = "jpg"    # jpg, png or webp
    encode_quality: int = 95      # jpg/webp quality (png: compression 0-9)

    def check(self):
        for name in ("image_size", "processes", "threads", "samples_per_shard"):
            if getattr(self, name) < 1:
                raise DownloadInputError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.encode_format not in ("jpg", "png", "webp"):
            raise DownloadInputError(f"encode format must be jpg, png or webp, got {self.encode_format!r}")


def url_files(inputs):
    """The parquet files to download from, in a fixed order.

    Args:
        inputs: a LAION filter output folder (its ``filelist.txt`` is followed), a folder of parquet files, a
            parquet file, a glob, or a list of these.
    """
    specs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    files = []
    for spec in specs:
        spec = os.fspath(spec)
        file_list = os.path.join(spec, "filelist.txt")
        if os.path.isdir(spec) and os.path.isfile(file_list):
            with open(file_list, encoding="utf-8") as handle:
                names = [line.strip() for line in handle if line.strip() and not line.startswith("#")]
            for name in names:
                path = os.path.join(spec, name)
                if not os.path.isfile(path):
                    raise DownloadInputError(f"{file_list} lists {name}, but {path} does not exist")
                files.append(path)
        else:
            try:
                files += resolve_input_files(spec)
            except ValueError as error:
                raise DownloadInputError(str(error)) from None
    if not files:
        raise DownloadInputError(f"no parquet files in {inputs!r}")
    return [os.path.abspath(path) for path in files]


def url_columns(files):
    """``(url column, caption column, rows per file)``; every file must spell the two columns the same way."""
    names, rows = None, []
    for path in files:
        try:
            parquet_file = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as error:
            raise DownloadInputError(f"cannot read parquet file {path}: {error}") from None
        schema = parquet_file.schema_arrow
        mapping = map_columns(schema.names)
        check_columns(schema, mapping, ["url", "caption"], path)
        pair = (mapping["url"], mapping["caption"])
        if names is not None and pair != names:
            raise DownloadInputError(f"{path} names its URL/caption columns {pair}, {files[0]} names them {names}; "
                                     f"img2dataset needs one spelling for all files")
        names = pair
        rows.append(parquet_file.metadata.num_rows)
    return names[0], names[1], rows


def _link_inputs(files, folder):
    """Number the inputs as ``_inputs/00000.parquet``... (img2dataset reads a folder in name order)."""
    os.makedirs(folder, exist_ok=True)
    for old in glob.glob(os.path.join(folder, "*.parquet")):
        os.remove(old)
    for number, path in enumerate(files):
        os.symlink(path, os.path.join(folder, f"{number:05d}.parquet"))


def _check_settings(summary_dir, settings):
    """Refuse a rerun whose inputs or settings would put other URLs under the same shard ids."""
    path = os.path.join(summary_dir, "settings.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            previous = json.load(handle)
        fixed = ("files", "rows", "image_size", "samples_per_shard", "encode_format", "encode_quality")
        changed = [f"{key}: {previous.get(key)} -> {settings[key]}" for key in fixed if previous.get(key) != settings[key]]
        if changed:
            raise DownloadInputError(f"{path}: this output folder was started with other inputs or settings "
                                     f"({'; '.join(changed)}); use a new --output_dir")
    os.makedirs(summary_dir, exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(settings, handle, indent=2)
    os.replace(path + ".tmp", path)


def classify(status, error_message):
    """img2dataset's per-URL ``status`` / ``error_message`` -> one of :data:`OUTCOMES`."""
    if status == "success":
        return "downloaded"
    if status == "failed_to_download":
        return "http_or_network"
    if error_message == TOO_SMALL_MESSAGE:
        return "too_small"
    if error_message == NOT_AN_IMAGE_MESSAGE:
        return "not_an_image"
    return "other_error"


def finished_shards(output_dir):
    """Shard ids img2dataset has finished (those with ``NNNNN_stats.json``), sorted."""
    ids = []
    for path in glob.glob(os.path.join(output_dir, "*_stats.json")):
        stem = os.path.basename(path).split("_")[0]
        if stem.isdigit():
            ids.append(int(stem))
    return sorted(ids)


def summarize_download(output_dir, expected_shards=None, expected_rows=None):
    """Count the outcome of every URL from the per-shard parquet files of finished shards.

    Returns:
        dict with ``outcomes`` (counts per :data:`OUTCOMES`), ``errors`` (count per img2dataset message,
        per outcome), ``shards`` (per finished shard: file and counts), ``urls_counted``, ``shards_finished``,
        and, when known, ``shards_expected`` / ``rows_expected`` / ``shards_unfinished``.
    """
    outcomes, errors, shards = Counter({name: 0 for name in OUTCOMES}), {}, []
    for shard_id in finished_shards(output_dir):
        name = f"{shard_id:05d}"
        table = pq.read_table(os.path.join(output_dir, f"{name}.parquet"), columns=["status", "error_message"])
        shard_counts = Counter()
        for status, message in zip(table.column("status").to_pylist(), table.column("error_message").to_pylist()):
            outcome = classify(status, message)
            shard_counts[outcome] += 1
            if outcome != "downloaded":
                errors.setdefault(outcome, Counter())[message or status] += 1
        outcomes.update(shard_counts)
        shards.append({"tar": f"{name}.tar", "urls": sum(shard_counts.values()), **dict(shard_counts)})
    summary = {"outcomes": dict(outcomes), "urls_counted": sum(outcomes.values()),
               "errors": {outcome: dict(counts.most_common(20)) for outcome, counts in errors.items()},
               "shards_finished": len(shards), "shards": shards}
    if expected_shards is not None:
        summary["shards_expected"] = expected_shards
        summary["shards_unfinished"] = expected_shards - len(shards)
    if expected_rows is not None:
        summary["rows_expected"] = expected_rows
    return summary


def download_markdown(summary):
    """The download summary as markdown: what each count means."""
    outcomes = summary["outcomes"]
    meaning = {
        "downloaded": f"written to a shard (short side scaled to {summary['settings']['image_size']} px if larger)",
        "http_or_network": "HTTP error (e.g. 404) or network failure: nothing fetched",
        "not_an_image": "fetched, but the bytes are not a decodable image",
        "too_small": f"short side below {summary['settings']['image_size']} px: not written, not upscaled",
        "other_error": "other failure reported by img2dataset (messages below)",
    }
    lines = ["# LAION download summary", "",
             f"- input files: {len(summary['settings']['files'])}, URLs: {summary.get('rows_expected', '?')}",
             f"- URLs counted (finished shards): {summary['urls_counted']}",
             f"- shards finished: {summary['shards_finished']} of {summary.get('shards_expected', '?')}",
             f"- seconds (this run): {summary['seconds']}", "",
             "| outcome | URLs | meaning |", "|---|---:|---|"]
    lines += [f"| {name} | {outcomes[name]} | {meaning[name]} |" for name in OUTCOMES]
    if summary["errors"]:
        lines += ["", "## Messages per outcome", "", "| outcome | message | URLs |", "|---|---|---:|"]
        for outcome, messages in summary["errors"].items():
            lines += [f"| {outcome} | {message.replace('|', '/')} | {count} |" for message, count in messages.items()]
    if summary.get("shards_unfinished"):
        lines += ["", f"{summary['shards_unfinished']} shard(s) unfinished: rerun the same command to finish them."]
    return "\n".join(lines) + "\n"


def download_laion_images(inputs, output_dir, config=None):
    """Download every URL of ``inputs`` into webdataset shards in ``output_dir``; returns the summary dict.

    A rerun with the same inputs and settings downloads only the shards that have no ``_stats.json`` yet.
    """
    config = config or DownloadConfig()
    config.check()
    files = url_files(inputs)
    url_column, caption_column, rows = url_columns(files)
    output_dir = os.path.abspath(output_dir)
    summary_dir = os.path.join(output_dir, SUMMARY_FOLDER)
    settings = {"files": files, "rows": rows, **asdict(config)}
    os.makedirs(output_dir, exist_ok=True)
    _check_settings(summary_dir, settings)
    inputs_dir = os.path.join(output_dir, INPUTS_FOLDER)
    _link_inputs(files, inputs_dir)
    expected_shards = sum(math.ceil(count / config.samples_per_shard) for count in rows)

    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations asks the network at import otherwise
    try:
        import img2dataset
    except ImportError:
        raise DownloadInputError('downloading needs img2dataset: pip install -e ".[data]"') from None

    start = time.time()
    if len(finished_shards(output_dir)) < expected_shards:
        img2dataset.download(
            url_list=inputs_dir, input_format="parquet", url_col=url_column, caption_col=caption_column,
            output_format="webdataset", output_folder=output_dir, incremental_mode="incremental",
            image_size=config.image_size, resize_mode="keep_ratio", resize_only_if_bigger=True,
            min_image_size=config.image_size, encode_format=config.encode_format,
            encode_quality=config.encode_quality, processes_count=config.processes, thread_count=config.threads,
            number_sample_per_shard=config.samples_per_shard, timeout=config.timeout, retries=config.retries,
            enable_wandb=False)
    summary = summarize_download(output_dir, expected_shards, sum(rows))
    summary["settings"] = settings
    summary["seconds"] = round(time.time() - start, 2)
    write_json_and_markdown(summary, download_markdown(summary), summary_dir)
    return summary
