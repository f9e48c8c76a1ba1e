"""Latent cache builder: every process's part, the index over all parts, bad records, resume after a kill,
and each cached sample equal to encoding that record directly with the teacher folder's encoders."""
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ppdiffusers_fast.data import CachedDataset, ImageCaptionDataset, ImageFolderReader, TrainTransform, encode_batch
from ppdiffusers_fast.data.cache_builder import CacheSettings, assemble_index, build_latent_cache, encode_part
from ppdiffusers_fast.data.datasets import collate_samples
from ppdiffusers_fast.data.encoders import VaeLatentEncoder
from ppdiffusers_fast.data.sources import load_text_encoder
from ppdiffusers_fast.models.flux_folder import load_vae

FIXTURES = Path(__file__).parents[1] / "fixtures"
BAD = (3, 6)  # cut-off image files


@pytest.fixture(scope="module")
def encoders():
    teacher = FIXTURES / "pipeline" / "tiny_flux"
    return VaeLatentEncoder(load_vae(teacher)), load_text_encoder(teacher, max_sequence_length=16)


def image_folder(root, count=9):
    root.mkdir()
    for i in range(count):
        pixels = np.random.default_rng(i).integers(0, 256, (40 + i, 48, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        (root / f"{i:02d}.png").write_bytes(buffer.getvalue()[:50] if i in BAD else buffer.getvalue())
        (root / f"{i:02d}.txt").write_text(f"picture number {i}")
    return ImageFolderReader(root)


def settings_for(reader, world_size=2):
    return CacheSettings(data_path="images", layout="image_folder", num_records=len(reader), resolution=32,
                         max_sequence_length=16, teacher="tiny_flux", world_size=world_size, samples_per_shard=2,
                         batch_size=2, max_bad_fraction=0.5, min_records=4)


class CountingEncoder:
    """Counts encoded images; raises after ``fail_after`` calls (a killed process)."""

    def __init__(self, encoder, fail_after=None):
        self.encoder, self.fail_after, self.calls, self.images = encoder, fail_after, 0, 0

    def __call__(self, pixels):
        if self.fail_after is not None and self.calls == self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        self.images += pixels.shape[0]
        return self.encoder(pixels)


def test_two_parts_make_one_cache_equal_to_direct_encoding(tmp_path, encoders):
    image_encoder, text_encoder = encoders
    reader = image_folder(tmp_path / "images")
    transform = TrainTransform(32)
    settings = settings_for(reader)
    out = tmp_path / "cache"
    encode_part(reader, transform, image_encoder, text_encoder, out, settings, rank=1, progress=False)
    # process 0 encodes its part, then (after the barrier) writes the index over both parts
    index = build_latent_cache(reader, transform, image_encoder, text_encoder, out, settings, rank=0, progress=False)
    assert index["num_samples"] == 7 and index["bad_records"] == {"good": 7, "bad": 2,
                                                                  "bad_by_reason": {"undecodable_image": 2}}
    # process 0 has records 0, 2, 4, 6, 8 (6 bad) in chunks of 2; process 1 has 1, 3, 5, 7 (3 bad)
    assert [s["file"] for s in index["shards"]] == [f"shard-r000-0000{i}.safetensors" for i in range(3)] + \
        [f"shard-r001-0000{i}.safetensors" for i in range(2)]
    assert [s["num_samples"] for s in index["shards"]] == [2, 1, 1, 1, 2]
    cached = CachedDataset(out)
    assert sorted(cached[i]["index"] for i in range(len(cached))) == [0, 1, 2, 4, 5, 7, 8]
    dataset = ImageCaptionDataset(reader, transform)
    for row in range(len(cached)):
        item = cached[row]
        direct = encode_batch(collate_samples([dataset[item["index"]]]), image_encoder, text_encoder)
        for key in ("latents", "prompt_embeds", "pooled_prompt_embeds"):
            np.testing.assert_allclose(item[key], direct[key].numpy()[0], rtol=0, atol=1e-5, err_msg=key)
    assert item["latents"].shape == (16, 4, 4)


def test_a_killed_part_resumes_after_its_last_shard(tmp_path, encoders):
    image_encoder, text_encoder = encoders
    reader = image_folder(tmp_path / "images")
    transform = TrainTransform(32)
    settings = settings_for(reader, world_size=1)
    reference = build_latent_cache(reader, transform, image_encoder, text_encoder, tmp_path / "whole", settings,
                                   progress=False)
    assert sum(f.stat().st_size for f in (tmp_path / "whole" / "logs" / "r000").rglob("*") if f.is_file()) > 0

    killed = CountingEncoder(image_encoder, fail_after=2)  # dies in the second chunk of two records
    with pytest.raises(KeyboardInterrupt):
        build_latent_cache(reader, transform, killed, text_encoder, tmp_path / "cache", settings, progress=False)
    progress = json.loads((tmp_path / "cache" / "progress-r000.json").read_text())
    assert progress["next"] == 4 and len(progress["shards"]) == 2  # two chunks of 2 records were committed
    assert not (tmp_path / "cache" / "cache_index.json").exists()

    again = CountingEncoder(image_encoder)
    index = build_latent_cache(reader, transform, again, text_encoder, tmp_path / "cache", settings, progress=False)
    assert again.images == 9 - 4 - 1  # the rest, less the bad record 6
    assert index["num_samples"] == reference["num_samples"] == 7
    assert index["bad_records"] == reference["bad_records"]
    whole, resumed = CachedDataset(tmp_path / "whole"), CachedDataset(tmp_path / "cache")
    for row in range(7):
        for key in ("latents", "prompt_embeds", "pooled_prompt_embeds", "index"):
            np.testing.assert_array_equal(whole[row][key], resumed[row][key])
    finished = CountingEncoder(image_encoder)
    build_latent_cache(reader, transform, finished, text_encoder, tmp_path / "cache", settings, progress=False)
    assert finished.images == 0  # a finished cache is left as it is


def test_other_settings_and_missing_parts_are_refused(tmp_path, encoders):
    image_encoder, text_encoder = encoders
    reader = image_folder(tmp_path / "images", count=2)
    settings = settings_for(reader)
    encode_part(reader, TrainTransform(32), image_encoder, text_encoder, tmp_path / "cache", settings, rank=0,
                progress=False)
    with pytest.raises(FileNotFoundError, match="progress-r001.json is missing: process 1"):
        assemble_index(tmp_path / "cache", settings)
    build_latent_cache(reader, TrainTransform(32), image_encoder, text_encoder, tmp_path / "c2", settings,
                       rank=1, progress=False)  # records the settings of this folder
    changed = settings_for(reader)
    changed.resolution = 64
    with pytest.raises(ValueError, match="resolution: 32 -> 64"):
        build_latent_cache(reader, TrainTransform(64), image_encoder, text_encoder, tmp_path / "c2", changed,
                           progress=False)


def test_script_with_single_files_writes_the_folder_cache(tmp_path):
    """scripts/build_latent_cache.py with --vae_file --clip_l_file --t5_file (the folder holding only tokenizers and
    configs) writes the same cache, bit for bit, as with the FLUX folder of the same weights; an incomplete set of
    files is refused naming the missing flags."""
    import runpy
    import shutil

    from ppdiffusers_fast.models import safetensors_io

    main = runpy.run_path(str(Path(__file__).parents[2] / "scripts" / "build_latent_cache.py"),
                          run_name="build_latent_cache")["main"]
    folder, files = FIXTURES / "pipeline" / "tiny_flux", FIXTURES / "single_file"
    tokenizers = tmp_path / "tokenizers"
    for sub in ("tokenizer", "tokenizer_2"):
        shutil.copytree(folder / sub, tokenizers / sub)
    for sub in ("vae", "text_encoder", "text_encoder_2"):
        (tokenizers / sub).mkdir()
        shutil.copy(folder / sub / "config.json", tokenizers / sub / "config.json")
    image_folder(tmp_path / "images", count=4)
    common = ["--data_path", str(tmp_path / "images"), "--resolution", "32", "--max_sequence_length", "16",
              "--batch_size", "2", "--samples_per_shard", "2", "--min_records", "4", "--max_bad_fraction", "0.5",
              "--no_progress"]
    single = ["--vae_file", str(files / "ae-tiny.safetensors"), "--clip_l_file", str(files / "clip_l-tiny.safetensors"),
              "--t5_file", str(files / "t5xxl-tiny.safetensors")]
    assert main(common + ["--pretrained_model_name_or_path", str(folder), "--output_dir", str(tmp_path / "a")]) == 0
    assert main(common + ["--pretrained_model_name_or_path", str(tokenizers), "--output_dir",
                          str(tmp_path / "b")] + single) == 0
    shards = sorted(p.name for p in (tmp_path / "a").glob("shard-*.safetensors"))
    assert shards and shards == sorted(p.name for p in (tmp_path / "b").glob("shard-*.safetensors"))
    for name in shards:
        a, b = safetensors_io.load_file(tmp_path / "a" / name), safetensors_io.load_file(tmp_path / "b" / name)
        assert sorted(a) == sorted(b)
        for key in a:
            assert np.array_equal(a[key], b[key]), (name, key)
    assert main(common + ["--pretrained_model_name_or_path", str(tokenizers), "--output_dir",
                          str(tmp_path / "c")] + single[:2]) == 2
