"""LAION metadata filter: every rule's count, column-name variants, bad files, streaming, the CLI."""
import importlib.util
import json
import logging
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ppdiffusers_fast.data.laion_columns import LaionColumnError, map_columns
from ppdiffusers_fast.data.laion_filter import (RULES, LaionFilterConfig, LaionFilterError, UrlDeduplicator,
                                                filter_laion, resolve_input_files)

REPO = Path(__file__).resolve().parents[2]
AES_V2_NAMES = dict(url="URL", caption="TEXT", width="WIDTH", height="HEIGHT", aesthetic="AESTHETIC_SCORE",
                    pwatermark="pwatermark", punsafe="punsafe", similarity="similarity")


def write_rows(path, rows, names=AES_V2_NAMES, row_group_size=None, drop=()):
    """rows: list of dicts with keys url, caption, width, height, aesthetic, pwatermark, punsafe."""
    columns = {}
    types = dict(url=pa.string(), caption=pa.string(), width=pa.float64(), height=pa.float64(),
                 aesthetic=pa.float64(), pwatermark=pa.float64(), punsafe=pa.float64(), similarity=pa.float64())
    for key, name in names.items():
        if key in drop:
            continue
        columns[name] = pa.array([row.get(key, 0.3 if key == "similarity" else None) for row in rows],
                                 type=types[key])
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def good_row(i, **changes):
    row = dict(url=f"http://x/{i}.jpg", caption=f"a photo number {i}", width=1024.0, height=1536.0,
               aesthetic=6.5, pwatermark=0.1, punsafe=0.05)
    row.update(changes)
    return row


# Each row with the rule that must remove it ("kept" = survives), for the default thresholds
# plus max_punsafe=0.5, min_caption_chars=3, max_caption_chars=40.
LABELLED_ROWS = [
    (good_row(0), "kept"),
    (good_row(1, url=None), "url_missing"),
    (good_row(2, url="   "), "url_missing"),
    (good_row(3, caption=None), "caption_missing"),
    (good_row(4, width=None), "width_invalid"),
    (good_row(5, width=-1024.0), "width_invalid"),
    (good_row(6, width=float("nan")), "width_invalid"),
    (good_row(7, width=1023.0), "width_too_small"),
    (good_row(8, height=0.0), "height_invalid"),
    (good_row(9, height=float("inf")), "height_invalid"),
    (good_row(10, height=512.0), "height_too_small"),
    (good_row(11, aesthetic=float("nan")), "aesthetic_invalid"),
    (good_row(12, aesthetic=None), "aesthetic_invalid"),
    (good_row(13, aesthetic=6.0), "aesthetic_too_low"),  # strictly greater than 6 is kept
    (good_row(14, aesthetic=2.0), "aesthetic_too_low"),
    (good_row(15, pwatermark=-0.1), "pwatermark_invalid"),
    (good_row(16, pwatermark=1.5), "pwatermark_invalid"),
    (good_row(17, pwatermark=None), "pwatermark_invalid"),
    (good_row(18, pwatermark=0.5), "pwatermark_too_high"),  # strictly below 0.5 is kept
    (good_row(19, punsafe=float("nan")), "punsafe_invalid"),
    (good_row(20, punsafe=0.9), "punsafe_too_high"),
    (good_row(21, caption="  ab  "), "caption_too_short"),
    (good_row(22, caption="x" * 41), "caption_too_long"),
    (good_row(23, caption="x" * 40), "kept"),
    (good_row(0, caption="same url again"), "url_duplicate"),
    (good_row(24, width=float("nan"), height=10.0, aesthetic=1.0), "width_invalid"),  # first failing rule
    (good_row(25, width=4096.0, height=4096.0, aesthetic=9.9, pwatermark=0.0, punsafe=0.0), "kept"),
    (good_row(25), "url_duplicate"),
]
LABELLED_CONFIG = dict(max_punsafe=0.5, min_caption_chars=3, max_caption_chars=40)


