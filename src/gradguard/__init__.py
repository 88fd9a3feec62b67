"""gradguard: stop deep-network training from blowing up.

The public API lives here; everything else is an implementation module.
"""

from gradguard.clip import (
    clip_grad_agc_,
    clip_grad_block_rms_,
    clip_grad_norm_,
    clip_grad_norm_per_tensor_,
    clip_grad_value_,
    clip_grads_with_norm_,
)
from gradguard.events import Event
from gradguard.guard import Guard, NonFiniteGradientError
from gradguard.monitor import Monitor
from gradguard.norms import get_total_norm, tensor_norms, total_norm, unit_norms
from gradguard.thresholds import AGC, AdaGC, Auto, AutoClip, Fixed, ThresholdPolicy, ZClip

__version__ = "0.1.0"

__all__ = [
    "AGC",
    "AdaGC",
    "Auto",
    "AutoClip",
    "Event",
    "Fixed",
    "Guard",
    "Monitor",
    "NonFiniteGradientError",
    "ThresholdPolicy",
    "ZClip",
    "__version__",
    "clip_grad_agc_",
    "clip_grad_block_rms_",
    "clip_grad_norm_",
    "clip_grad_norm_per_tensor_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "get_total_norm",
    "tensor_norms",
    "total_norm",
    "unit_norms",
]
