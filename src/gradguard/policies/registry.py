"""One dispatch from what ``Guard(clip=...)`` accepts to a policy (timm's ``dispatch_clip_grad``
idea): a float, a policy name, ``"fixed:<t>"``, a policy object or ``None``.

It lives apart from :mod:`gradguard.policies.base` because it names every policy, and every
policy imports the base.
"""

from __future__ import annotations

import numbers

from gradguard.policies.adagc import AdaGC
from gradguard.policies.agc import AGC
from gradguard.policies.auto import Auto
from gradguard.policies.autoclip import AutoClip
from gradguard.policies.base import ThresholdPolicy
from gradguard.policies.fixed import Fixed
from gradguard.policies.zclip import ZClip

__all__ = ["POLICIES", "make_policy"]

#: The policies by name, built with their defaults (a fixed threshold is a number or
#: ``"fixed:<t>"``).
POLICIES: dict[str, type[ThresholdPolicy]] = {
    "auto": Auto,
    "autoclip": AutoClip,
    "zclip": ZClip,
    "adagc": AdaGC,
    "agc": AGC,
}


def make_policy(clip: float | str | ThresholdPolicy | None) -> ThresholdPolicy | None:
    """Build a policy from what ``Guard(clip=...)`` accepts.

    Args:
        clip: a float (a fixed threshold), a policy name (``"auto"``, ``"autoclip"``,
            ``"zclip"``, ``"adagc"``, ``"agc"``, or ``"fixed:1.0"``), a policy object, or
            ``None`` (monitor only).

    Returns:
        The policy, or ``None``.

    Raises:
        ValueError: for an unknown name; TypeError for anything else.

    Example:
        >>> from gradguard.policies import make_policy
        >>> make_policy("fixed:0.5")
        Fixed(max_norm=0.5)
    """
    if clip is None or isinstance(clip, ThresholdPolicy):
        return clip
    if isinstance(clip, bool):
        raise TypeError(f"clip must be a float, a policy name or a policy, got {clip!r}")
    if isinstance(clip, numbers.Real):
        return Fixed(clip)  # type: ignore[arg-type]
    if isinstance(clip, str):
        name = clip.strip().lower()
        if name.startswith("fixed:"):
            try:
                value = float(name.split(":", 1)[1])
            except ValueError:
                raise ValueError(f"clip {clip!r}: expected 'fixed:<number>'") from None
            try:
                return Fixed(value)
            except ValueError as err:
                raise ValueError(f"clip {clip!r}: {err}") from None
        if name in POLICIES:
            return POLICIES[name]()
        raise ValueError(
            f"unknown clip policy {clip!r}; expected a float, 'fixed:<t>' or one of "
            f"{sorted(POLICIES)}"
        )
    raise TypeError(f"clip must be a float, a policy name or a policy, got {clip!r}")