def expected_counts(labels):
    counts = {rule: 0 for rule in RULES}
    for label in labels:
        if label != "kept":
            counts[label] += 1
    return counts


def test_every_rule_counted_exactly(tmp_path):
    write_rows(tmp_path / "in.parquet", [row for row, _ in LABELLED_ROWS])
    summary = filter_laion(tmp_path / "in.parquet", tmp_path / "out", LaionFilterConfig(**LABELLED_CONFIG),
                           progress=False)
    labels = [label for _, label in LABELLED_ROWS]
    assert summary["removed_by_rule"] == expected_counts(labels)
    assert summary["rows_read"] == len(LABELLED_ROWS)
    assert summary["rows_kept"] == labels.count("kept") == 3
    kept = pq.read_table(tmp_path / "out" / "part-00000.parquet").to_pylist()
    expected = [row for row, label in LABELLED_ROWS if label == "kept"]
    assert [r["url"] for r in kept] == [r["url"] for r in expected]
    assert [r["caption"] for r in kept] == [r["caption"] for r in expected]
    assert [r["width"] for r in kept] == [1024, 1024, 4096]
    assert (tmp_path / "out" / "filelist.txt").read_text().split() == ["part-00000.parquet"]
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk["removed_by_rule"] == summary["removed_by_rule"]
    markdown = (tmp_path / "out" / "summary.md").read_text()
    assert "| width_invalid | 4 |" in markdown and "| url_duplicate | 2 |" in markdown


def reference_filter(rows, config):
    """Row-by-row restatement of the documented rules, independent of the vectorised code."""
    seen, counts, kept = set(), Counter(), []
    bad = lambda v: v is None or not math.isfinite(v)  # noqa: E731
    for row in rows:
        url, caption = row["url"], row["caption"]
        checks = [("url_missing", url is None or not url.strip()), ("caption_missing", caption is None)]
        for name, minimum in (("width", config.min_width), ("height", config.min_height)):
            value = row[name]
            checks += [(f"{name}_invalid", bad(value) or value <= 0),
                       (f"{name}_too_small", not bad(value) and value < minimum)]
        value = row["aesthetic"]
        checks += [("aesthetic_invalid", bad(value)),
                   ("aesthetic_too_low", not bad(value) and value <= config.min_aesthetic)]
        for name, maximum in (("pwatermark", config.max_pwatermark), ("punsafe", config.max_punsafe)):
            if maximum < 1.0:
                value = row[name]
                checks += [(f"{name}_invalid", bad(value) or not 0 <= value <= 1),
                           (f"{name}_too_high", not bad(value) and value >= maximum)]
        length = len(caption.strip()) if caption is not None else 0
        checks += [("caption_too_short", length < config.min_caption_chars),
                   ("caption_too_long", config.max_caption_chars > 0 and length > config.max_caption_chars)]
        failed = next((rule for rule, fails in checks if fails), None)
        if failed is None and url.strip() in seen:
            failed = "url_duplicate"
        if failed:
            counts[failed] += 1
        else:
            seen.add(url.strip())
            kept.append(url.strip())
    return counts, kept


def random_rows(rng, count, url_pool):
    def maybe(values, weights, p_null=0.02, p_nan=0.02):
        u = rng.random()
        return None if u < p_null else (float("nan") if u < p_null + p_nan else float(rng.choice(values, p=weights)))
    sizes, size_weights = [-5, 0, 512, 1023, 1024, 2048], [0.02, 0.02, 0.03, 0.03, 0.5, 0.4]
    rows = []
    for _ in range(count):
        rows.append(dict(
            url=None if rng.random() < 0.02 else (" " if rng.random() < 0.01 else f"http://h/{rng.integers(url_pool)}"),
            caption=None if rng.random() < 0.02 else "w" * int(rng.integers(0, 12)),
            width=maybe(sizes, size_weights),
            height=maybe(sizes, size_weights),
            aesthetic=maybe([4.0, 6.0, 6.01, 7.5], [0.05, 0.05, 0.4, 0.5]),
            pwatermark=maybe([-0.2, 0.1, 0.5, 0.49, 1.2], [0.02, 0.6, 0.05, 0.3, 0.03]),
            punsafe=maybe([0.0, 0.3, 0.6], [0.5, 0.4, 0.1]),
        ))
    return rows


