"""torch's own clip-gradient tests, ported to call gradguard, and every documented difference.

Sections:

* The tests of ``torch.nn.utils`` clipping in PyTorch's ``test/test_nn.py``
  (``test_clip_grad_value``, ``test_clip_grad_norm``, ``test_clip_grad_norm_error_if_nonfinite``,
  ``test_clip_grad_norm_multi_device``), rewritten for pytest with the same inputs and checks,
  calling gradguard. Where a port asserts a table of expected behaviour, the same table is
  asserted on torch too, so the port cannot drift from what torch does.
* Bitwise parity with torch where no difference is documented (every norm order, foreach
  on and off, tensor thresholds, the empty-generator warning).
* One test per entry of the README's "Differences from torch", asserting the documented
  behaviour next to torch's.
* optax's ``clip_by_block_rms`` / ``clip_by_global_norm`` tests and timm's AGC, as
  hand-written references in torch (no jax import).
"""

from __future__ import annotations

import inspect
import math
import warnings
from itertools import product
from unittest import mock

import pytest
import torch
from torch import inf, nan
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

import gradguard as gg
from gradguard import clip as clip_mod
from gradguard._validation import check_clip_threshold
from gradguard.engine import scaling
from gradguard.engine.norms import TensorGroups

FOREACH = [None, False, True]
# Every order torch's clip_grad_norm_ documents: its test's list plus 0, negative and -inf.
TORCH_NORM_TYPES = [0.5, 1.5, 2, 4, "inf", 0, 0.0, 1, -1, -0.5, -inf, inf]


def _linear_with_grads(grads, device="cpu"):
    lin = torch.nn.Linear(10, 10).to(device)
    for p, g in zip(lin.parameters(), grads, strict=True):
        p._grad = None if g is None else g.clone().view_as(p)
    return lin


def _grad_copies(params):
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = None if p.grad is None else p.grad.clone()
        out.append(q)
    return out


def _random_params(shapes=((3, 4), (5,), (), (6, 2, 2)), dtype=torch.float32, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    ps = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(dtype))
        p.grad = (torch.randn(s, generator=g, dtype=torch.float64) * scale).to(dtype)
        ps.append(p)
    return ps


def _same_grads(a, b):
    return all(torch.equal(x.grad, y.grad) for x, y in zip(a, b, strict=True))


# ===========================================================================================
# Ported from PyTorch test/test_nn.py (TestNNDeviceType), CPU only
# ===========================================================================================


@pytest.mark.parametrize("foreach", FOREACH)
def test_clip_grad_value(foreach):
    clip_value = 2.5
    grad_w = torch.arange(-50.0, 50).view(10, 10).div_(5)
    grad_b = torch.ones(10).mul_(2)
    for grad_list in [[grad_w, grad_b], [grad_w, None]]:
        lin = _linear_with_grads(grad_list)
        gg.clip_grad_value_(lin.parameters(), clip_value, foreach=foreach)
        for p in filter(lambda p: p.grad is not None, lin.parameters()):
            assert p.grad.max() <= clip_value
            assert p.grad.min() >= -clip_value

    # Should accept a single Tensor as input
    p1, p2 = torch.randn(10, 10), torch.randn(10, 10)
    g = torch.arange(-50.0, 50).view(10, 10).div_(5)
    p1._grad = g.clone()
    p2._grad = g.clone()
    gg.clip_grad_value_(p1, clip_value, foreach=foreach)
    gg.clip_grad_value_([p2], clip_value, foreach=foreach)
    assert torch.equal(p1.grad, p2.grad)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("norm_type", [0.5, 1.5, 2, 4, "inf"])
