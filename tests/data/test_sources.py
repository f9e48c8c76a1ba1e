"""--data_path layouts: detection from what is on disk, the error for an unknown layout, the same images read
through every image layout, and training steps on tar shards and on an image folder."""
import base64
import io
import runpy
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from ppdiffusers_fast.data.sources import LAYOUTS, detect_path_layout, image_loader
from ppdiffusers_fast.training import checkpoint as ckpt

ENTRY_POINT = Path(__file__).parents[2] / "examples" / "flux_lightning" / "train_flux_lightning_lora.py"
CAPTIONS = [f"a red square number {i}" for i in range(4)]


def png(seed, size=(80, 72)):
    pixels = np.random.RandomState(seed).randint(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_base64_lines(folder):
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f'{i}\t{{"caption": "{c}"}}\t{base64.b64encode(png(i)).decode()}\n' for i, c in enumerate(CAPTIONS)]
    (folder / "part-0.txt").write_text("".join(lines))
    (folder / "filelist.txt").write_text("part-0.txt\n")
    return folder / "filelist.txt"


def write_image_folder(folder):
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    for i, caption in enumerate(CAPTIONS):
        place = folder / "sub" if i % 2 else folder
        (place / f"img{i}.png").write_bytes(png(i))
        (place / f"img{i}.txt").write_text(caption)
    return folder


