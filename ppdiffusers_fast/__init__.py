"""ppdiffusers_fast: few-step FLUX distillation (PCM, DMD2, FLUX-Lightning) and compiled inference in Paddle."""
__version__ = "0.1.0"
