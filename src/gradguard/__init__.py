"""gradguard: stop deep-network training from blowing up.

The public API lives here; everything else is an implementation module.
"""

from gradguard._version import __version__
from gradguard.clip import (
    clip_grad_agc_,
    clip_grad_block_rms_,
    clip_grad_norm_,
    clip_grad_norm_per_tensor_,
    clip_grad_value_,
    clip_grads_with_norm_,
)
from gradguard.guard import Guard, NonFiniteGradientError
from gradguard.log.events import Event
from gradguard.monitor.monitor import Monitor
from gradguard.norms import get_total_norm, tensor_norms, total_norm, unit_norms
from gradguard.remedies import LRBackoff, Remedies, Rollback, TrainingDiverged
from gradguard.signal.activations import activation_gain
from gradguard.signal.initialize import InitReport, init_model
from gradguard.signal.probe import FixResult, ProbeReport, probe
from gradguard.thresholds import AGC, AdaGC, Auto, AutoClip, Fixed, ThresholdPolicy, ZClip

__all__ = [
    "AGC",
    "AdaGC",
    "Auto",
    "AutoClip",
    "Event",
    "FixResult",
    "Fixed",
    "Guard",
    "InitReport",
    "LRBackoff",
    "Monitor",
    "NonFiniteGradientError",
    "ProbeReport",
    "Remedies",
    "Rollback",
    "ThresholdPolicy",
    "TrainingDiverged",
    "ZClip",
    "__version__",
    "activation_gain",
    "clip_grad_agc_",
    "clip_grad_block_rms_",
    "clip_grad_norm_",
    "clip_grad_norm_per_tensor_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "get_total_norm",
    "init_model",
    "probe",
    "tensor_norms",
    "total_norm",
    "unit_norms",
]
