"""A bold-stroke style LoRA on the demo teacher, combined with the 4-step student LoRA (``demo/style_lora.py``).

    python examples/flux_lightning/run_style_lora.py --output_dir outputs/style_lora     # train + evaluate
    python examples/flux_lightning/run_style_lora.py --style_lora outputs/style_lora/style_lora.safetensors \
        --eval_seed 300000                                                               # the rows on new seeds

Writes ``style_lora.safetensors``, ``style_training.json``, ``style_results.{md,json}`` and ``style_grid.png``.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo.style_lora import main  # noqa: E402  (the demo package sits next to this file)

if __name__ == "__main__":
    main()
