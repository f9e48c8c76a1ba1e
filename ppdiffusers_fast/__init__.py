"""ppdiffusers_fast: few-step FLUX distillation (PCM, DMD2, FLUX-Lightning) and compiled inference in Paddle."""
from . import compat as _compat

_compat.apply()

__version__ = "0.1.0"
