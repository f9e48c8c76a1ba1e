"""LAION image download through img2dataset from a loopback server: outcome counts, resize policy, rerun."""
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from laion_server import LoopbackImageServer, closed_port, image_bytes

from ppdiffusers_fast.data.download import (OUTCOMES, DownloadConfig, DownloadInputError, classify,
                                            download_laion_images, url_files)
from ppdiffusers_fast.data.tar_shards import TarShardReader

IMAGE_SIZE = 32
GOOD_SIZES = [(48, 40), (40, 64), (32, 32), (100, 36), (33, 90)]  # short side >= 32
SMALL_SIZES = [(20, 40), (31, 64)]  # short side < 32


def served_files():
    files = {f"/good{i}.png": image_bytes(w, h, i) for i, (w, h) in enumerate(GOOD_SIZES)}
    files.update({f"/small{i}.png": image_bytes(w, h, 10 + i) for i, (w, h) in enumerate(SMALL_SIZES)})
    files["/page.jpg"] = b"<html><body>not an image</body></html>"
    files["/cut.png"] = image_bytes(64, 64, 20)[:40]
    return files


def url_rows(base_url):
    """(url, caption, expected outcome) for every row; 12 rows."""
    rows = [(f"{base_url}/good{i}.png", f"good picture {i}", "downloaded") for i in range(len(GOOD_SIZES))]
    rows += [(f"{base_url}/small{i}.png", f"small picture {i}", "too_small") for i in range(len(SMALL_SIZES))]
    rows += [(f"{base_url}/page.jpg", "a web page", "not_an_image"), (f"{base_url}/cut.png", "cut", "not_an_image")]
    rows += [(f"{base_url}/missing{i}.png", f"gone {i}", "http_or_network") for i in range(2)]
    rows += [(f"http://127.0.0.1:{closed_port()}/refused.png", "refused", "http_or_network")]
    return rows


def write_url_parquet(folder, rows, url_name="url", caption_name="caption"):
    folder.mkdir(parents=True, exist_ok=True)
    half = len(rows) // 2
    for part, chunk in enumerate((rows[:half], rows[half:])):
        pq.write_table(pa.table({url_name: [r[0] for r in chunk], caption_name: [r[1] for r in chunk]}),
                       folder / f"part-{part:05d}.parquet")
    (folder / "filelist.txt").write_text("part-00000.parquet\npart-00001.parquet\n")
    return folder


def test_classify_maps_img2dataset_statuses():
    assert classify("success", None) == "downloaded"
    assert classify("failed_to_download", "HTTP Error 404: Not Found") == "http_or_network"
    assert classify("failed_to_resize", "image too small") == "too_small"
    assert classify("failed_to_resize", "Image decoding error") == "not_an_image"
    assert classify("failed_to_resize", "aspect ratio too large") == "other_error"


def test_download_counts_every_outcome_and_a_rerun_downloads_nothing(tmp_path):
    with LoopbackImageServer(served_files(), max_requests=100) as server:
        rows = url_rows(server.base_url)
        filtered = write_url_parquet(tmp_path / "filtered", rows)
        config = DownloadConfig(image_size=IMAGE_SIZE, processes=1, threads=4, samples_per_shard=4, timeout=5)
        summary = download_laion_images(str(filtered), tmp_path / "shards", config)
        expected = {name: sum(1 for r in rows if r[2] == name) for name in OUTCOMES}
        assert expected == {"downloaded": 5, "http_or_network": 3, "not_an_image": 2, "too_small": 2,
                            "other_error": 0}
        assert summary["outcomes"] == expected
        assert summary["urls_counted"] == summary["rows_expected"] == 12
        # two input files of 6 rows, 4 per shard: 2 shards each
        assert summary["shards_expected"] == summary["shards_finished"] == 4 and summary["shards_unfinished"] == 0
        assert summary["errors"]["http_or_network"]["HTTP Error 404: Not Found"] == 2
        requests_first_run = server.requests
        assert requests_first_run == 11  # every URL on the server once (the refused one never arrives)

        again = download_laion_images(str(filtered), tmp_path / "shards", config)
        assert server.requests == requests_first_run  # finished shards are skipped
        assert again["outcomes"] == expected

    reader = TarShardReader(tmp_path / "shards")
    assert len(reader) == 5 and not reader.index_errors
    captions = {}
    for index in range(len(reader)):
        record = reader.read(index)
        captions[record.caption] = Image.open(io.BytesIO(record.image_bytes)).size
    sizes = dict(zip([f"good picture {i}" for i in range(len(GOOD_SIZES))], GOOD_SIZES))
    assert set(captions) == set(sizes)
    for caption, (width, height) in captions.items():
        source_width, source_height = sizes[caption]
        assert min(width, height) == IMAGE_SIZE  # short side scaled down to the size, never below
        assert abs(width / height - source_width / source_height) < 0.05  # aspect kept
    markdown = (tmp_path / "shards" / "download_summary" / "summary.md").read_text()
    assert "| too_small | 2 |" in markdown and "| downloaded | 5 |" in markdown
    stored = json.loads((tmp_path / "shards" / "download_summary" / "summary.json").read_text())
    assert stored["outcomes"] == expected


def test_rerun_with_other_settings_is_refused(tmp_path):
    filtered = write_url_parquet(tmp_path / "filtered", [("http://127.0.0.1:9/x.png", "x", None)] * 2)
    shards = tmp_path / "shards"
    (shards / "download_summary").mkdir(parents=True)
    settings = {"files": url_files(str(filtered)), "rows": [1, 1], "image_size": 64, "samples_per_shard": 10000,
                "encode_format": "jpg", "encode_quality": 95}
    (shards / "download_summary" / "settings.json").write_text(json.dumps(settings))
    with pytest.raises(DownloadInputError, match="image_size: 64 -> 32"):
        download_laion_images(str(filtered), shards, DownloadConfig(image_size=32))


def test_bad_inputs_are_named(tmp_path):
    folder = tmp_path / "filtered"
    folder.mkdir()
    (folder / "filelist.txt").write_text("part-00000.parquet\n")
    with pytest.raises(DownloadInputError, match="part-00000.parquet does not exist"):
        download_laion_images(str(folder), tmp_path / "out", DownloadConfig())
    pq.write_table(pa.table({"link": ["http://127.0.0.1:9/a.png"], "caption": ["a"]}), tmp_path / "nourl.parquet")
    with pytest.raises(ValueError, match=r"nourl.parquet: required column 'url' not found"):
        download_laion_images(str(tmp_path / "nourl.parquet"), tmp_path / "out", DownloadConfig())