def test_clip_grad_norm(norm_type, foreach):
    max_norm = 2

    def compute_norm(lin):
        p_ = float(norm_type)
        if p_ != inf:
            total = sum(p.grad.abs().pow(p_).sum() for p in lin.parameters())
            return pow(total, 1.0 / p_)
        return max(p.grad.abs().max() for p in lin.parameters())

    def compare_scaling(lin, grads):
        p_scale = [p.grad.div(g).view(-1) for p, g in zip(lin.parameters(), grads, strict=True)]
        scale = torch.cat(p_scale)
        torch.testing.assert_close(scale.std(), torch.tensor(0.0))  # torch's assertEqual
        return scale[0]

    grads = torch.arange(1.0, 101).view(10, 10), torch.ones(10).div(1000)
    lin = _linear_with_grads(grads)
    norm_before = compute_norm(lin)
    norm = gg.clip_grad_norm_(lin.parameters(), max_norm, norm_type=norm_type, foreach=foreach)
    norm_after = compute_norm(lin)
    torch.testing.assert_close(norm, norm_before)
    torch.testing.assert_close(norm_after, torch.tensor(float(max_norm)))
    assert norm_after <= norm_before
    compare_scaling(lin, grads)

    # decomposed APIs should behave as expected
    lin = _linear_with_grads(grads)
    norm_before = compute_norm(lin)
    grad_list = [p.grad for p in lin.parameters()]
    total_norm = gg.get_total_norm(grad_list, norm_type=norm_type, foreach=foreach)
    gg.clip_grads_with_norm_(lin.parameters(), max_norm, total_norm, foreach=foreach)
    norm_after = compute_norm(lin)
    torch.testing.assert_close(total_norm, norm_before)
    torch.testing.assert_close(norm_after, torch.tensor(float(max_norm)))
    assert norm_after <= norm_before
    compare_scaling(lin, grads)

    # Small gradients should be left unchanged
    grads = torch.rand(10, 10).div(10000), torch.ones(10).div(500)
    for p, g in zip(lin.parameters(), grads, strict=True):
        p.grad.copy_(g)
    norm_before = compute_norm(lin)
    norm = gg.clip_grad_norm_(lin.parameters(), max_norm, norm_type=norm_type, foreach=foreach)
    norm_after = compute_norm(lin)
    torch.testing.assert_close(norm, norm_before)
    torch.testing.assert_close(norm_before, norm_after)
    assert norm_after <= max_norm
    assert compare_scaling(lin, grads) == 1

    # Should accept a single Tensor as input
    p1, p2 = torch.randn(10, 10), torch.randn(10, 10)
    g = torch.arange(1.0, 101).view(10, 10)
    p1._grad = g.clone()
    p2._grad = g.clone()
    gg.clip_grad_norm_(p1, max_norm, norm_type=norm_type, foreach=foreach)
    gg.clip_grad_norm_([p2], max_norm, norm_type=norm_type, foreach=foreach)
    assert torch.equal(p1.grad, p2.grad)

    # Should warn when the parameters generator is exhausted
    params = lin.parameters()
    for _ in params:
        pass
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        gg.clip_grad_norm_(params, max_norm, norm_type=norm_type, foreach=foreach)
    assert len(w) == 1
    assert str(w[0].message) == (
        "`parameters` is an empty generator, no gradient clipping will occur.")


# torch's test_clip_grad_norm_error_if_nonfinite. Each case: (grad_only_one_elem,
# prefix_finite_grad_param, scalars, norm types giving a non-finite total, norm types giving
# a finite total).
_NORMS_POS = [0.1, 1, 2, 3.5, inf]
_NORMS_NEG = [-0.1, -1, -2, -3.5]
_NORMS_EXCEPT_0 = _NORMS_POS + _NORMS_NEG
_NORMS_ALL = [*_NORMS_EXCEPT_0, 0]
_NONFINITE_CASES = [
    # Errors from an infinite grad
    (False, False, [inf, -inf], _NORMS_EXCEPT_0, [0]),
    (False, True, [inf, -inf], _NORMS_POS, [*_NORMS_NEG, 0]),
    (True, False, [inf, -inf], _NORMS_POS, [*_NORMS_NEG, 0]),
    (True, True, [inf, -inf], _NORMS_POS, [*_NORMS_NEG, 0]),
    # Errors from a NaN grad
    (False, False, [nan], _NORMS_EXCEPT_0, [0]),
    (False, True, [nan], _NORMS_EXCEPT_0, [0]),
    (True, False, [nan], _NORMS_EXCEPT_0, [0]),
    (True, True, [nan], _NORMS_EXCEPT_0, [0]),
    # A grad that should never error
    (False, False, [2e22, -2e22], [], _NORMS_ALL),
    (False, True, [2e22, -2e22], [], _NORMS_ALL),
    (True, False, [2e22, -2e22], [], _NORMS_ALL),
    (True, True, [2e22, -2e22], [], _NORMS_ALL),
    # A grad that overflows to inf for only some norm orders
    (False, False, [2e200, -2e200], [3.5, 2, -2, -3.5], [inf, 1, 0.1, 0, -1, -0.1]),
    (False, True, [2e200, -2e200], [3.5, 2], [*_NORMS_NEG, inf, 1, 0.1, 0]),
    (True, False, [2e200, -2e200], [3.5, 2], [*_NORMS_NEG, inf, 1, 0.1, 0]),
    (True, True, [2e200, -2e200], [3.5, 2], [*_NORMS_NEG, inf, 1, 0.1, 0]),
]


def _nonfinite_parameters(scalar, grad_only_one_elem, prefix_finite_grad_param):
    param = torch.ones(10, dtype=torch.float64, requires_grad=True)
    if grad_only_one_elem:
        param[1].mul(scalar).sum().backward()
    else:
        param.mul(scalar).sum().backward()
    if prefix_finite_grad_param:
        prefix = torch.ones(1, dtype=torch.float64, requires_grad=True)
        prefix.mul(1).sum().backward()
        return [prefix, param]
    return [param]


