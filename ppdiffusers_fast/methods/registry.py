"""Build a distillation method by name from the typed config sections (what the training script calls).

    method = build_method(config.run.method, FluxDenoiser(transformer), lora_config, config,
                          teacher_guidance=config.model.teacher_guidance, unconditional=uncond)

``config`` is any object with the sections the method reads as attributes: ``schedule`` (``FewStepSchedule``:
N, K, guidance) always; ``pcm`` (``PCMConfig``) for ``pcm`` and ``flux_lightning``; ``adversarial``, ``dmd``,
``reflow`` for ``flux_lightning``; ``adversarial``, ``dmd``, ``dmd2`` for ``dmd2``.
``METHOD_USES`` names the sections each method reads (the training command line refuses the flags of the
others); ``METHOD_SECTIONS`` lists the section classes for ``training.config.TrainConfig`` (field names are
unique across sections, so each field is one command-line flag).
"""
from typing import Optional

from .adversarial import AdversarialConfig
from .base import DistillationMethod, FewStepSchedule
from .denoiser import FluxCondition, FluxDenoiser
from .distribution_matching import DistributionMatchingConfig
from .dmd2 import DMD2, DMD2Config
from .flux_lightning import FluxLightning
from .pcm import PCM, PCMConfig
from .reflow import ReflowConfig

__all__ = ["METHODS", "METHOD_SECTIONS", "METHOD_USES", "METHOD_IGNORES", "build_method"]

METHODS = ("pcm", "dmd2", "flux_lightning")
METHOD_SECTIONS = {"schedule": FewStepSchedule, "pcm": PCMConfig, "adversarial": AdversarialConfig,
                   "dmd": DistributionMatchingConfig, "reflow": ReflowConfig, "dmd2": DMD2Config}
# the method sections each method reads
METHOD_USES = {"pcm": ("schedule", "pcm"), "flux_lightning": ("schedule", "pcm", "adversarial", "dmd", "reflow"),
               "dmd2": ("schedule", "adversarial", "dmd", "dmd2")}
# flags of a section a method reads that this method still does not read (refused by name when given)
METHOD_IGNORES = {"dmd2": ("adv_weight", "adv_alternate", "dmd_weight")}


def _sections(name: str, config):
    missing = [section for section in METHOD_USES[name] if getattr(config, section, None) is None]
    if missing:
        raise ValueError(f"--method {name} needs the config sections {missing}, which the config lacks "
                         f"(add methods.registry.METHOD_SECTIONS to the training config)")
    return {section: getattr(config, section) for section in METHOD_USES[name]}


def build_method(name: str, denoiser: FluxDenoiser, lora_config, config, teacher_guidance: str = "auto",
                 unconditional: Optional[FluxCondition] = None) -> DistillationMethod:
    """The method ``name`` (one of ``METHODS``) on ``denoiser``, with adapters of shape ``lora_config``."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {METHODS}")
    sections = _sections(name, config)
    if name == "dmd2":
        return DMD2(denoiser, lora_config, sections["schedule"], sections["dmd"], sections["adversarial"],
                    sections["dmd2"], teacher_guidance, unconditional)
    pcm = PCM(denoiser, lora_config, sections["schedule"], sections["pcm"], teacher_guidance, unconditional)
    if name == "pcm":
        return pcm
    return FluxLightning(pcm, sections["adversarial"], sections["dmd"], sections["reflow"], lora_config)
