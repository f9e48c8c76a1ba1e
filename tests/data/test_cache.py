"""Latent / embedding cache: the cached path gives the same training batches as encoding on the fly.

Real tiny encoders: a FLUX-style AutoencoderKL (16 latent channels, no quant convs), a CLIP text
model and a T5 encoder from small configs, with tokenizers built here (a sentencepiece model trained
on the captions; a byte-level CLIP vocabulary).
"""
import io
import json

import numpy as np
import paddle
import pytest
import sentencepiece as spm
from paddlenlp.transformers import CLIPTokenizer, T5Tokenizer
from PIL import Image
from ppdiffusers import AutoencoderKL
from ppdiffusers.transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from ppdiffusers_fast.data import (AspectRatioBuckets, CachedDataset, FluxTextEncoder, ImageCaptionDataset,
                                   ImageFolderReader, ResumableDistributedBatchSampler, RobustDataLoader,
                                   TrainTransform, VaeLatentEncoder, build_cache, build_image_caption_loader,
                                   collate_cached, encode_batch)
from ppdiffusers_fast.data.bad_records import BadRecordCounter
from ppdiffusers_fast.data.cache import every_record_once

CAPTIONS = ["a photo of a dog", "a red car on the street", "a cat sitting on a sofa", "mountains at sunset",
            "a bowl of fruit on a table", "an old wooden boat"]


def byte_characters():
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


@pytest.fixture(scope="module")
def text_encoder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizers")
    (folder / "corpus.txt").write_text("\n".join(CAPTIONS * 4))
    spm.SentencePieceTrainer.train(input=str(folder / "corpus.txt"), model_prefix=str(folder / "spiece"),
                                   vocab_size=48, hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   minloglevel=2)
    t5_tokenizer = T5Tokenizer(str(folder / "spiece.model"))
    characters = byte_characters()
    merges = ["d og</w>", "c a", "ca t</w>"]
    vocab = {c: i for i, c in enumerate(characters)}
    vocab.update({c + "</w>": len(characters) + i for i, c in enumerate(characters)})
    for merge in merges:
        vocab[merge.replace(" ", "")] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    clip_tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    paddle.seed(11)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                                        eos_token_id=vocab["<|endoftext|>"]))
    t5 = T5EncoderModel(T5Config(vocab_size=64, d_model=24, d_kv=8, d_ff=48, num_layers=1, num_heads=3))
    return FluxTextEncoder(clip_tokenizer, clip, t5_tokenizer, t5, max_sequence_length=12, clip_max_length=16)


@pytest.fixture(scope="module")
def image_encoder():
    paddle.seed(12)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
                        latent_channels=16, norm_num_groups=4, sample_size=32, use_quant_conv=False,
                        use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
    return VaeLatentEncoder(vae)