@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("case", range(len(_NONFINITE_CASES)))
def test_clip_grad_norm_error_if_nonfinite(case, foreach):
    only_one, prefix, scalars, norms_nonfinite, norms_finite = _NONFINITE_CASES[case]
    runs = [(n, s, True) for n, s in product(norms_nonfinite, scalars)]
    runs += [(n, s, False) for n, s in product(norms_finite, scalars)]
    for (norm_type, scalar, is_nonfinite), error_if_nonfinite in product(runs, [False, True]):
        for fn in (torch.nn.utils.clip_grad_norm_, gg.clip_grad_norm_):  # the table is torch's
            params = _nonfinite_parameters(scalar, only_one, prefix)
            msg = f"{fn.__module__} p={norm_type} scalar={scalar} error={error_if_nonfinite}"
            if is_nonfinite and error_if_nonfinite:
                before = [p.grad.clone() for p in params]
                with pytest.raises(RuntimeError, match=(
                        f"The total norm of order {float(norm_type)} for gradients")):
                    fn(params, 1, norm_type=norm_type, error_if_nonfinite=True,
                       foreach=foreach)
                # gradients are untouched when the error is raised
                assert all(torch.equal(a, p.grad) for a, p in zip(before, params, strict=True)
                           if not a.isnan().any()), msg
            else:
                total = fn(params, 1, norm_type=norm_type,
                           error_if_nonfinite=error_if_nonfinite, foreach=foreach)
                assert bool(torch.isfinite(total)) is not is_nonfinite, msg


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_clip_grad_norm_multi_device():  # pragma: no cover - CPU-only CI
    class TestModel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer1 = torch.nn.Linear(10, 10)
            self.layer2 = torch.nn.Linear(10, 10)

    test_model = TestModel()
    test_model.layer1.to("cuda:0")
    test_model.layer2.to("cuda:1")
    ref_model = TestModel().to("cuda:0")
    for norm_type in [2.0, inf]:
        for p in test_model.parameters():
            p.grad = torch.ones_like(p)
        for p in ref_model.parameters():
            p.grad = torch.ones_like(p)
        norm = gg.clip_grad_norm_(test_model.parameters(), 0.5, norm_type=norm_type)
        expected = gg.clip_grad_norm_(ref_model.parameters(), 0.5, norm_type=norm_type)
        torch.testing.assert_close(norm, expected)
        assert norm.device == torch.device("cuda:0")
        for p, pe in zip(test_model.parameters(), ref_model.parameters(), strict=True):
            torch.testing.assert_close(p.grad.to(pe.device), pe.grad)


