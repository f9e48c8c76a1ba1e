"""Print the parameter count of the Paddle FLUX transformer for the FLUX.1-dev config, allocating no weights.

    python scripts/count_flux_params.py [--config path/to/transformer/config.json] [--no-guidance]

The model is built under ``paddle.LazyGuard``: parameters exist as shapes only, so the 11.9B-parameter model
is counted in a second with no memory spent on it.
"""
import argparse
import json
import time

import paddle

from ppdiffusers_fast.models.transformer_flux import FluxTransformer2DModel, count_parameters


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="a transformer config.json (default: FLUX.1-dev's)")
    parser.add_argument("--no-guidance", action="store_true", help="FLUX.1-schnell: no guidance embedding")
    args = parser.parse_args()
    config = json.loads(open(args.config).read()) if args.config else {"guidance_embeds": not args.no_guidance}
    start = time.time()
    with paddle.LazyGuard():
        model = FluxTransformer2DModel.from_config(config)
    total = count_parameters(model)
    print(f"FluxTransformer2DModel parameters: {total} ({total / 1e9:.3f}B), counted in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
