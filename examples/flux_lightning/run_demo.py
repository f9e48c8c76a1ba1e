"""The CPU demo: distil the bundled tiny FLUX teacher to a 4-step student, then measure it (``demo/quick_start.py``).

    python examples/flux_lightning/run_demo.py [--quick] [--output_dir outputs/demo] ...   # or, with no TEACHER:
    bash scripts/train_flux_lightning.sh

The demo is example code next to this file (the ``demo`` package), not part of the installed library.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ppdiffusers_fast.command_line import quiet_third_party  # noqa: E402

quiet_third_party()  # before paddle is imported; --verbose keeps the third-party warnings
from demo.quick_start import main  # noqa: E402  (the demo package sits next to this file)

if __name__ == "__main__":
    main()