def write_images(folder, sizes, bad=()):
    folder.mkdir()
    for i, (width, height) in enumerate(sizes):
        pixels = np.random.default_rng(i).integers(0, 256, (height, width, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        (folder / f"{i:02d}.png").write_bytes(buffer.getvalue()[:40] if i in bad else buffer.getvalue())
        (folder / f"{i:02d}.txt").write_text(CAPTIONS[i % len(CAPTIONS)])
    return ImageFolderReader(folder)


def source_order_loader(reader, transform, batch_size=3, group_ids=None):
    """Every record once, in index order (for building a cache)."""
    return every_record_once(ImageCaptionDataset(reader, transform), batch_size, BadRecordCounter(max_bad_fraction=1.0),
                             group_ids=group_ids)


def as_numpy(batch):
    return {key: value.numpy() for key, value in batch.items()}


def test_cached_batches_equal_on_the_fly_batches(tmp_path, text_encoder, image_encoder):
    reader = write_images(tmp_path / "images", [(40, 32)] * 6)
    transform = TrainTransform(resolution=(16, 24))
    index = build_cache(source_order_loader(reader, transform), image_encoder, text_encoder, tmp_path / "cache",
                        samples_per_shard=4, metadata={"resolution": [16, 24]})
    assert index["num_samples"] == 6 and [s["num_samples"] for s in index["shards"]] == [4, 2]
    assert index["shards"][0]["latent_shape"] == [16, 8, 12]
    assert index["prompt_embeds_shape"] == [12, 24] and index["pooled_prompt_embeds_shape"] == [32]

    on_the_fly = build_image_caption_loader(reader, transform, batch_size=2, seed=4, num_replicas=1, rank=0)
    expected = [as_numpy(encode_batch(batch, image_encoder, text_encoder)) for batch in on_the_fly]
    cached = CachedDataset(tmp_path / "cache")
    sampler = ResumableDistributedBatchSampler(len(cached), 2, num_replicas=1, rank=0, seed=4)
    got = [as_numpy(b) for b in RobustDataLoader(cached, sampler, num_workers=2, collate_fn=collate_cached)]
    assert len(got) == len(expected) == 3
    for mine, theirs in zip(got, expected):
        assert mine["latents"].shape == (2, 16, 8, 12)
        assert mine["prompt_embeds"].shape == (2, 12, 24) and mine["pooled_prompt_embeds"].shape == (2, 32)
        np.testing.assert_array_equal(mine["indices"], theirs["indices"])
        for key in ("latents", "prompt_embeds", "pooled_prompt_embeds"):
            np.testing.assert_allclose(mine[key], theirs[key], rtol=0, atol=1e-5)
    # latents really are the normalised VAE posterior mode of the pixels
    pixels = paddle.to_tensor(ImageCaptionDataset(reader, transform)[0]["pixel_values"][None])
    mode = image_encoder.vae.encode(pixels).latent_dist.mode().numpy()
    np.testing.assert_allclose(cached[0]["latents"], (mode[0] - 0.1159) * 0.3611, atol=1e-5)


def test_cache_skips_bad_records_and_keeps_source_indices(tmp_path, text_encoder, image_encoder):
    reader = write_images(tmp_path / "images", [(24, 24)] * 5, bad=(1, 3))
    loader = source_order_loader(reader, TrainTransform(16), batch_size=2)
    index = build_cache(loader, image_encoder, text_encoder, tmp_path / "cache", dtype="float16",
                        bad_record_summary=None)
    assert loader.counter.bad_by_reason == {"undecodable_image": 2}
    cached = CachedDataset(tmp_path / "cache")
    assert len(cached) == 3 and [cached[i]["index"] for i in range(3)] == [0, 2, 4]
    assert index["dtype"] == "float16"
    fresh = encode_batch({"pixel_values": paddle.to_tensor(ImageCaptionDataset(reader, TrainTransform(16))[2]
                                                           ["pixel_values"][None]),
                          "captions": [CAPTIONS[2]], "indices": [2]}, image_encoder, text_encoder)
    np.testing.assert_allclose(cached[1]["latents"], fresh["latents"].numpy()[0], atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(cached[1]["prompt_embeds"], fresh["prompt_embeds"].numpy()[0], atol=2e-3, rtol=2e-3)


def test_bucketed_cache_splits_shards_by_latent_size(tmp_path, text_encoder, image_encoder):
    sizes = [(48, 24), (24, 48), (48, 24), (30, 30), (24, 48), (48, 24)]
    reader = write_images(tmp_path / "images", sizes)
    buckets = AspectRatioBuckets(sizes=[(16, 32), (24, 24), (32, 16)])
    transform = TrainTransform(buckets=buckets)
    group_ids = buckets.assign(np.array(sizes))
    build_cache(source_order_loader(reader, transform, batch_size=2, group_ids=group_ids), image_encoder,
                text_encoder, tmp_path / "cache", samples_per_shard=8)
    cached = CachedDataset(tmp_path / "cache")
    shapes = [tuple(s["latent_shape"]) for s in cached.shards]
    assert shapes == [(16, 8, 16), (16, 12, 12), (16, 16, 8)]  # one shard per latent size
    assert [cached[i]["index"] for i in range(len(cached))] == [0, 2, 5, 3, 1, 4]  # by bucket, then index
    sampler = ResumableDistributedBatchSampler(len(cached), 2, num_replicas=1, rank=0, seed=0, drop_last=False,
                                               group_ids=cached.group_ids())
    for batch in RobustDataLoader(cached, sampler, collate_fn=collate_cached):
        assert batch["latents"].shape[0] == 2  # stacking worked: one latent size per batch
        for source in batch["indices"].numpy().tolist():
            height, width = transform.target_size(*sizes[source])
            assert tuple(batch["latents"].shape[2:]) == (height // 2, width // 2)


def test_cache_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a latent cache folder"):
        CachedDataset(tmp_path)
    (tmp_path / "cache_index.json").write_text(json.dumps({"format": "ppdiffusers_fast.latent_cache", "version": 1,
                                                           "shards": [{"file": "shard-00000.safetensors",
                                                                       "num_samples": 1, "latent_shape": [16, 2, 2]}]}))
    with pytest.raises(FileNotFoundError, match="shard-00000.safetensors listed in .* is missing"):
        CachedDataset(tmp_path)
