"""Generate images with FLUX and a few-step FLUX-Lightning LoRA, optionally compiled.

    python examples/flux_lightning/text_to_image_generation_flux_lightning.py \
        --pretrained_model_name_or_path /path/to/FLUX.1-dev --path_to_lora lora.safetensors \
        --prompt "a cat" --use_cinn

All flags: ``--help``; the logic lives in ``ppdiffusers_fast.inference.generate_cli``. With no
``--pretrained_model_name_or_path`` the bundled demo model next to this file is used, with the demo student the
quick start trained last (``outputs/demo/``) or the committed one (``demo/generation.py``).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ppdiffusers_fast.command_line import quiet_third_party, run_command  # noqa: E402

quiet_third_party()  # before paddle is imported; --verbose keeps the third-party warnings
from demo.generation import fill_demo_defaults  # noqa: E402  (the demo package sits next to this file)
from ppdiffusers_fast.inference.generate_cli import main  # noqa: E402

if __name__ == "__main__":
    run_command(lambda argv: main(argv, fill_defaults=fill_demo_defaults))
