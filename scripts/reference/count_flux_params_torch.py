"""Print diffusers' parameter count of FluxTransformer2DModel for the FLUX.1-dev config (no weights allocated).

Run in the PyTorch reference environment:
    /work/venv-ref/bin/python scripts/reference/count_flux_params_torch.py [--write tests/fixtures/transformer/flux1_dev_param_count.json]
The model is built on torch's "meta" device, so only shapes exist.
"""
import argparse
import json
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel

# transformer/config.json of FLUX.1-dev (FLUX.1-schnell differs only by guidance_embeds=False)
FLUX1_DEV_CONFIG = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
                        attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                        pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=[16, 56, 56])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", default=None, help="also write the count to this json file")
    args = parser.parse_args()
    counts = {}
    for name, guidance in (("flux1_dev", True), ("flux1_schnell", False)):
        with torch.device("meta"):
            model = FluxTransformer2DModel(**{**FLUX1_DEV_CONFIG, "guidance_embeds": guidance})
        counts[name] = sum(p.numel() for p in model.parameters())
        print(f"{name}: {counts[name]} parameters")
    if args.write:
        record = {"config": FLUX1_DEV_CONFIG, "diffusers_parameter_count": counts["flux1_dev"],
                  "diffusers_parameter_count_without_guidance": counts["flux1_schnell"]}
        Path(args.write).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
