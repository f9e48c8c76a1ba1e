"""The data path end to end, as the README gives it: LAION-like metadata served by a loopback HTTP server
(127.0.0.1) -> filter -> download (img2dataset) -> latent cache (two processes) -> two FLUX-Lightning training
steps on the tiny teacher folder -> the student LoRA in the generation entry point; exact counts at every stage."""
import json
import os
import runpy
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from laion_server import LoopbackImageServer, image_bytes, write_laion_parquet
from PIL import Image

from ppdiffusers_fast.data import CachedDataset
from ppdiffusers_fast.inference import generate_cli
from ppdiffusers_fast.training import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[2]
TEACHER = REPO / "tests" / "fixtures" / "pipeline" / "tiny_flux"
GOOD_SIZES = [(48, 40), (40, 56), (64, 32), (33, 33), (90, 40), (32, 48)]


def script_main(name):
    return runpy.run_path(str(REPO / "scripts" / name), run_name=name)["main"]


def laion_rows(base_url):
    """15 rows: 5 removed by the filter, 10 kept of which 6 download, 2 are 404, 1 is no image, 1 is too small."""
    good = [dict(url=f"{base_url}/img{i}.png", caption=f"a picture number {i}", width=1200, height=1100)
            for i in range(len(GOOD_SIZES))]
    return good + [
        dict(url=f"{base_url}/ugly.png", caption="low score", width=1200, height=1100, aesthetic=4.0),
        dict(url=f"{base_url}/ugly2.png", caption="low score", width=1200, height=1100, aesthetic=5.0),
        dict(url=f"{base_url}/mark.png", caption="watermarked", width=1200, height=1100, pwatermark=0.9),
        dict(url=f"{base_url}/narrow.png", caption="narrow", width=500, height=1100),
        dict(good[0], caption="the same url again"),
        dict(url=f"{base_url}/gone1.png", caption="missing one", width=1200, height=1100),
        dict(url=f"{base_url}/gone2.png", caption="missing two", width=1200, height=1100),
        dict(url=f"{base_url}/page.png", caption="a web page", width=1200, height=1100),
        dict(url=f"{base_url}/tiny.png", caption="a thumbnail", width=1200, height=1100),
    ]


def served_files():
    files = {f"/img{i}.png": image_bytes(w, h, i) for i, (w, h) in enumerate(GOOD_SIZES)}
    files.update({"/page.png": b"<html>moved</html>", "/tiny.png": image_bytes(24, 20, 99)})
    return files


