"""The demo's ablation: every distillation method and step count on the tiny teacher (``demo/ablation.py``).

    python examples/flux_lightning/run_demo_ablation.py [--rows ...] [--output_dir outputs/demo_ablation] ...
    bash scripts/demo_ablation.sh                      # the same
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo.ablation import main  # noqa: E402  (the demo package sits next to this file)

if __name__ == "__main__":
    main()
