"""Losses as pure functions of tensors (no networks): consistency, flow matching, adversarial, DMD, reflow."""
from .adversarial import hinge_d_loss, hinge_g_loss, nonsaturating_g_loss
from .consistency import consistency_loss, l2_loss, pseudo_huber_loss
from .distribution_matching import dmd_direction, dmd_loss
from .flow_matching import flow_matching_loss
from .reflow import reflow_jump, reflow_loss, reflow_start

__all__ = [
    "consistency_loss", "pseudo_huber_loss", "l2_loss",
    "flow_matching_loss",
    "hinge_d_loss", "hinge_g_loss", "nonsaturating_g_loss",
    "dmd_direction", "dmd_loss",
    "reflow_start", "reflow_jump", "reflow_loss",
]