@pytest.mark.slow
def test_filter_download_cache_train_generate(tmp_path, capsys):
    seconds = {}
    with LoopbackImageServer(served_files(), max_requests=50) as server:
        write_laion_parquet(tmp_path / "laion_aes_v2.parquet", laion_rows(server.base_url))

        started = time.perf_counter()
        assert script_main("filter_laion_aesv2.py")(
            ["--input", str(tmp_path / "laion_aes_v2.parquet"), "--output_dir", str(tmp_path / "filtered"),
             "--min_width", "1024", "--min_height", "1024", "--min_aesthetic", "5.0", "--no_progress"]) == 0
        seconds["filter"] = time.perf_counter() - started
        summary = json.loads((tmp_path / "filtered" / "summary.json").read_text())
        assert (summary["rows_read"], summary["rows_kept"]) == (15, 10)
        removed = {rule: count for rule, count in summary["removed_by_rule"].items() if count}
        assert removed == {"width_too_small": 1, "aesthetic_too_low": 2, "pwatermark_too_high": 1, "url_duplicate": 1}

        started = time.perf_counter()
        assert script_main("download_laion_images.py")(
            ["--input", str(tmp_path / "filtered"), "--output_dir", str(tmp_path / "shards"), "--image_size", "32",
             "--threads", "4", "--samples_per_shard", "4", "--timeout", "5"]) == 0
        seconds["download"] = time.perf_counter() - started
        requests = server.requests
    download = json.loads((tmp_path / "shards" / "download_summary" / "summary.json").read_text())
    assert download["outcomes"] == {"downloaded": 6, "http_or_network": 2, "not_an_image": 1, "too_small": 1,
                                    "other_error": 0}
    assert requests == 10 and download["shards_finished"] == download["shards_expected"] == 3
    assert [pq.read_table(tmp_path / "shards" / f"0000{i}.parquet").num_rows for i in range(3)] == [4, 4, 2]

    started = time.perf_counter()  # two processes, each encoding every other record
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PADDLE_", "FLAGS_selected"))}
    command = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
               str(tmp_path / "cache_logs"), str(REPO / "scripts" / "build_latent_cache.py"),
               "--pretrained_model_name_or_path", str(TEACHER), "--data_path", str(tmp_path / "shards"),
               "--output_dir", str(tmp_path / "cache"), "--resolution", "32", "--max_sequence_length", "16",
               "--samples_per_shard", "2", "--batch_size", "2", "--no_progress"]
    launched = subprocess.run(command, env=dict(env, OMP_NUM_THREADS="1"), capture_output=True, timeout=300)
    logs = "".join(p.read_text(errors="replace")[-2000:] for p in (tmp_path / "cache_logs").glob("workerlog.*"))
    assert launched.returncode == 0, logs
    seconds["cache"] = time.perf_counter() - started
    cache = CachedDataset(tmp_path / "cache")
    assert len(cache) == 6 and cache.index["bad_records"] == {"good": 6, "bad": 0, "bad_by_reason": {}}
    assert cache[0]["latents"].shape == (16, 4, 4) and cache[0]["prompt_embeds"].shape[0] == 16
    assert [s["file"] for s in cache.shards] == ["shard-r000-00000.safetensors", "shard-r000-00001.safetensors",
                                                 "shard-r001-00000.safetensors", "shard-r001-00001.safetensors"]
    assert sorted(cache[i]["index"] for i in range(6)) == list(range(6))

    started = time.perf_counter()
    out = tmp_path / "lora"
    train = runpy.run_path(str(REPO / "examples" / "flux_lightning" / "train_flux_lightning_lora.py"),
                           run_name="train_flux_lightning_lora")["main"]
    result = train(["--method", "flux_lightning", "--pretrained_teacher_model", str(TEACHER), "--data_path",
                    str(tmp_path / "cache"), "--output_dir", str(out), "--max_train_steps", "2", "--lora_rank", "4",
                    "--learning_rate", "1e-2", "--train_batch_size", "2", "--dataloader_num_workers", "0",
                    "--num_euler_timesteps", "8", "--multiphase", "2", "--checkpointing_steps", "2",
                    "--max_sequence_length", "16", "--validation_steps", "0"])
    seconds["train"] = time.perf_counter() - started
    assert result.step == 2 and all(np.isfinite(v) for v in result.losses.values())
    position = ckpt.load_rank_state(out / "checkpoint-2", 0)["data"]
    assert position["sampler"]["position"] == 2 and position["bad_records"]["num_good"] == 4

    started = time.perf_counter()
    lora = out / "flux_lightning_lora.safetensors"
    common = ["--pretrained_model_name_or_path", str(TEACHER), "--prompt", "a picture number 3", "--height", "32",
              "--width", "32", "--seed", "5", "--max_sequence_length", "16"]
    with_lora = generate_cli.main(common + ["--path_to_lora", str(lora), "--output_dir", str(tmp_path / "gen")])
    seconds["generate"] = time.perf_counter() - started
    printed = capsys.readouterr().out
    assert f"LoRA {lora}" in printed and "'num_inference_steps': 2" in printed
    without = generate_cli.main(common + ["--step", "2", "--output_dir", str(tmp_path / "plain")])
    images = [np.asarray(Image.open(path)) for path in (with_lora[0], without[0])]
    assert images[0].shape == (32, 32, 3) and np.abs(images[0].astype(int) - images[1].astype(int)).max() > 0
    print("stage seconds:", {k: round(v, 1) for k, v in seconds.items()})
