"""gradguard.policies.base, across every policy: non-finite steps leave the statistics
untouched, bitwise ``state_dict`` resume, bounded state, hypothesis properties, no host
sync under ``FakeTensorMode``, constructor validation, checkpoint sanity checks."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

from gradguard.policies import (
    AGC,
    AdaGC,
    Auto,
    AutoClip,
    Fixed,
    StepNorms,
    ThresholdPolicy,
    ZClip,
    make_policy,
)
from policy_utils import (
    EPS,
    NAN,
    assert_bitwise,
    assert_same_run,
    f32,
    norm_sequence,
    norm_values,
    reals,
    run,
    save_load,
    state_of,
    tensor_norm_sequence,
    tensor_step,
    total_step,
)

NAN_POLICIES = {
    "fixed": (lambda: Fixed(1.0), 1),
    "auto": (Auto, 1),
    "autoclip": (lambda: AutoClip(10.0, window=64), 1),
    "zclip": (ZClip, 1),
    "adagc": (lambda: AdaGC(warmup_steps=50), 4),
}


def _nan_runs(name: str, bad: float, pos: int):
    factory, k = NAN_POLICIES[name]
    if k == 1:
        good = norm_sequence(199, seed=7, spikes=2, first_spike=120)
        steps = [total_step(g) for g in good]
        bad_step = total_step(bad)
        spike = total_step(f32(100 * float(np.median(good[-20:]))))
    else:
        seq = tensor_norm_sequence(199, [0.05, 0.1, 0.2, 0.3], seed=7, spikes=2,
                                   first_spike=120)
        steps = [tensor_step(ns) for ns in seq]
        bad_step = tensor_step([seq[pos][0], bad, seq[pos][2], seq[pos][3]])
        spike = tensor_step([f32(100 * seq[-1][0]), *seq[-1][1:]])
    with_bad = [*steps[:pos], bad_step, *steps[pos:], spike]
    without = [*steps, spike]
    a, b = factory(), factory()
    return a, run(a, with_bad, k), b, run(b, without, k)


@pytest.mark.parametrize("pos", [10, 100])
@pytest.mark.parametrize("bad", [NAN, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("name", list(NAN_POLICIES))
def test_nonfinite_step_leaves_statistics_untouched(name, bad, pos):
    a, out_a, b, out_b = _nan_runs(name, bad, pos)
    sa, sb = state_of(a), state_of(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert_bitwise(sa[key], sb[key])  # as if the step never happened
        if sa[key].is_floating_point():
            assert torch.isfinite(sa[key]).all(), key
    # identical coefficients before and after the bad step
    assert_same_run(out_a[:pos], out_b[:pos])
    assert_same_run(out_a[pos + 1:], out_b[pos:])
    # a 100x spike after the bad step is still clipped
    assert float(out_a[-1][0].min()) < 0.1


ROUNDTRIP_POLICIES = {
    "fixed": (lambda: Fixed(0.7), 1),
    "auto": (Auto, 1),
    "autoclip": (lambda: AutoClip(25.0, window=16), 1),
    "zclip": (lambda: ZClip(warmup_steps=10), 1),
    "zclip_max_norm": (lambda: ZClip(alpha=0.9, warmup_steps=10, max_norm=0.8), 1),
    "adagc": (lambda: AdaGC(warmup_steps=10), 3),
}


def _roundtrip_steps(k: int) -> list[StepNorms]:
    if k == 1:
        norms = norm_sequence(80, seed=11, first_spike=12)
        norms[3] = NAN  # a skipped step in the saved part
        return [total_step(g) for g in norms]
    seq = tensor_norm_sequence(80, [0.2, 0.5, 1.0], seed=11, first_spike=12)
    steps = [tensor_step(ns) for ns in seq]
    steps[3] = tensor_step([seq[3][0], math.inf, seq[3][2]])
    steps[7] = tensor_step([seq[7][0], 0.0, seq[7][2]], present=[True, False, True])
    return steps


@pytest.mark.parametrize("k", [5, 37])  # inside the warm-ups / after the ring buffer wrapped
@pytest.mark.parametrize("name", list(ROUNDTRIP_POLICIES))
def test_state_dict_resume_is_bitwise(name, k):
    factory, n = ROUNDTRIP_POLICIES[name]
    steps = _roundtrip_steps(n)
    reference = run(factory(), steps, n)

    first = factory()
    head = run(first, steps[:k], n)
    sd = first.state_dict()
    loaded = save_load(sd)
    assert loaded["name"] == first.name and loaded["config"] == first.config()

    for sdx, setup_first in [(sd, False), (loaded, False), (loaded, True)]:
        resumed = factory()
        if setup_first:
            resumed.setup(n, "cpu")
        resumed.load_state_dict(sdx)
        assert_same_run(head + run(resumed, steps[k:], n), reference)
    # the saved tensors were clones: continuing the original leaves them as they were
    assert_same_run(head + run(first, steps[k:], n), reference)
    for key, value in sd["state"].items():
        assert_bitwise(value, loaded["state"][key])


def test_state_dict_before_setup_round_trips():
    sd = ZClip().state_dict()
    assert sd["num_tensors"] is None and sd["state"] == {}
    fresh = ZClip()
    fresh.load_state_dict(save_load(sd))
    assert_same_run(run(fresh, [total_step(1.0)] * 30), run(ZClip(), [total_step(1.0)] * 30))


@pytest.mark.parametrize("name", ["zclip", "autoclip", "adagc", "auto"])
def test_loading_a_never_set_up_state_dict_resets_a_used_policy(name):
    used = make_policy(name)
    run(used, [tensor_step([1.0, 2.0])] * 30, num_tensors=2)
    used.load_state_dict(save_load(make_policy(name).state_dict()))
    steps = [tensor_step([float(i % 7 + 1), 50.0 if i == 25 else 2.0]) for i in range(40)]
    assert_same_run(run(used, steps, num_tensors=2), run(make_policy(name), steps, num_tensors=2))


@pytest.mark.parametrize("factory", [lambda: ZClip(warmup_steps=5),
                                     lambda: AdaGC(warmup_steps=5)], ids=["zclip", "adagc"])
def test_state_size_constant(factory):
    policy = factory()
    policy.setup(3, "cpu")
    step = tensor_step([0.1, 0.2, 0.3])
    policy.compute(step)
    before = {k: v.numel() for k, v in state_of(policy).items()}
    for _ in range(300):
        policy.compute(step)
    assert {k: v.numel() for k, v in state_of(policy).items()} == before


def _draw_policy(data, kind: str):
    if kind == "autoclip":
        return AutoClip(data.draw(reals(0.0, 100.0)), window=data.draw(st.integers(1, 20)))
    if kind == "zclip":
        return ZClip(alpha=data.draw(reals(0.0, 0.999)),
                     z_thresh=data.draw(reals(0.1, 5.0)),
                     warmup_steps=data.draw(st.integers(1, 5)),
                     max_norm=data.draw(st.none() | reals(0.0, 100.0)))
    if kind == "adagc":
        return AdaGC(rel=data.draw(reals(0.5, 2.0)), beta=data.draw(reals(0.0, 0.999)),
                     warmup_steps=data.draw(st.integers(0, 5)),
                     max_norm=data.draw(reals(0.0, 100.0)))
    return Auto()


@pytest.mark.parametrize("kind", ["autoclip", "zclip", "adagc", "auto"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_policy_properties(kind, data):
    policy = _draw_policy(data, kind)
    k = data.draw(st.integers(1, 4)) if kind == "adagc" else 1
    seq = data.draw(st.lists(st.lists(norm_values, min_size=k, max_size=k),
                             min_size=1, max_size=30))
    policy.setup(k, "cpu")
    for t, ns in enumerate(seq):
        step = tensor_step(ns) if k > 1 else total_step(ns[0])
        if t == len(seq) - 1 and kind != "auto":  # monotone in the norm at a given state
            factor = data.draw(reals(1.0, 100.0))
            bigger = [f32(x * factor) for x in ns]
            big = tensor_step(bigger) if k > 1 else total_step(bigger[0])
            other = copy.deepcopy(policy)
            # AdaGC: seen tensors only (one first seen now starts from its own norm)
            unseen = ~state_of(policy)["seen"] if kind == "adagc" else torch.tensor(False)
            c_big, _ = other.compute(big)
        coef, thr = policy.compute(step)
        assert not torch.isnan(coef).any(), (t, coef)
        assert ((coef >= 0) & (coef <= 1)).all(), (t, coef)
        assert (coef[torch.isnan(thr)] == 1).all()  # no threshold, no clip
        if kind == "adagc" and t >= policy.warmup_steps:
            norm = step.norms  # per tensor
        else:
            norm = step.total.expand_as(coef)  # global (AdaGC's warm-up: on the total)
        below = (norm.double() + EPS <= thr.double()) & ~torch.isnan(thr)
        assert (coef[below] == 1).all(), (t, norm, thr, coef)
    if kind != "auto":
        slack = 1e-5
        if kind == "autoclip":  # the current norm is in its own percentile: q(g)/g does not
            # increase, but q(g)/(g + 1e-6) may, by up to a factor 1 + 1e-6/g
            slack += float(coef) * EPS / max(float(step.total), 1e-30)
        assert ((c_big <= coef + slack) | unseen).all(), (coef, c_big)


FAKE_POLICIES = {
    "fixed": (lambda: Fixed(1.0), 1),
    "auto": (Auto, 1),
    "autoclip": (lambda: AutoClip(10.0, window=8), 1),
    "zclip": (lambda: ZClip(warmup_steps=3), 1),
    "zclip_max_norm": (lambda: ZClip(warmup_steps=3, max_norm=1.0), 1),
    "adagc": (lambda: AdaGC(warmup_steps=3), 4),
}


def test_fake_mode_detects_host_reads():
    with FakeTensorMode():
        x = torch.ones(3, device="cuda")
        with pytest.raises(DataDependentOutputException):
            x.sum().item()


@pytest.mark.parametrize("name", list(FAKE_POLICIES))
def test_compute_is_sync_free(name):
    factory, k = FAKE_POLICIES[name]
    policy = factory()
    with FakeTensorMode():
        policy.setup(k, "cuda")
        for t in range(30):
            norms = torch.rand(k, device="cuda")
            if t == 12:
                norms = norms * torch.full((k,), math.inf, device="cuda")
            total = torch.linalg.vector_norm(norms)
            present = (torch.rand(k, device="cuda") > 0.2) if k > 1 and t % 3 == 0 else None
            coef, thr = policy.compute(StepNorms(norms, total, torch.isfinite(total), present))
            assert coef.device.type == "cuda" and thr.device.type == "cuda"
            assert coef.shape == ((k,) if policy.per_tensor else ())
        sd = policy.state_dict()
        assert all(v.device.type == "cuda" for v in sd["state"].values())


@pytest.mark.parametrize(("build", "exc", "arg"), [
    (lambda: Fixed(-1.0), ValueError, "max_norm"),
    (lambda: Fixed(math.nan), ValueError, "max_norm"),
    (lambda: Fixed(math.inf), ValueError, "max_norm"),
    (lambda: Fixed("1"), TypeError, "max_norm"),
    (lambda: Fixed(True), TypeError, "max_norm"),
    (lambda: ZClip(alpha=1.0), ValueError, "alpha"),
    (lambda: ZClip(alpha=-0.1), ValueError, "alpha"),
    (lambda: ZClip(alpha=math.nan), ValueError, "alpha"),
    (lambda: ZClip(z_thresh=0.0), ValueError, "z_thresh"),
    (lambda: ZClip(z_thresh=-2.5), ValueError, "z_thresh"),
    (lambda: ZClip(warmup_steps=2.5), TypeError, "warmup_steps"),
    (lambda: ZClip(warmup_steps=True), TypeError, "warmup_steps"),
    (lambda: ZClip(warmup_steps=0), ValueError, "warmup_steps"),
    (lambda: ZClip(max_norm=-1.0), ValueError, "max_norm"),
    (lambda: ZClip(max_norm=math.nan), ValueError, "max_norm"),
    (lambda: AutoClip(percentile=100.5), ValueError, "percentile"),
    (lambda: AutoClip(percentile=-1.0), ValueError, "percentile"),
    (lambda: AutoClip(percentile=math.nan), ValueError, "percentile"),
    (lambda: AutoClip(window=0), ValueError, "window"),
    (lambda: AutoClip(window=10.0), TypeError, "window"),
    (lambda: AdaGC(rel=0.0), ValueError, "rel"),
    (lambda: AdaGC(rel=-1.0), ValueError, "rel"),
    (lambda: AdaGC(beta=1.0), ValueError, "beta"),
    (lambda: AdaGC(beta=math.nan), ValueError, "beta"),
    (lambda: AdaGC(warmup_steps=-1), ValueError, "warmup_steps"),
    (lambda: AdaGC(warmup_steps=1.5), TypeError, "warmup_steps"),
    (lambda: AdaGC(max_norm=math.inf), ValueError, "max_norm"),
    (lambda: AGC(clipping=0.0), ValueError, "clipping"),
    (lambda: AGC(eps=-1e-3), ValueError, "eps"),
])
def test_constructor_validation(build, exc, arg):
    with pytest.raises(exc, match=arg):
        build()


def test_load_state_dict_of_another_policy_raises():
    z = ZClip(warmup_steps=2)
    run(z, [total_step(1.0)] * 3)
    for other in (AutoClip(), AdaGC(), Fixed(1.0), Auto(), AGC()):
        with pytest.raises(ValueError, match="zclip"):
            other.load_state_dict(z.state_dict())
    with pytest.raises(ValueError):
        Auto().load_state_dict(Fixed(1.0).state_dict())
    with pytest.raises(ValueError):
        ZClip().load_state_dict({})


def test_load_state_dict_wrong_num_tensors_raises():
    a = AdaGC()
    run(a, [tensor_step([0.1, 0.2])], num_tensors=2)
    b = AdaGC()
    b.setup(3, "cpu")
    with pytest.raises(ValueError, match="tensors"):
        b.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="tensors"):
        a.setup(5, "cpu")


@pytest.mark.parametrize(("saved", "target"), [
    (lambda: AutoClip(window=8), lambda: AutoClip(window=16)),
    (lambda: ZClip(warmup_steps=5), lambda: ZClip(warmup_steps=10)),
], ids=["autoclip-window", "zclip-warmup_steps"])
def test_load_state_dict_with_other_shape_config_raises(saved, target):
    """A checkpoint whose buffers have another size must be refused at load time, not load
    silently and fail later with an IndexError (a device-side assert on CUDA)."""
    src = saved()
    run(src, [total_step(1.0)] * 3)
    with pytest.raises(ValueError, match=r"window|warmup_steps"):
        target().load_state_dict(src.state_dict())


def test_granularity_is_declared_once_and_per_tensor_follows_it():
    class PerTensor(ThresholdPolicy):  # a policy written against the per_tensor flag
        per_tensor = True

    class Units(ThresholdPolicy):
        granularity = "unit"

    assert PerTensor.granularity == "tensor" and PerTensor.per_tensor
    assert Units.per_tensor is False and Fixed.granularity == "global"
    assert AdaGC.granularity == "tensor" and AGC.granularity == "unit"
    with pytest.raises(TypeError, match="granularity"):
        type("Rows", (ThresholdPolicy,), {"granularity": "row"})


def test_statistics_are_declared_once_and_saved_from_that_declaration():
    class Counter(ThresholdPolicy):
        name = "counter"
        host_state = {"calls": 0}  # noqa: RUF012

        def initial_state(self, num_tensors, device):
            return {"total": torch.zeros(num_tensors, device=device)}

        def compute(self, step):
            self.total += step.norms
            self.calls += 1
            return torch.ones(()), torch.full((), NAN)

    policy = Counter()
    run(policy, [tensor_step([1.0, 2.0])] * 3, num_tensors=2)
    saved = policy.state_dict()
    assert saved["state"]["total"].tolist() == [3.0, 6.0] and saved["calls"] == 3
    fresh = Counter()
    fresh.load_state_dict(save_load(saved))
    assert fresh.total.tolist() == [3.0, 6.0] and fresh.calls == 3
