"""What the framework integrations share: their arguments and the metrics they log.

Both callbacks take the Guard's own arguments (checked when the callback is built, not
when training starts) and write the same ``gradguard/...`` keys into the framework's
logs. The metrics come from two places that cost no extra device synchronisation per
step:

* an **interval record** of the Guard's monitor (:data:`gradguard.monitor.RECORD_KEYS`,
  plain host numbers, produced by the monitor's one transfer every ``log_every`` steps);
* the Guard's exact **counters** (:meth:`gradguard.Guard.stats`, one read, taken only
  where the framework logs).

The keys:

========================== ===========================================================
``gradguard/grad_norm``    pre-clip total gradient norm of the last step (a record: of
                           the interval's last finite step)
``gradguard/grad_norm_max`` largest finite pre-clip norm of the interval
``gradguard/grad_norm_mean`` mean finite pre-clip norm of the interval
``gradguard/clip_threshold`` the policy's threshold at the interval's last step (inf: no
                           clipping)
``gradguard/clip_rate``    clipped / finite steps of the interval
``gradguard/loss``         mean finite loss the Guard saw over the interval
``gradguard/spikes``       gradient-norm spikes flagged in the interval
``gradguard/steps``        Guard steps since the start (running count)
``gradguard/clipped``      clipped steps since the start (running count)
``gradguard/nonfinite``    steps with a NaN/inf gradient since the start (running count)
``gradguard/skipped``      skipped optimizer steps since the start (running count)
========================== ===========================================================

With an Adam-family optimizer (the monitor's signals of
:mod:`gradguard.monitor.optim_signals`, sampled at the interval's last step), also:

=================================== ==================================================
``gradguard/update_ratio_max``      largest per-layer ``||update|| / ||weight||``
``gradguard/update_ratio_median``   its median over layers
``gradguard/grad_v_rms_max``        largest per-layer ``rms(g / sqrt(v_hat))``: the
                                    gradient against Adam's second moment
``gradguard/grad_v_rms_median``     its median over layers
=================================== ==================================================

These keys are absent from an interval whose last step was not sampled, and with other
optimizers (no NaN columns in the framework's logs).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

from gradguard.guard.guard import NONFINITE_POLICIES, Guard
from gradguard.policies.registry import make_policy

__all__ = [
    "DEFAULT_CLIP",
    "PREFIX",
    "check_guard_arguments",
    "counter_metrics",
    "missing_extra",
    "record_metrics",
]

#: The prefix of every key the integrations log.
PREFIX = "gradguard/"

#: The callbacks' default policy: whatever :class:`~gradguard.Guard` defaults to.
DEFAULT_CLIP: Any = inspect.signature(Guard).parameters["clip"].default

# interval record key -> metric name (after PREFIX)
_RECORD_METRICS = {
    "pre_norm_last": "grad_norm",
    "pre_norm_max": "grad_norm_max",
    "pre_norm_mean": "grad_norm_mean",
    "threshold_last": "clip_threshold",
    "clip_rate": "clip_rate",
    "loss_mean": "loss",
    "spikes": "spikes",
}

# Adam-family signals: logged only when the record has them
_OPTIM_METRICS = ("update_ratio_max", "update_ratio_median", "grad_v_rms_max",
                  "grad_v_rms_median")


def check_guard_arguments(clip: Any, nonfinite: str, guard_kwargs: Mapping[str, Any],
                          owned: tuple[str, ...] = ()) -> None:
    """Fail when the callback is built, not at the start of training, on bad arguments.

    Args:
        clip: the Guard's ``clip`` (a policy spec).
        nonfinite: the Guard's ``nonfinite``.
        guard_kwargs: the other keyword arguments, passed to :class:`~gradguard.Guard`.
        owned: keyword arguments the callback sets itself (refused in ``guard_kwargs``).

    Raises:
        TypeError: an argument the Guard does not take, or one the callback sets.
        ValueError: a bad ``clip`` or ``nonfinite``.
    """
    for name in owned:
        if name in guard_kwargs:
            raise TypeError(f"GuardCallback sets {name!r} itself; got {name}="
                            f"{guard_kwargs[name]!r}")
    # the signature names an unknown keyword; the model is given at training start
    inspect.signature(Guard).bind(None, clip=clip, nonfinite=nonfinite, **guard_kwargs)
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
    make_policy(clip)  # raises on a bad spec


def record_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """The ``gradguard/...`` metrics of one interval record.

    Args:
        record: an interval record (keys :data:`gradguard.monitor.RECORD_KEYS`).

    Returns:
        Floats (NaN where the interval had no finite value), keyed with :data:`PREFIX`;
        the Adam-family signals only where the record has a finite value.
    """
    out = {}
    for key, name in _RECORD_METRICS.items():
        value = record.get(key)
        out[PREFIX + name] = math.nan if value is None else float(value)
    for key in _OPTIM_METRICS:
        value = record.get(key)
        if value is not None and math.isfinite(value):
            out[PREFIX + key] = float(value)
    return out


def counter_metrics(stats: Mapping[str, int]) -> dict[str, float]:
    """The running counts of :meth:`gradguard.Guard.stats` as ``gradguard/...`` metrics.

    Args:
        stats: ``guard.stats()``.

    Returns:
        ``gradguard/steps``, ``gradguard/clipped``, ``gradguard/nonfinite`` and
        ``gradguard/skipped`` as floats (what loggers expect).
    """
    return {PREFIX + name: float(stats[name])
            for name in ("steps", "clipped", "nonfinite", "skipped")}


def missing_extra(framework: str, extra: str, error: ImportError) -> ImportError:
    """The one-line error raised when a framework's optional extra is not installed.

    Args:
        framework: what is missing, as users call it (``"PyTorch Lightning"``).
        extra: the gradguard extra that installs it (``"lightning"``).
        error: the original ``ImportError``.

    Returns:
        An ``ImportError`` to raise ``from error``.
    """
    return ImportError(f"gradguard.integrations.{extra} needs {framework} ({error}): "
                       f'pip install "gradguard[{extra}]"')
