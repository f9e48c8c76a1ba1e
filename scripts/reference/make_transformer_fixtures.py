"""Write the FLUX transformer parity fixtures from diffusers (PyTorch, CPU).

Run in the PyTorch reference environment (torch + diffusers):
    /work/venv-ref/bin/python scripts/reference/make_transformer_fixtures.py [--out tests/fixtures/transformer]

For two tiny configs (guidance embedding on and off; 2 double + 2 single blocks) it writes:
    <name>/transformer/            diffusers save_pretrained folder, fp32, sharded (index json + several files)
    <name>/transformer_bf16/       the same weights in bfloat16, one file (guidance config only)
    <name>/io.npz                  inputs (batch 2, 3x5 packed latent grid, 7 text tokens), the output sample,
                                   the image tokens after every block (forward hooks), and, for the bf16 folder,
                                   the output of the bf16-rounded weights computed in fp32, and the float32
                                   sinusoidal timestep frequencies torch computed (to separate exp's last bit
                                   from model differences).
All parameters (norm weights included) are drawn at random so that every weight matters.
"""
import argparse
import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from diffusers import FluxTransformer2DModel

TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
LATENT_ROWS, LATENT_COLS, TEXT_LEN, BATCH = 3, 5, 7, 2


def randomize(model, generator):
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.15
            base = 1.0 if name.endswith("norm_q.weight") or name.endswith("norm_k.weight") \
                or "norm_added" in name else 0.0
            param.copy_(base + noise)


def make_inputs(generator, guidance_embeds):
    img_ids = torch.zeros(LATENT_ROWS, LATENT_COLS, 3)
    img_ids[..., 1] = torch.arange(LATENT_ROWS)[:, None]
    img_ids[..., 2] = torch.arange(LATENT_COLS)[None, :]
    img_ids = img_ids.reshape(-1, 3)
    txt_ids = torch.zeros(TEXT_LEN, 3)
    txt_ids[:, 0] = torch.arange(TEXT_LEN) % 3  # non-zero text positions exercise the first rope axis
    return dict(
        hidden_states=torch.randn(BATCH, LATENT_ROWS * LATENT_COLS, TINY["in_channels"], generator=generator),
        encoder_hidden_states=torch.randn(BATCH, TEXT_LEN, TINY["joint_attention_dim"], generator=generator),
        pooled_projections=torch.randn(BATCH, TINY["pooled_projection_dim"], generator=generator),
        timestep=torch.tensor([0.3, 0.85]),
        img_ids=img_ids,
        txt_ids=txt_ids,
        guidance=torch.tensor([3.5, 5.0]) if guidance_embeds else None,
    )


def reference_time_frequencies(num_channels=256, max_period=10000):
    """The float32 frequencies of diffusers' ``get_timestep_embedding`` (same expression, same torch exp)."""
    half = num_channels // 2
    exponent = -math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32)
    return torch.exp(exponent / half).numpy()


def run_with_hooks(model, inputs):
    features = []
    hooks = [blk.register_forward_hook(lambda mod, args, out: features.append(out[1].detach().clone()))
             for blk in list(model.transformer_blocks) + list(model.single_transformer_blocks)]
    with torch.no_grad():
        sample = model(**inputs, return_dict=False)[0]
    for hook in hooks:
        hook.remove()
    return sample, features


def build_case(out_dir, name, guidance_embeds, seed, with_bf16):
    generator = torch.Generator().manual_seed(seed)
    model = FluxTransformer2DModel(guidance_embeds=guidance_embeds, **TINY).eval()
    randomize(model, generator)
    inputs = make_inputs(generator, guidance_embeds)
    sample, features = run_with_hooks(model, inputs)

    case = out_dir / name
    if case.exists():
        shutil.rmtree(case)
    model.save_pretrained(case / "transformer", safe_serialization=True, max_shard_size="150KB")
    index = case / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    assert index.exists(), "expected a sharded save with an index json"

    arrays = {k: v.numpy() for k, v in inputs.items() if v is not None}
    arrays["sample"] = sample.numpy()
    arrays["block_features"] = torch.stack(features).numpy()  # [num_blocks, B, L_img, C]
    arrays["time_frequencies"] = reference_time_frequencies()
    if with_bf16:
        model_bf16 = FluxTransformer2DModel(guidance_embeds=guidance_embeds, **TINY).eval()
        model_bf16.load_state_dict(model.state_dict())
        model_bf16.to(torch.bfloat16).save_pretrained(case / "transformer_bf16", safe_serialization=True)
        model_bf16.float()  # bf16-rounded weights, fp32 compute
        with torch.no_grad():
            arrays["sample_bf16_weights"] = model_bf16(**inputs, return_dict=False)[0].numpy()
    np.savez(case / "io.npz", **arrays)
    shards = sorted(p.name for p in (case / "transformer").glob("*.safetensors"))
    print(f"{name}: sample {list(sample.shape)}, {len(features)} block features, shards {shards}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "tests/fixtures/transformer"))
    args = parser.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    build_case(out_dir, "tiny_guidance", guidance_embeds=True, seed=1, with_bf16=True)
    build_case(out_dir, "tiny_no_guidance", guidance_embeds=False, seed=2, with_bf16=False)
    (out_dir / "tiny_config.json").write_text(json.dumps(TINY, indent=2) + "\n")
    total = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    print(f"fixture folder {out_dir}: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