@pytest.mark.parametrize("batch_rows", [7, 100000])
def test_random_tables_match_row_by_row_reference(tmp_path, batch_rows):
    rng = np.random.default_rng(3)
    rows_a, rows_b = random_rows(rng, 900, 250), random_rows(rng, 600, 250)
    (tmp_path / "in").mkdir()
    write_rows(tmp_path / "in" / "a.parquet", rows_a, row_group_size=128)
    lower = dict(url="url", caption="caption", width="width", height="height", aesthetic="aesthetic",
                 pwatermark="watermark", punsafe="punsafe")
    write_rows(tmp_path / "in" / "b.parquet", rows_b, names=lower, row_group_size=50)
    config = LaionFilterConfig(max_punsafe=0.5, min_caption_chars=2, max_caption_chars=9, batch_rows=batch_rows,
                               rows_per_output_file=40)
    summary = filter_laion(tmp_path / "in", tmp_path / "out", config, progress=False)
    counts, kept_urls = reference_filter(rows_a + rows_b, config)
    assert summary["removed_by_rule"] == {rule: counts.get(rule, 0) for rule in RULES}
    assert all(summary["removed_by_rule"][rule] > 0 for rule in RULES)  # the data exercises every rule
    files = (tmp_path / "out" / "filelist.txt").read_text().split()
    assert len(files) == math.ceil(len(kept_urls) / 40) > 1
    written = pq.read_table([str(tmp_path / "out" / f) for f in files]).column("url").to_pylist()
    assert written == kept_urls
    found = summary["columns_found"]
    assert found[str(tmp_path / "in" / "a.parquet")]["aesthetic_score"] == "AESTHETIC_SCORE"
    assert found[str(tmp_path / "in" / "b.parquet")]["pwatermark"] == "watermark"
    assert found[str(tmp_path / "in" / "b.parquet")]["aesthetic_score"] == "aesthetic"


def test_column_name_variants():
    assert map_columns(["URL", "TEXT", "WIDTH", "HEIGHT", "AESTHETIC_SCORE", "pwatermark"]) == dict(
        url="URL", caption="TEXT", width="WIDTH", height="HEIGHT", aesthetic_score="AESTHETIC_SCORE",
        pwatermark="pwatermark")
    assert map_columns(["url", "text", "Width", "HEIGHT", "aesthetic_score", "watermark", "PUNSAFE"]) == dict(
        url="url", caption="text", width="Width", height="HEIGHT", aesthetic_score="aesthetic_score",
        pwatermark="watermark", punsafe="PUNSAFE")
    # both spellings present: the preferred one (TEXT) wins
    assert map_columns(["URL", "caption", "TEXT"])["caption"] == "TEXT"


