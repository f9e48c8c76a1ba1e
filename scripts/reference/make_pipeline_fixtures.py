"""Build the end-to-end FLUX pipeline fixtures with the PyTorch reference (diffusers ``FluxPipeline``).

Run in the PyTorch reference environment (torch, diffusers, transformers, sentencepiece):

    /work/venv-ref/bin/python scripts/reference/make_pipeline_fixtures.py

Writes ``tests/fixtures/pipeline/``:

- ``tiny_flux/``: a tiny FLUX pipeline saved with ``save_pretrained`` in the FLUX.1-dev folder layout
  (``model_index.json``, ``transformer/``, ``vae/``, ``text_encoder/``, ``text_encoder_2/``,
  ``tokenizer/``, ``tokenizer_2/``, ``scheduler/``), every model a few thousand parameters.
  The CLIP text model is the projection-free ``CLIPTextModel`` whose pooled output (the hidden state at
  the end-of-text token) conditions FLUX; the VAE has the FLUX configuration (16 latent channels, no
  quant convs, shift and scaling factors) with four levels, so that one latent pixel is 8x8 image
  pixels and one packed token 16x16, as in FLUX.1.
- ``run_<name>.npz`` + ``runs.json``: for each reference run, the fixed initial (packed) latents, the
  token ids and text embeddings, the scheduler's sigmas and timesteps, the latents after every step and
  the decoded image (``output_type="np"``, values in [0, 1]); ``runs.json`` holds the call arguments.

Tokenizers are built on the fly: a CLIP byte-level BPE from a small ``vocab.json`` / ``merges.txt`` and a
T5 sentencepiece unigram model trained on a few sentences.
"""
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

OUT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "pipeline"
SENTENCES = [
    "a photo of a cat sitting on a red chair",
    "a painting of a lighthouse by the sea at night",
    "an astronaut riding a horse on the moon",
    "a bowl of fruit on a wooden table",
    "a small dog running in the green grass",
    "the city skyline under a stormy sky",
    "a watercolor of mountains and a river",
    "portrait of an old man with a hat",
]
# Call arguments of the reference runs (the Paddle tests read them back from runs.json).
RUNS = {
    "single": dict(prompt="a photo of a cat sitting on a red chair", height=64, width=48,
                   num_inference_steps=4, guidance_scale=3.5, max_sequence_length=16,
                   num_images_per_prompt=1),
    "batch_true_cfg": dict(prompt=["an astronaut riding a horse on the moon", "a bowl of fruit"],
                           negative_prompt=["blurry", "a dog"], true_cfg_scale=2.0, height=32, width=64,
                           num_inference_steps=3, guidance_scale=2.0, max_sequence_length=16,
                           num_images_per_prompt=2),
}


