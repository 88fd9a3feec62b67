"""gradguard.policies.registry: ``make_policy``, the one dispatch from ``clip=``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradguard.policies import AGC, AdaGC, Auto, AutoClip, Fixed, ZClip, make_policy


@pytest.mark.parametrize("clip", ["bogus", "", "fixed", "fixed:", "fixed:abc", "zclip2"])
def test_make_policy_bad_name(clip):
    with pytest.raises(ValueError, match="clip"):
        make_policy(clip)


@pytest.mark.parametrize("clip", [True, False, [1.0], b"zclip", torch.tensor(1.0), {}, Fixed])
def test_make_policy_bad_type(clip):
    with pytest.raises(TypeError, match="clip"):
        make_policy(clip)


@pytest.mark.parametrize("clip", [-1.0, math.nan, math.inf, "fixed:-1", "fixed:nan"])
def test_make_policy_bad_number(clip):
    with pytest.raises(ValueError, match=r"clip|max_norm"):
        make_policy(clip)


def test_make_policy_fixed_names_the_real_problem():
    with pytest.raises(ValueError, match=r"clip 'fixed:-1': max_norm must be >= 0"):
        make_policy("fixed:-1")
    with pytest.raises(ValueError, match=r"clip 'fixed:inf': max_norm must be finite"):
        make_policy("fixed:inf")


def test_numpy_scalars_are_accepted():
    assert make_policy(np.float32(0.5)).max_norm == 0.5
    assert AutoClip(window=np.int64(100)).window == 100
    assert type(AutoClip(window=np.int64(100)).window) is int


def test_make_policy_valid():
    assert make_policy(None) is None
    p = ZClip()
    assert make_policy(p) is p
    assert isinstance(make_policy(2), Fixed) and make_policy(2).max_norm == 2.0
    assert make_policy(0.5).max_norm == 0.5
    assert make_policy("fixed:0.25").max_norm == 0.25
    expected = {"auto": Auto, "autoclip": AutoClip, "zclip": ZClip, "adagc": AdaGC, "agc": AGC}
    for name, cls in expected.items():
        assert type(make_policy(name)) is cls
        assert type(make_policy(f"  {name.upper()} ")) is cls