def test_missing_required_column_names_column_and_file(tmp_path):
    good = write_rows(tmp_path / "a.parquet", [good_row(0)])
    bad = write_rows(tmp_path / "b.parquet", [good_row(1)], drop=("aesthetic",))
    with pytest.raises(LaionColumnError, match=r"b\.parquet.*'aesthetic_score' not found"):
        filter_laion([good, bad], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # stopped before any work
    # the rule that needs it switched off: the file is accepted, and a missing optional column is null
    summary = filter_laion([good, bad], tmp_path / "out", LaionFilterConfig(min_aesthetic=None), progress=False)
    assert summary["rows_kept"] == 2
    assert pq.read_table(tmp_path / "out" / "part-00000.parquet").column("aesthetic_score").to_pylist() == [6.5, None]
    # punsafe is only required when its rule is on
    no_punsafe = write_rows(tmp_path / "c.parquet", [good_row(2)], drop=("punsafe",))
    filter_laion(no_punsafe, tmp_path / "out2", progress=False)
    with pytest.raises(LaionColumnError, match="'punsafe' not found"):
        filter_laion(no_punsafe, tmp_path / "out3", LaionFilterConfig(max_punsafe=0.5), progress=False)


def test_wrong_column_type_is_an_error(tmp_path):
    pq.write_table(pa.table({"URL": ["u"], "TEXT": ["cap"], "WIDTH": ["1024"], "HEIGHT": [1024.0],
                             "AESTHETIC_SCORE": [7.0], "pwatermark": [0.1]}), tmp_path / "s.parquet")
    with pytest.raises(LaionColumnError, match=r"s\.parquet: column 'WIDTH' \(width\) has type string"):
        filter_laion(tmp_path / "s.parquet", tmp_path / "out", progress=False)


def test_truncated_file_stops_or_is_skipped(tmp_path):
    write_rows(tmp_path / "a.parquet", [good_row(i) for i in range(5)])
    data = write_rows(tmp_path / "b.parquet", [good_row(i) for i in range(5, 10)]).read_bytes()
    (tmp_path / "b.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(LaionFilterError, match=r"b\.parquet.*truncated or not a parquet file"):
        filter_laion(tmp_path / "*.parquet", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    summary = filter_laion(str(tmp_path / "*.parquet"), tmp_path / "out",
                           LaionFilterConfig(skip_bad_files=True), progress=False)
    assert [item["file"] for item in summary["files_skipped"]] == [str(tmp_path / "b.parquet")]
    assert summary["rows_read"] == 5 and summary["rows_kept"] == 5


def test_inputs_resolution_errors(tmp_path):
    with pytest.raises(LaionFilterError, match="not a file, a folder or a glob"):
        resolve_input_files(str(tmp_path / "nothing*.parquet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LaionFilterError, match="no parquet files"):
        resolve_input_files(tmp_path / "empty")


def test_deduplicator_across_calls():
    dedup = UrlDeduplicator(max_chunks=2)
    assert dedup.first_occurrences(["a", "b", "a"]).tolist() == [True, True, False]
    assert dedup.first_occurrences(["c", "b"]).tolist() == [True, False]
    assert dedup.first_occurrences(["d"]).tolist() == [True]  # merges chunks
    assert dedup.first_occurrences(["a", "c", "d", "e"]).tolist() == [False, False, False, True]
    assert len(dedup) == 5


def load_cli():
    spec = importlib.util.spec_from_file_location("filter_laion_aesv2", REPO / "scripts" / "filter_laion_aesv2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_writes_outputs_and_reports_missing_column(tmp_path, capsys, caplog):
    cli = load_cli()
    write_rows(tmp_path / "in.parquet", [row for row, _ in LABELLED_ROWS])
    with caplog.at_level(logging.INFO, logger="ppdiffusers_fast.data.laion_filter"):
        code = cli.main(["--input", str(tmp_path / "in.parquet"), "--output_dir", str(tmp_path / "out"),
                         "--max_punsafe", "0.5", "--min_caption_chars", "3", "--max_caption_chars", "40",
                         "--batch_rows", "4", "--no_progress"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["removed_by_rule"] == expected_counts([label for _, label in LABELLED_ROWS])
    assert any("columns found url=URL, caption=TEXT, width=WIDTH" in r.message for r in caplog.records)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["filelist.txt", "part-00000.parquet",
                                                                    "summary.json", "summary.md"]
    write_rows(tmp_path / "nocap.parquet", [good_row(0)], drop=("caption",))
    code = cli.main(["--input", str(tmp_path / "nocap.parquet"), "--output_dir", str(tmp_path / "out2"),
                     "--no_progress"])
    assert code == 2
    assert "nocap.parquet: required column 'caption' not found" in capsys.readouterr().err
    assert cli.parse_args(["--input", "x", "--output_dir", "y", "--min_aesthetic", "off"]).min_aesthetic is None