# ===========================================================================================
# Bitwise parity with torch (no documented difference)
# ===========================================================================================


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("norm_type", TORCH_NORM_TYPES)
@pytest.mark.parametrize("max_norm", [0.5, 1e6, 0.0, inf])
def test_clip_grad_norm_bitwise_torch(norm_type, foreach, dtype, max_norm):
    ours = _random_params(dtype=dtype)
    ours[0].grad[1, 1] = 0.0  # the 0-norm counts non-zeros; negative orders see a zero
    theirs = _grad_copies(ours)
    n1 = gg.clip_grad_norm_(ours, max_norm, norm_type, foreach=foreach)
    n2 = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type, foreach=foreach)
    assert n1.dtype == n2.dtype == dtype
    assert torch.equal(n1, n2), (n1, n2)
    assert _same_grads(ours, theirs)


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("norm_type", TORCH_NORM_TYPES)
def test_decomposed_api_bitwise_torch(norm_type, foreach):
    ours = _random_params()
    theirs = _grad_copies(ours)
    t1 = gg.get_total_norm([p.grad for p in ours], norm_type, foreach=foreach)
    t2 = torch.nn.utils.get_total_norm([p.grad for p in theirs], norm_type, foreach=foreach)
    assert torch.equal(t1, t2)
    gg.clip_grads_with_norm_(ours, 0.7, t1, foreach=foreach)
    torch.nn.utils.clip_grads_with_norm_(theirs, 0.7, t2, foreach=foreach)
    assert _same_grads(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("clip_value", [0.0, 0.7, 1e9, inf])
def test_clip_grad_value_bitwise_torch(clip_value, foreach, dtype):
    ours = _random_params(dtype=dtype)
    theirs = _grad_copies(ours)
    assert gg.clip_grad_value_(ours, clip_value, foreach=foreach) is None
    if clip_value <= torch.finfo(dtype).max:  # beyond it torch raises (a test below)
        torch.nn.utils.clip_grad_value_(theirs, clip_value, foreach=foreach)
    assert _same_grads(ours, theirs)


def test_mixed_dtypes_and_none_grads_bitwise_torch():
    ours = _random_params() + _random_params(dtype=torch.float64, seed=1)
    ours[1].grad = None
    theirs = _grad_copies(ours)
    for p_ in (2.0, inf, 0.5):
        assert torch.equal(gg.clip_grad_norm_(ours, 0.3, p_),
                           torch.nn.utils.clip_grad_norm_(theirs, 0.3, p_))
        assert _same_grads([p for p in ours if p.grad is not None],
                           [p for p in theirs if p.grad is not None])


def test_no_gradients_returns_zero_like_torch():
    ps = [torch.nn.Parameter(torch.ones(3))]
    assert torch.equal(gg.clip_grad_norm_(ps, 1.0), torch.nn.utils.clip_grad_norm_(ps, 1.0))
    assert torch.equal(gg.get_total_norm([]), torch.nn.utils.get_total_norm([]))


# ----- tensor thresholds ---------------------------------------------------------------


@pytest.mark.parametrize("threshold", [
    torch.tensor(0.3), torch.tensor([0.3]), torch.tensor([[0.3]]), torch.tensor(0.3).double(),
    torch.tensor(2), torch.tensor(0.3, requires_grad=True), torch.tensor(-0.3),
    torch.tensor(inf), torch.tensor(nan)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tensor_thresholds_like_torch(threshold, dtype):
    # torch reads a one-element tensor with float(); so does gradguard for a CPU tensor
    # (free), and a negative or NaN tensor gives torch's result: tensors are not checked.
    for ours_fn, torch_fn in [(gg.clip_grad_norm_, torch.nn.utils.clip_grad_norm_),
                              (gg.clip_grad_value_, torch.nn.utils.clip_grad_value_)]:
        ours = _random_params(dtype=dtype)
        theirs = _grad_copies(ours)
        r1, r2 = ours_fn(ours, threshold), torch_fn(theirs, threshold)
        assert (r1 is None and r2 is None) or torch.equal(r1, r2)
        assert all(torch.equal(a.grad, b.grad) or (a.grad.isnan() == b.grad.isnan()).all()
                   for a, b in zip(ours, theirs, strict=True))
    ours = _random_params(dtype=dtype)
    theirs = _grad_copies(ours)
    total = gg.get_total_norm([p.grad for p in ours])
    gg.clip_grads_with_norm_(ours, threshold, total)
    torch.nn.utils.clip_grads_with_norm_(theirs, threshold, total)
    assert all(torch.equal(a.grad, b.grad) or (a.grad.isnan() == b.grad.isnan()).all()
               for a, b in zip(ours, theirs, strict=True))


@pytest.mark.parametrize("value", [0.3, 1e-7, 2.5, 1e6, -0.3, 7])
@pytest.mark.parametrize("tdtype", [torch.float32, torch.float64, torch.int64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_on_device_threshold_arithmetic_is_torchs(value, tdtype, dtype):
    # An accelerator tensor threshold never leaves the device: the coefficient is
    # reciprocal(norm + 1e-6) * threshold, and the clamp bounds are tensors. Run that path
    # here on CPU tensors and compare with torch, which reads the threshold with float().
    if tdtype == torch.int64:
        value = round(value)
    thr = torch.tensor(value, dtype=tdtype)
    for total in [torch.tensor(5.25), torch.tensor(0.0), torch.tensor(0.1, dtype=torch.float64),
                  torch.tensor(3.0e-7), torch.tensor(inf), torch.tensor(nan)]:
        ours = scaling.torch_clip_coefficient(thr, total)
        theirs = torch.clamp(float(thr) / (total + 1e-6), max=1.0)
        assert ours.dtype == theirs.dtype
        assert torch.equal(ours, theirs) or (ours.isnan() and theirs.isnan()), (total, value)
    ours = _random_params(dtype=dtype)
    theirs = _grad_copies(ours)
    scaling.clamp_(TensorGroups([p.grad for p in ours]), thr)
    if float(thr) <= torch.finfo(dtype).max:  # beyond: torch raises, see the test below
        torch.nn.utils.clip_grad_value_(theirs, float(thr))
    assert _same_grads(ours, theirs)


def _on_device(value, name, *, positive=False):
    """check_clip_threshold as for an accelerator tensor: kept as a tensor, even on CPU."""
    if isinstance(value, torch.Tensor):
        return value.reshape(())
    return check_clip_threshold(value, name, positive=positive)


@pytest.mark.parametrize("name", ["clip_grad_norm_", "clip_grads_with_norm_", "clip_grad_value_",
                                  "clip_grad_norm_per_tensor_", "clip_grad_block_rms_",
                                  "clip_grad_agc_"])
def test_every_function_gives_the_same_result_with_a_device_threshold(name):
    fn = getattr(gg, name)

    def call(ps, threshold):
        if name == "clip_grads_with_norm_":
            return fn(ps, threshold, gg.get_total_norm([p.grad for p in ps]))
        return fn(ps, threshold)

    for value in [0.05, 0.8, 1e6]:
        ours = _random_params(shapes=((30, 4), (5,), (), (6, 2, 2), (0,)))
        ref = _grad_copies(ours)
        with mock.patch.object(clip_mod, "check_clip_threshold", _on_device):
            r1 = call(ours, torch.tensor(value))
        r2 = call(ref, value)
        assert (r1 is None and r2 is None) or torch.equal(r1, r2)
        assert _same_grads(ours, ref), (name, value)


def test_tensor_threshold_shape_and_dtype_errors():
    ps = _random_params()
    with pytest.raises(ValueError, match=r"max_norm .*one-element tensor.*\(2,\)"):
        gg.clip_grad_norm_(ps, torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="clip_value"):
        gg.clip_grad_value_(ps, torch.tensor(True))
    with pytest.raises(TypeError, match="max_norm"):
        gg.clip_grad_norm_(ps, torch.tensor(1 + 1j))


def _fake_cuda_params():
    ps = []
    for s, dt in [((300, 400), torch.float32), ((8, 3, 3, 3), torch.float32),
                  ((5,), torch.float32), ((4, 4), torch.float16), ((), torch.float64)]:
        p = torch.nn.Parameter(torch.randn(s, device="cuda", dtype=dt))
        p.grad = torch.randn(s, device="cuda", dtype=dt)
        ps.append(p)
    return ps


def test_tensor_thresholds_stay_on_the_device_under_fake_cuda():
    # Under FakeTensorMode any host read of a tensor's value raises: torch's own functions
    # read a tensor threshold with float(), gradguard's never do.
    with FakeTensorMode():
        ps = _fake_cuda_params()
        thr = torch.tensor(0.5, device="cuda")
        # (which error a host read raises depends on how the fake tensor was made)
        with pytest.raises((DataDependentOutputException, RuntimeError)):
            torch.nn.utils.clip_grad_norm_(ps, thr)
        with pytest.raises((DataDependentOutputException, RuntimeError)):
            torch.nn.utils.clip_grad_value_(ps, thr)
        with pytest.raises((DataDependentOutputException, RuntimeError)):
            float(thr)
        for p_ in [2.0, 1.0, inf, 0, -1.0, -inf, 0.5]:
            n = gg.clip_grad_norm_(ps, thr, p_)
            assert n.device.type == "cuda"
            gg.clip_grad_norm_per_tensor_(ps, thr, p_)
        coef = gg.clip_grads_with_norm_(ps, thr, gg.get_total_norm([p.grad for p in ps]))
        assert coef.device.type == "cuda"
        gg.clip_grad_value_(ps, thr)
        gg.clip_grad_value_(ps, thr, foreach=False)
        gg.clip_grad_block_rms_(ps, thr)
        gg.clip_grad_agc_(ps, thr)
        gg.clip_grad_norm_(ps, torch.tensor([[0.5]], device="cuda", dtype=torch.float64))


# ----- the empty-generator warning ------------------------------------------------------------


def test_empty_generator_warning_is_torchs():
    def exhausted():
        return (p for p in [])

    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter("always")
        torch.nn.utils.clip_grad_norm_(exhausted(), 1.0)
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        gg.clip_grad_norm_(exhausted(), 1.0)
    assert len(ours) == len(theirs) == 1
    assert str(ours[0].message) == str(theirs[0].message)
    assert ours[0].category is theirs[0].category is UserWarning
    assert ours[0].filename == theirs[0].filename == __file__  # points at the caller's line
    # like torch: no warning for an empty list or a non-generator iterator, or in the other
    # functions; a non-empty generator is not consumed by the check
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gg.clip_grad_norm_([], 1.0)
        gg.clip_grad_norm_(iter([]), 1.0)
        gg.get_total_norm(exhausted())
        gg.clip_grad_value_(exhausted(), 1.0)
        gg.clip_grads_with_norm_(exhausted(), 1.0, torch.tensor(1.0))
        lin = _linear_with_grads([torch.ones(10, 10), torch.ones(10)])
        assert gg.clip_grad_norm_(lin.parameters(), 1.0).item() == pytest.approx(math.sqrt(110))


# ===========================================================================================
# Every entry of the README's "Differences from torch"
# ===========================================================================================


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_difference_low_precision_norm_accumulated_in_fp32(dtype):
    g = torch.full((65536,), 300.0, dtype=dtype)  # true norm 76,800 > fp16's 65,504
    p, q = torch.nn.Parameter(torch.zeros_like(g)), torch.nn.Parameter(torch.zeros_like(g))
    p.grad, q.grad = g.clone(), g.clone()
    ours = gg.clip_grad_norm_([p], 1.0)
    theirs = torch.nn.utils.clip_grad_norm_([q], 1.0)
    assert ours.dtype == torch.float32 and theirs.dtype == dtype
    assert ours.item() == pytest.approx(76800.0, rel=1e-3)
    assert torch.linalg.vector_norm(p.grad.double()).item() == pytest.approx(1.0, rel=1e-2)
    if dtype == torch.float16:  # torch: inf norm, every gradient zeroed
        assert torch.isinf(theirs) and q.grad.abs().max().item() == 0.0


def test_difference_cpu_skips_the_multiply_when_nothing_is_clipped():
    ours = _random_params()
    theirs = _grad_copies(ours)
    versions = [p.grad._version for p in ours]
    with mock.patch.object(torch, "_foreach_mul_", wraps=torch._foreach_mul_) as mul:
        gg.clip_grad_norm_(ours, 1e9)
        assert mul.call_count == 0
    torch.nn.utils.clip_grad_norm_(theirs, 1e9)
    assert _same_grads(ours, theirs)  # the same values: torch multiplies by exactly 1
    assert [p.grad._version for p in ours] == versions  # but the tensors were not written


def test_difference_number_thresholds_are_validated():
    # torch flips the gradients' sign for a negative max_norm (pytorch#31367), NaNs them all
    # for NaN, clamps every entry to -v for a negative clip_value, and parses strings.
    for fn, arg in [(gg.clip_grad_norm_, "max_norm"), (gg.clip_grad_value_, "clip_value")]:
        for bad in (-1.0, nan, -inf):
            ps = _random_params()
            before = [p.grad.clone() for p in ps]
            with pytest.raises(ValueError, match=arg):
                fn(ps, bad)
            assert all(torch.equal(a, p.grad) for a, p in zip(before, ps, strict=True))
        for bad in ("1.0", None, True):
            with pytest.raises(TypeError, match=arg):
                fn(_random_params(), bad)
    ps = _random_params()
    g = ps[0].grad.clone()
    torch.nn.utils.clip_grad_norm_(ps, -1.0)
    assert (torch.sign(ps[0].grad) == -torch.sign(g)).all()  # what the check prevents
    with pytest.raises(ValueError, match="max_norm"):
        gg.clip_grads_with_norm_(ps, -1.0, torch.tensor(1.0))


def test_difference_norm_type_must_be_a_python_number():
    ps = _random_params()
    for bad, err in [(True, TypeError), (torch.tensor(2.0), TypeError), ("two", TypeError),
                     (nan, ValueError)]:
        with pytest.raises(err, match="norm_type"):
            gg.clip_grad_norm_(ps, 1.0, bad)
        with pytest.raises(err, match="norm_type"):
            gg.get_total_norm([p.grad for p in ps], bad)
    # torch: True is p = 1, a tensor is read with float() (a sync), NaN gives a NaN norm
    assert torch.isnan(torch.nn.utils.get_total_norm([p.grad for p in ps], nan))


@pytest.mark.parametrize(("norm_type", "empty_norm"), [(inf, 0.0), (-inf, inf), (-1.0, inf)])
def test_difference_empty_gradients_have_a_norm(norm_type, empty_norm):
    ps = _random_params(shapes=((3, 4), (0,), (5,)))
    theirs = _grad_copies(ps)
    with pytest.raises(RuntimeError, match="identity"):  # torch: no identity for max/min
        torch.nn.utils.clip_grad_norm_(theirs, 0.5, norm_type)
    assert gg.tensor_norms([p.grad for p in ps], norm_type)[1].item() == empty_norm
    without = _grad_copies([ps[0], ps[2]])
    total = gg.clip_grad_norm_(ps, 0.5, norm_type)
    assert torch.equal(total, torch.nn.utils.clip_grad_norm_(without, 0.5, norm_type))
    assert torch.equal(ps[0].grad, without[0].grad) and torch.equal(ps[2].grad, without[1].grad)


def test_difference_clip_grads_with_norm_returns_the_coefficient():
    ps = _random_params()
    theirs = _grad_copies(ps)
    total = gg.get_total_norm([p.grad for p in ps])
    coef = gg.clip_grads_with_norm_(ps, 0.5, total)
    assert torch.nn.utils.clip_grads_with_norm_(theirs, 0.5, total) is None
    assert torch.equal(coef, torch.clamp(0.5 / (total + 1e-6), max=1.0))
    assert _same_grads(ps, theirs)


def test_difference_clip_value_beyond_the_dtype_range_clips_nothing():
    ps = _random_params(dtype=torch.float16)
    ps[0].grad[0, 0] = inf
    before = [p.grad.clone() for p in ps]
    with pytest.raises(RuntimeError, match="overflow"):
        torch.nn.utils.clip_grad_value_(_grad_copies(ps), 1e9)
    gg.clip_grad_value_(ps, 1e9)
    assert all(torch.equal(a, p.grad) for a, p in zip(before, ps, strict=True))


def test_difference_clip_grad_value_accepts_no_gradients():
    with pytest.raises(RuntimeError):  # torch cannot group an empty list
        torch.nn.utils.clip_grad_value_([], 1.0)
    assert gg.clip_grad_value_([], 1.0) is None
    assert gg.clip_grad_value_([torch.nn.Parameter(torch.ones(2))], 1.0) is None  # grad None


def test_difference_sparse_and_complex_gradients_are_type_errors():
    p = torch.nn.Parameter(torch.ones(3, 2))
    p.grad = torch.ones(3, 2).to_sparse()
    with pytest.raises(NotImplementedError):  # torch: no sparse kernel
        torch.nn.utils.clip_grad_norm_([p], 1.0)
    with pytest.raises(TypeError, match=r"parameters\[0\]\.grad .*layout"):
        gg.clip_grad_norm_([p], 1.0)
    q = torch.nn.Parameter(torch.ones(3, dtype=torch.complex64))
    q.grad = torch.full((3,), 3 + 4j, dtype=torch.complex64)
    torch.nn.utils.clip_grad_norm_([q], 1.0)  # torch clips complex gradients by norm
    with pytest.raises(TypeError, match="complex64"):
        gg.clip_grad_norm_([q], 1.0)


def test_difference_process_group_is_an_extra_keyword():
    for fn in (gg.clip_grad_norm_, gg.get_total_norm):
        sig = inspect.signature(fn)
        assert sig.parameters["process_group"].kind is inspect.Parameter.KEYWORD_ONLY
        assert sig.parameters["process_group"].default is None
    # the positional parameters are torch's, in torch's order, with torch's defaults
    for ours, theirs in [(gg.clip_grad_norm_, torch.nn.utils.clip_grad_norm_),
                         (gg.get_total_norm, torch.nn.utils.get_total_norm),
                         (gg.clip_grads_with_norm_, torch.nn.utils.clip_grads_with_norm_),
                         (gg.clip_grad_value_, torch.nn.utils.clip_grad_value_)]:
        a = [(p.name, p.default) for p in inspect.signature(ours).parameters.values()
             if p.kind is not inspect.Parameter.KEYWORD_ONLY]
        b = [(p.name, p.default) for p in inspect.signature(theirs).parameters.values()]
        assert a == b


@pytest.fixture
def single_process_group():
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed, not already initialised")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist
    finally:
        dist.destroy_process_group()


def test_difference_dtensor_gives_a_plain_tensor_and_process_group(single_process_group):
    dist = single_process_group
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    full = _random_params(shapes=((6, 4), (5,)))
    ours, theirs = [], []
    for p in full:
        for out in (ours, theirs):
            q = torch.nn.Parameter(distribute_tensor(p.detach().clone(), mesh, [Shard(0)]))
            q.grad = distribute_tensor(p.grad.clone(), mesh, [Shard(0)])
            out.append(q)
    n1 = gg.clip_grad_norm_(ours, 0.5)
    n2 = torch.nn.utils.clip_grad_norm_(theirs, 0.5)
    assert type(n1) is torch.Tensor and isinstance(n2, DTensor)
    assert torch.equal(n1, n2.full_tensor())
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a.grad.full_tensor(), b.grad.full_tensor())
    # a Partial gradient (a pending cross-rank sum) is measured, not clipped in place
    from torch.distributed.tensor import Partial

    w = torch.nn.Parameter(distribute_tensor(torch.ones(4), mesh, [Shard(0)]))
    w.grad = DTensor.from_local(torch.full((4,), 10.0), mesh, [Partial()])
    assert gg.get_total_norm([w.grad]).item() == pytest.approx(20.0)
    with pytest.raises(TypeError, match="Partial"):
        gg.clip_grad_norm_([w], 1.0)
    # process_group: the total over ranks holding disjoint parameters (here one rank)
    grads = [p.grad for p in full]
    assert torch.equal(gg.get_total_norm(grads, process_group=dist.group.WORLD),
                       gg.get_total_norm(grads))


# ===========================================================================================
# optax (clip_by_block_rms, clip_by_global_norm) and timm (AGC), hand-written in torch
# ===========================================================================================


def _optax_block_rms(g, threshold):
    """optax.clip_by_block_rms: u / max(1, sqrt(mean(abs_sq(u))) / threshold)."""
    clip_denom = torch.clamp(torch.sqrt(torch.mean(g * g)) / threshold, min=1.0)
    return g / clip_denom


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threshold", [1e-3, 0.05, 0.8, 3.0])
@pytest.mark.parametrize("foreach", [None, False])
def test_block_rms_bitwise_optax(threshold, dtype, foreach):
    shapes = ((30, 4), (5,), (), (6, 2, 2), (1000,), (257, 3))
    for seed in range(3):
        ps = _random_params(shapes=shapes, dtype=dtype, seed=seed)
        ps[1].grad.zero_()  # rms 0: left as is
        ref = [_optax_block_rms(p.grad, threshold) for p in ps]
        total = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in ps]))
        got_total = gg.clip_grad_block_rms_(ps, threshold, foreach=foreach)
        for p, r in zip(ps, ref, strict=True):
            assert torch.equal(p.grad, r), (threshold, dtype, p.shape)
        torch.testing.assert_close(got_total, total)


def test_block_rms_optax_test_updates():
    # optax's test_clip_by_block_rms: clipping to 1/i leaves each block's rms at 1/i, and
    # clipping the already clipped updates again changes nothing.
    start = [torch.tensor([500.0, 5.0]), torch.tensor([300.0, 3.0])]
    ps = [torch.nn.Parameter(torch.zeros(2)) for _ in start]
    for p, g in zip(ps, start, strict=True):
        p.grad = g.clone()
    for i in range(1, 51):
        gg.clip_grad_block_rms_(ps, 1.0 / i)
        for p in ps:
            assert torch.sqrt(torch.mean(p.grad**2)).item() == pytest.approx(1.0 / i, abs=1e-7)
        fresh = [torch.nn.Parameter(torch.zeros(2)) for _ in start]
        for q, g in zip(fresh, start, strict=True):
            q.grad = g.clone()
        gg.clip_grad_block_rms_(fresh, 1.0 / i)
        for p, q in zip(ps, fresh, strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)


def test_block_rms_low_precision_accumulates_in_fp32():
    # optax squares fp16 entries in fp16: 300^2 overflows, the rms is inf and the block is
    # zeroed. gradguard's rms is accumulated in fp32.
    p = torch.nn.Parameter(torch.zeros(64, dtype=torch.float16))
    p.grad = torch.full((64,), 300.0, dtype=torch.float16)
    assert torch.equal(_optax_block_rms(p.grad, 1.0), torch.zeros(64, dtype=torch.float16))
    gg.clip_grad_block_rms_([p], 1.0)
    torch.testing.assert_close(p.grad, torch.ones(64, dtype=torch.float16), rtol=1e-3, atol=0)


def test_global_norm_optax_test_updates():
    # optax's test_clip_by_global_norm, with torch's rule: optax divides by the norm itself,
    # torch (and gradguard) by norm + 1e-6, so the clipped norm is max_norm * n / (n + 1e-6).
    start = [torch.tensor([500.0, 5.0]), torch.tensor([300.0, 3.0])]
    ps = [torch.nn.Parameter(torch.zeros(2)) for _ in start]
    for p, g in zip(ps, start, strict=True):
        p.grad = g.clone()
    for i in range(1, 51):
        before = gg.get_total_norm([p.grad for p in ps]).item()
        gg.clip_grad_norm_(ps, 1.0 / i)
        after = gg.get_total_norm([p.grad for p in ps]).item()
        assert after == pytest.approx((1.0 / i) * before / (before + 1e-6), rel=1e-6)
        assert abs(after - 1.0 / i) <= 1.01e-6


def _timm_adaptive_clip_grad(parameters, clip_factor=0.01, eps=1e-3):
    """timm.utils.agc.adaptive_clip_grad (norm_type 2), as published."""
    def unitwise_norm(x):
        if x.ndim <= 1:
            return x.norm(2.0)
        return x.norm(2.0, dim=tuple(range(1, x.ndim)), keepdim=True)

    for p in parameters:
        if p.grad is None:
            continue
        p_data, g_data = p.detach(), p.grad.detach()
        max_norm = unitwise_norm(p_data).clamp_(min=eps).mul_(clip_factor)
        grad_norm = unitwise_norm(g_data)
        clipped_grad = g_data * (max_norm / grad_norm.clamp(min=1e-6))
        new_grads = torch.where(grad_norm < max_norm, g_data, clipped_grad)
        p.grad.detach().copy_(new_grads)


def _agc_model():
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({
        "emb": torch.nn.Embedding(11, 6), "conv": torch.nn.Conv2d(3, 4, 3),
        "lin": torch.nn.Linear(24, 5), "big": torch.nn.Linear(600, 300)})
    x = torch.randint(0, 11, (8, 4))
    loss = model["lin"](model["emb"](x).flatten(1)).pow(2).sum()
    loss = loss + model["conv"](torch.randn(2, 3, 5, 5)).pow(2).sum()
    (loss + model["big"](torch.randn(3, 600)).pow(2).sum()).backward()
    with torch.no_grad():
        model["conv"].bias.zero_()  # zero weights: eps lets their units move
    return model


@pytest.mark.parametrize("clipping", [0.001, 0.01, 0.1, 1e3])
def test_agc_bitwise_timm(clipping):
    ours = list(_agc_model().parameters())
    theirs = _grad_copies(ours)
    _timm_adaptive_clip_grad(theirs, clip_factor=clipping)
    gg.clip_grad_agc_(ours, clipping=clipping)
    assert _same_grads(ours, theirs)


def test_agc_differs_from_timm_only_on_nan_units_and_below_its_1e6_floor():
    # A NaN in one unit: timm multiplies the whole unit by NaN; gradguard leaves the unit as
    # it is (its NaN stays, the other entries are not destroyed).
    w = torch.nn.Parameter(torch.ones(2, 3))
    w.grad = torch.tensor([[1.0, nan, 1.0], [5.0, 5.0, 5.0]])
    timm = _grad_copies([w])
    _timm_adaptive_clip_grad(timm, clip_factor=0.1)
    gg.clip_grad_agc_([w], clipping=0.1)
    assert timm[0].grad[0].isnan().all()
    assert w.grad[0, 0].item() == 1.0 and w.grad[0, 1].isnan()
    torch.testing.assert_close(w.grad[1], timm[0].grad[1], rtol=0, atol=0)
    # A unit norm below timm's 1e-6 floor that still needs clipping (clipping * eps < 1e-6):
    # timm divides by 1e-6 and over-shrinks; gradguard lands on the threshold.
    v = torch.nn.Parameter(torch.zeros(4))
    v.grad = torch.full((4,), 2e-7)  # unit norm 4e-7 > 1e-4 * 1e-3 = 1e-7
    timm = _grad_copies([v])
    _timm_adaptive_clip_grad(timm, clip_factor=1e-4)
    gg.clip_grad_agc_([v], clipping=1e-4)
    assert torch.linalg.vector_norm(v.grad).item() == pytest.approx(1e-7, rel=1e-5)
    assert torch.linalg.vector_norm(timm[0].grad).item() == pytest.approx(4e-8, rel=1e-5)
