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
from gradguard.norms import get_total_norm, tensor_norms, total_norm, unit_norms

__version__ = "0.1.0"

__all__ = [
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
