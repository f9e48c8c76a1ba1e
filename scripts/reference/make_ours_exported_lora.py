"""Write the adapters that the PyTorch reference loads back (run in the Paddle environment).

    /work/venv/bin/python scripts/reference/make_ours_exported_lora.py

Needs ``tests/fixtures/lora/base/`` and ``kohya_adapter.safetensors`` from
``make_lora_fixtures.py reference``. Writes into ``tests/fixtures/lora/``:

- ``ours_adapter.safetensors``: an adapter on the default targets, rank 4, alpha 8, random nonzero A and B,
  in our format (with sampling metadata);
- ``ours_exported.safetensors``: the same adapter written by ``export_diffusers_lora``;
- ``ours_exported_mixed.safetensors``: the kohya fixture imported by ``import_lora`` (ranks 2 and 4, several
  alphas, fused projections split) and exported again, so diffusers must honour per-module scales.

Then run ``make_lora_fixtures.py ours`` in the PyTorch environment.
"""
from pathlib import Path

import numpy as np
import paddle

from ppdiffusers_fast.models.lora import LoraConfig, adapter_parameters, inject_lora
from ppdiffusers_fast.models.lora_io import export_diffusers_lora, import_lora, save_lora
from ppdiffusers_fast.models.weights import load_flux_transformer

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "lora"
SAMPLING = {"num_inference_steps": 4, "multiphase": 4, "num_euler_timesteps": 100, "guidance_scale": 3.5,
            "lora_scale": 1.0}


def main():
    model = load_flux_transformer(FIXTURES / "base")
    inject_lora(model, LoraConfig(rank=4, alpha=8.0), "ours")
    rng = np.random.default_rng(4)
    for param in adapter_parameters(model, "ours"):
        param.set_value(paddle.to_tensor(0.1 * rng.standard_normal(param.shape).astype("float32")))
    save_lora(model, "ours", FIXTURES / "ours_adapter.safetensors", sampling=SAMPLING)
    export_diffusers_lora(model, "ours", FIXTURES / "ours_exported.safetensors")

    mixed = load_flux_transformer(FIXTURES / "base")
    info = import_lora(mixed, FIXTURES / "kohya_adapter.safetensors", "kohya")
    export_diffusers_lora(mixed, "kohya", FIXTURES / "ours_exported_mixed.safetensors")
    print(f"ours: {len(adapter_parameters(model, 'ours')) // 2} modules; kohya import: {len(info['modules'])} "
          f"modules, ranks {sorted(set(info['ranks'].values()))}, alphas {sorted(set(info['alphas'].values()))}")


if __name__ == "__main__":
    main()