def write_tar_shards(folder):
    """Two shards of two samples, as img2dataset names them."""
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(2):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as archive:
            for i in (2 * shard, 2 * shard + 1):
                for name, data in ((f"{shard:05d}{i:04d}.png", png(i)), (f"{shard:05d}{i:04d}.txt",
                                                                        CAPTIONS[i].encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    return folder


def test_each_layout_is_detected(tmp_path):
    file_list = write_base64_lines(tmp_path / "b64")
    assert detect_path_layout(tmp_path / "b64", file_list) == "base64_lines"
    assert detect_path_layout(write_image_folder(tmp_path / "images")) == "image_folder"
    assert detect_path_layout(write_tar_shards(tmp_path / "shards")) == "tar_shards"
    assert detect_path_layout(tmp_path / "shards" / "00000.tar") == "tar_shards"
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "cache_index.json").write_text("{}")
    assert detect_path_layout(tmp_path / "cache") == "cache"
    (tmp_path / "latents.safetensors").write_bytes(b"")
    assert detect_path_layout(tmp_path / "latents.safetensors") == "latent_file"


def test_unknown_layout_lists_every_layout(tmp_path):
    folder = tmp_path / "laion_1024"
    folder.mkdir()
    (folder / "part-00000.parquet").write_bytes(b"PAR1")
    (folder / "notes.md").write_text("x")
    with pytest.raises(ValueError) as error:
        detect_path_layout(folder)
    message = str(error.value)
    assert f"--data_path {folder} holds none of the training-data layouts (found: notes.md, part-00000.parquet)" \
        in message
    for name in ("latent cache", "latent file", "tar shards", "image folder", "base64 lines"):
        assert name in message
    assert "cache_index.json" in message and "<key>.txt" in message and "--file_list_path" in message
    assert "download_laion_images.py --input" in message  # parquet: URLs, not images
    (folder / "filelist.txt").write_text("part-00000.parquet\n")
    with pytest.raises(ValueError, match="lists parquet files: that is LAION metadata"):
        detect_path_layout(folder, folder / "filelist.txt")
    assert len(LAYOUTS) == 5


def one_pass(loader):
    items = []
    for batch in loader:
        sums = batch["pixel_values"].numpy().reshape(len(batch["captions"]), -1).sum(axis=1)
        items += [(caption, round(float(total), 2)) for caption, total in zip(batch["captions"], sums)]
    return sorted(items)


def test_every_image_layout_gives_the_same_samples(tmp_path):
    data = SimpleNamespace(resolution=32, center_crop=True, random_flip=False, train_batch_size=2,
                           dataloader_num_workers=0, file_list_path=None, data_path=None)
    passes = {}
    for layout, path, file_list in (("base64_lines", tmp_path / "b64", write_base64_lines(tmp_path / "b64")),
                                    ("image_folder", write_image_folder(tmp_path / "images"), None),
                                    ("tar_shards", write_tar_shards(tmp_path / "shards"), None)):
        data.data_path, data.file_list_path = str(path), file_list and str(file_list)
        passes[layout] = one_pass(image_loader(data, layout, seed=0, rank=0, world=1))
    assert [caption for caption, _ in passes["tar_shards"]] == CAPTIONS
    assert passes["base64_lines"] == passes["image_folder"] == passes["tar_shards"]


@pytest.mark.parametrize("layout", ["tar_shards", "image_folder"])
def test_training_steps_on_an_image_layout(tmp_path, layout, fixtures_dir):
    entry_point = runpy.run_path(str(ENTRY_POINT), run_name="train_flux_lightning_lora")["main"]
    data = write_tar_shards(tmp_path / "data") if layout == "tar_shards" else write_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    argv = ["--method", "pcm", "--pretrained_teacher_model", str(fixtures_dir / "pipeline" / "tiny_flux"),
            "--data_path", str(data), "--output_dir", str(out), "--resolution", "64", "--lora_rank", "2",
            "--max_train_steps", "2", "--dataloader_num_workers", "0", "--train_batch_size", "1",
            "--checkpointing_steps", "1", "--num_euler_timesteps", "8", "--multiphase", "2",
            "--max_sequence_length", "16", "--validation_steps", "0"]
    result = entry_point(argv)
    assert result.step == 2 and np.isfinite(result.losses["pcm"])
    assert (out / "pcm_lora.safetensors").is_file()
    state = ckpt.load_rank_state(out / "checkpoint-2", 0)["data"]
    assert state["bad_records"]["num_good"] == 2
    if layout == "tar_shards":  # the stream's position: two items of the first shard of the epoch's order
        assert sum(state["stream"]["consumed"].values()) == 2 and state["stream"]["epoch"] == 0
    else:
        assert state["sampler"]["position"] == 2


def test_training_from_single_files_equals_training_from_the_folder(tmp_path, fixtures_dir):
    """--transformer_file --vae_file --clip_l_file --t5_file, with --pretrained_teacher_model naming a folder that
    has only the tokenizers and config files, train on images encoded on the fly and give the same LoRA, bit for
    bit, as the FLUX folder that holds the same weights (tests/fixtures/single_file is written from it)."""
    import shutil

    from ppdiffusers_fast.models import safetensors_io

    entry_point = runpy.run_path(str(ENTRY_POINT), run_name="train_flux_lightning_lora")["main"]
    folder, files = fixtures_dir / "pipeline" / "tiny_flux", fixtures_dir / "single_file"
    tokenizers = tmp_path / "tokenizers"
    for sub in ("tokenizer", "tokenizer_2"):
        shutil.copytree(folder / sub, tokenizers / sub)
    for sub in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        (tokenizers / sub).mkdir()
        shutil.copy(folder / sub / "config.json", tokenizers / sub / "config.json")
    data = write_image_folder(tmp_path / "data")
    common = ["--method", "pcm", "--data_path", str(data), "--resolution", "64", "--lora_rank", "2",
              "--max_train_steps", "2", "--dataloader_num_workers", "0", "--train_batch_size", "1",
              "--num_euler_timesteps", "8", "--multiphase", "2", "--max_sequence_length", "16",
              "--validation_steps", "0", "--checkpointing_steps", "10"]
    entry_point(common + ["--pretrained_teacher_model", str(folder), "--output_dir", str(tmp_path / "folder")])
    entry_point(common + ["--pretrained_teacher_model", str(tokenizers), "--output_dir", str(tmp_path / "files"),
                          "--transformer_file", str(files / "flux1-tiny.safetensors"),
                          "--vae_file", str(files / "ae-tiny.safetensors"),
                          "--clip_l_file", str(files / "clip_l-tiny.safetensors"),
                          "--t5_file", str(files / "t5xxl-tiny.safetensors")])
    from_folder = safetensors_io.load_file(tmp_path / "folder" / "pcm_lora.safetensors")
    from_files = safetensors_io.load_file(tmp_path / "files" / "pcm_lora.safetensors")
    assert sorted(from_folder) == sorted(from_files) and len(from_folder) > 0
    for key, value in from_folder.items():
        assert np.array_equal(value, from_files[key]), key
    assert any(np.abs(value).max() > 0 for value in from_folder.values())  # the LoRA trained


def test_training_single_files_are_checked_before_loading(tmp_path, fixtures_dir):
    """A missing single-file flag, or a tokenizers' folder without tokenizer_2/, is a usage error naming it."""
    from ppdiffusers_fast.command_line import UsageError
    from ppdiffusers_fast.training.config import config_from_args
    from ppdiffusers_fast.training.launch import check_inputs

    files = fixtures_dir / "single_file"
    base = ["--data_path", str(write_image_folder(tmp_path / "data")), "--output_dir", str(tmp_path / "out"),
            "--transformer_file", str(files / "flux1-tiny.safetensors"), "--vae_file", str(files / "ae-tiny.safetensors")]
    with pytest.raises(UsageError, match=r"missing: --clip_l_file, --t5_file"):
        check_inputs(config_from_args(base + ["--pretrained_teacher_model", str(fixtures_dir / "pipeline" / "tiny_flux")]))
    (tmp_path / "only_clip" / "tokenizer").mkdir(parents=True)
    full = base + ["--clip_l_file", str(files / "clip_l-tiny.safetensors"), "--t5_file", str(files / "t5xxl-tiny.safetensors")]
    with pytest.raises(UsageError, match=r"tokenizer_2"):
        check_inputs(config_from_args(full + ["--pretrained_teacher_model", str(tmp_path / "only_clip")]))