def bytes_to_unicode():
    """The byte -> printable character table of GPT-2 / CLIP byte-level BPE (256 entries)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, [chr(c) for c in chars]))


def build_clip_tokenizer(folder):
    """A CLIP BPE tokenizer: 256 byte characters, the same with ``</w>``, merges learned greedily from
    SENTENCES, then ``<|startoftext|>`` and ``<|endoftext|>`` last (so that end-of-text has the largest id,
    which CLIP's legacy pooling, ``argmax(input_ids)``, relies on, as in CLIP ViT-L/14)."""
    base = sorted(set(bytes_to_unicode().values()))
    vocab = base + [c + "</w>" for c in base]
    words = [list(w[:-1]) + [w[-1] + "</w>"] for s in SENTENCES for w in s.split()]
    merges = []
    for _ in range(40):
        counts = {}
        for w in words:
            for a, b in zip(w, w[1:]):
                counts[(a, b)] = counts.get((a, b), 0) + 1
        if not counts:
            break
        (a, b), n = max(counts.items(), key=lambda kv: (kv[1], kv[0]))
        if n < 2:
            break
        merges.append(f"{a} {b}")
        vocab.append(a + b)
        new_words = []
        for w in words:
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words.append(out)
        words = new_words
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>")
    tok.model_max_length = 77
    return tok


def build_t5_tokenizer(folder):
    """A T5 sentencepiece unigram tokenizer trained on SENTENCES (pad 0, eos 1, unk 2, no bos)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SENTENCES * 4), model_writer=model, vocab_size=80,
                                   hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   model_type="unigram", character_coverage=1.0)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(model.getvalue())
    return T5TokenizerFast(vocab_file=str(folder / "spiece.model"), extra_ids=4, legacy=True,
                           add_prefix_space=True)


def build_models(clip_tok, t5_tok):
    torch.manual_seed(0)
    clip_vocab = len(clip_tok)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=clip_vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32,
        bos_token_id=clip_vocab - 2, eos_token_id=2, pad_token_id=1))
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, dropout_rate=0.0, is_encoder_decoder=False, use_cache=False))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[8, 8, 16, 16], layers_per_block=1,
        latent_channels=16, norm_num_groups=4, sample_size=64, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=[4, 4, 8])
    # Default init leaves the output near zero; widen the weights so every stage moves the image.
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.15)
            elif "norm" not in name:
                p.normal_(0.0, 0.05)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    return dict(text_encoder=text_encoder, text_encoder_2=text_encoder_2, vae=vae, transformer=transformer,
                scheduler=scheduler)


def token_ids(pipe, prompts, max_sequence_length):
    clip_ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer_max_length,
                              truncation=True, return_tensors="pt").input_ids
    t5_ids = pipe.tokenizer_2(prompts, padding="max_length", max_length=max_sequence_length, truncation=True,
                              return_tensors="pt").input_ids
    return clip_ids.numpy(), t5_ids.numpy()


def reference_run(pipe, name, kwargs):
    prompts = [kwargs["prompt"]] if isinstance(kwargs["prompt"], str) else list(kwargs["prompt"])
    batch = len(prompts) * kwargs["num_images_per_prompt"]
    h, w = kwargs["height"] // 16, kwargs["width"] // 16
    gen = torch.Generator().manual_seed(1234)
    latents = torch.randn(batch, 16, 2 * h, 2 * w, generator=gen)
    packed = latents.view(batch, 16, h, 2, w, 2).permute(0, 2, 4, 1, 3, 5).reshape(batch, h * w, 64)
    steps = []

    def keep(_pipe, _i, _t, tensors):
        steps.append(tensors["latents"].detach().numpy().copy())
        return {}

    with torch.no_grad():
        out = pipe(**kwargs, latents=packed.clone(), output_type="np", callback_on_step_end=keep)
        prompt_embeds, pooled, _ = pipe.encode_prompt(prompts, prompt_2=None,
                                                      max_sequence_length=kwargs["max_sequence_length"])
    clip_ids, t5_ids = token_ids(pipe, prompts, kwargs["max_sequence_length"])
    arrays = dict(latents=packed.numpy(), clip_input_ids=clip_ids, t5_input_ids=t5_ids,
                  pooled_prompt_embeds=pooled.numpy(), prompt_embeds=prompt_embeds.numpy(),
                  sigmas=pipe.scheduler.sigmas.numpy(), timesteps=pipe.scheduler.timesteps.numpy(),
                  step_latents=np.stack(steps), image=out.images.astype(np.float32))
    if "negative_prompt" in kwargs:
        neg_ids = token_ids(pipe, list(kwargs["negative_prompt"]), kwargs["max_sequence_length"])
        arrays.update(negative_clip_input_ids=neg_ids[0], negative_t5_input_ids=neg_ids[1])
    np.savez_compressed(OUT / f"run_{name}.npz", **arrays)
    print(f"{name}: image {out.images.shape} range [{out.images.min():.3f}, {out.images.max():.3f}] "
          f"std {out.images.std():.3f}, sigmas {np.round(arrays['sigmas'], 4).tolist()}")


def check_clip_keys(folder):
    """transformers >= 5 drops the ``text_model.`` prefix of a plain CLIP text model; ours must have it."""
    from safetensors.numpy import load_file

    keys = list(load_file(str(folder / "text_encoder" / "model.safetensors")).keys())
    assert all(k.startswith("text_model.") for k in keys), f"unexpected CLIP keys: {keys[:3]}"


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        clip_tok = build_clip_tokenizer(Path(tmp) / "clip")
        t5_tok = build_t5_tokenizer(Path(tmp) / "t5")
        pipe = FluxPipeline(tokenizer=clip_tok, tokenizer_2=t5_tok, **build_models(clip_tok, t5_tok))
        folder = OUT / "tiny_flux"
        pipe.save_pretrained(str(folder), safe_serialization=True)  # tokenizer files still exist here
    check_clip_keys(folder)
    # The CLIP tokenizer files are written by the slow tokenizer; drop anything not in the FLUX.1-dev layout.
    for extra in folder.glob("**/added_tokens.json"):
        extra.unlink()
    reloaded = FluxPipeline.from_pretrained(str(folder))
    reloaded.set_progress_bar_config(disable=True)
    for name, kwargs in RUNS.items():
        reference_run(reloaded, name, kwargs)
    (OUT / "runs.json").write_text(json.dumps(RUNS, indent=1) + "\n")
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"wrote {OUT} ({total / 1e6:.2f} MB)")
    for f in sorted(OUT.rglob("*")):
        if f.is_file():
            print(f"  {f.relative_to(OUT)}  {f.stat().st_size} B")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
