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
from gradguard.engine.norms import get_total_norm, tensor_norms, total_norm
from gradguard.engine.units import unit_norms
from gradguard.guard.guard import Guard
from gradguard.guard.remedies import LRBackoff, Remedies, Rollback, TrainingDiverged
from gradguard.guard.step import NonFiniteGradientError
from gradguard.guard.sync import register_nonfinite_hook
from gradguard.log.events import Event
from gradguard.monitor.monitor import Monitor
from gradguard.policies.adagc import AdaGC
from gradguard.policies.agc import AGC
from gradguard.policies.auto import Auto
from gradguard.policies.autoclip import AutoClip
from gradguard.policies.base import StepNorms, ThresholdPolicy
from gradguard.policies.fixed import Fixed
from gradguard.policies.registry import make_policy
from gradguard.policies.zclip import ZClip
from gradguard.signal.activations import activation_gain
from gradguard.signal.initialize import InitReport, init_model
from gradguard.signal.probe import FixResult, ProbeReport, probe

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
    "StepNorms",
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
    "make_policy",
    "probe",
    "register_nonfinite_hook",
    "tensor_norms",
    "total_norm",
    "unit_norms",
]
