"""Generate images with FLUX and a few-step FLUX-Lightning LoRA, optionally compiled.

    python examples/flux_lightning/text_to_image_generation_flux_lightning.py \
        --pretrained_model_name_or_path /path/to/FLUX.1-dev --path_to_lora lora.safetensors \
        --prompt "a cat" --step 4 --use_cinn

All flags: ``--help``; the logic lives in ``ppdiffusers_fast.inference.generate_cli``.
"""
from ppdiffusers_fast.inference.generate_cli import main

if __name__ == "__main__":
    main()
