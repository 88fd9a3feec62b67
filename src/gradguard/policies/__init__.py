"""Stateful clipping-threshold policies: sync-free, NaN-safe, checkpointable, O(1) per step.

The policies, one per module, all built on :mod:`gradguard.policies.base`:

* :class:`Fixed` -- a constant threshold (torch's ``clip_grad_norm_`` rule).
* :class:`AutoClip` -- a percentile of past norms (Seetharaman et al. 2020), over a
  bounded window.
* :class:`ZClip` -- EMA mean/variance of the norm and a z-score rule (Kumar et al. 2025).
* :class:`AdaGC` -- per-tensor thresholds from each tensor's own EMA (Wang et al. 2025).
* :class:`AGC` -- unit-wise, relative to the parameter norms (Brock et al. 2021).
* :class:`Auto` -- gradguard's default: a trust cap and a spike cap with SGD-type
  optimizers; a clip at the typical norm, ramped in, and a drop of spikes with Adam-family
  ones (measured on the stability benchmark's SGD and Transformer tasks).

Use :func:`make_policy` to build one from a name or a float.
"""

from gradguard.policies.adagc import AdaGC
from gradguard.policies.agc import AGC
from gradguard.policies.auto import Auto, second_moment_decay, sgd_effective_lr
from gradguard.policies.autoclip import AutoClip
from gradguard.policies.base import GRANULARITIES, StepNorms, ThresholdPolicy
from gradguard.policies.fixed import Fixed
from gradguard.policies.registry import POLICIES, make_policy
from gradguard.policies.zclip import ZClip

__all__ = [
    "AGC",
    "GRANULARITIES",
    "POLICIES",
    "AdaGC",
    "Auto",
    "AutoClip",
    "Fixed",
    "StepNorms",
    "ThresholdPolicy",
    "ZClip",
    "make_policy",
    "second_moment_decay",
    "sgd_effective_lr",
]
