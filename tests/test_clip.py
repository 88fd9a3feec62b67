"""Clipping functions: equal to torch / hand-written references of the published rules."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

import gradguard as gg
from gradguard import clip as clip_mod

SHAPES = [(7,), (3, 5), (4, 3, 2, 2), (), (64, 33)]
NORM_TYPES = [1.0, 2.0, 3.0, math.inf]


def _params(shapes=SHAPES, scale=1.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ps = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=g).to(dtype))
        p.grad = (torch.randn(s, generator=g) * scale).to(dtype)
        ps.append(p)
    return ps


def _clone(ps):
    out = []
    for p in ps:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = None if p.grad is None else p.grad.clone()
        out.append(q)
    return out


def _grad_total(ps, p=2.0):
    return torch.linalg.vector_norm(torch.cat([q.grad.double().flatten() for q in ps]), p).item()


# ----- clip_grad_norm_ -------------------------------------------------------------------

@pytest.mark.parametrize("p", NORM_TYPES)
@pytest.mark.parametrize("max_norm", [0.5, 1e6])  # clipping active / inactive
@pytest.mark.parametrize("foreach", [None, False])
def test_clip_grad_norm_equals_torch_fp32(p, max_norm, foreach):
    ours = _params(scale=3.0)
    theirs = _clone(ours)
    n1 = gg.clip_grad_norm_(ours, max_norm, p, foreach=foreach)
    n2 = torch.nn.utils.clip_grad_norm_(theirs, max_norm, p, foreach=foreach)
    assert torch.equal(n1, n2)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_clip_grad_norm_low_precision(dtype):
    p = torch.nn.Parameter(torch.zeros(65536, dtype=dtype))
    p.grad = torch.full((65536,), 300.0, dtype=dtype)
    q = _clone([p])[0]
    n = gg.clip_grad_norm_([p], 1.0)
    assert n.dtype == torch.float32 and abs(n.item() - 76800.0) < 76.8
    after = torch.linalg.vector_norm(p.grad.double()).item()
    assert 0.99 < after <= 1.0 * (1 + 1e-2)
    if dtype == torch.float16:  # torch's defect: inf norm, gradients wiped out
        torch.nn.utils.clip_grad_norm_([q], 1.0)
        assert q.grad.abs().max().item() == 0.0


def test_clip_grad_norm_skips_multiply_on_cpu_when_not_clipping():
    ps = _params()
    before = [p.grad.clone() for p in ps]
    with mock.patch.object(torch, "_foreach_mul_", wraps=torch._foreach_mul_) as m:
        gg.clip_grad_norm_(ps, 1e9)
        assert m.call_count == 0
        gg.clip_grad_norm_(ps, 1e-3)
        assert m.call_count == 1
    assert not torch.equal(before[0], ps[0].grad)


def test_clip_grad_norm_error_if_nonfinite_like_torch():
    ps = _params()
    ps[1].grad[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite"):
        gg.clip_grad_norm_(ps, 1.0, error_if_nonfinite=True)
    n = gg.clip_grad_norm_(ps, 1.0)  # default: like torch, scale by the NaN coefficient
    assert torch.isnan(n)


def test_accepts_tensor_generator_and_empty():
    model = torch.nn.Linear(3, 2)
    model(torch.ones(4, 3)).sum().backward()
    assert gg.clip_grad_norm_(model.parameters(), 0.1).item() > 0
    assert gg.clip_grad_norm_(model.weight, 0.1).item() > 0
    for fn in (gg.clip_grad_norm_, gg.clip_grad_norm_per_tensor_, gg.clip_grad_block_rms_,
               gg.clip_grad_agc_):
        assert fn([], 1.0).item() == 0.0
        assert fn(iter([]), 1.0).item() == 0.0
        assert fn([torch.nn.Parameter(torch.ones(2))], 1.0).item() == 0.0  # grad is None
    assert gg.clip_grad_value_([], 1.0) is None


@pytest.mark.parametrize(
    ("fn", "arg"),
    [(gg.clip_grad_norm_, "max_norm"), (gg.clip_grad_value_, "clip_value"),
     (gg.clip_grad_norm_per_tensor_, "max_norm"), (gg.clip_grad_block_rms_, "threshold"),
     (gg.clip_grad_agc_, "clipping")],
)
@pytest.mark.parametrize("bad", [-1.0, float("nan"), -float("inf")])
def test_bad_thresholds_raise_value_error_naming_the_argument(fn, arg, bad):
    ps = _params()
    before = [p.grad.clone() for p in ps]
    with pytest.raises(ValueError, match=arg):
        fn(ps, bad)
    assert all(torch.equal(a, p.grad) for a, p in zip(before, ps, strict=True))  # nothing lost


@pytest.mark.parametrize(
    "fn", [gg.clip_grad_norm_, gg.clip_grad_value_, gg.clip_grad_norm_per_tensor_,
           gg.clip_grad_block_rms_, gg.clip_grad_agc_])
def test_infinite_threshold_never_clips(fn):
    ps = _params(scale=1e3)
    before = [p.grad.clone() for p in ps]
    fn(ps, float("inf"))
    assert all(torch.equal(a, p.grad) for a, p in zip(before, ps, strict=True))


@pytest.mark.parametrize("bad", ["1.0", None, True])
def test_non_number_threshold_is_type_error(bad):
    with pytest.raises(TypeError, match="max_norm"):
        gg.clip_grad_norm_(_params(), bad)


def test_other_validation():
    ps = _params()
    with pytest.raises(ValueError, match="clipping"):
        gg.clip_grad_agc_(ps, clipping=0.0)
    with pytest.raises(ValueError, match="eps"):
        gg.clip_grad_agc_(ps, eps=-1.0)
    with pytest.raises(TypeError, match="norm_type"):
        gg.clip_grad_norm_(ps, 1.0, norm_type="two")
    with pytest.raises(ValueError, match="norm_type"):
        gg.clip_grad_norm_(ps, 1.0, norm_type=float("nan"))
    p = torch.nn.Parameter(torch.ones(3))
    if hasattr(p, "grad_dtype"):  # torch >= 2.10 refuses mismatched grads unless told
        p.grad_dtype = None
    p.grad = torch.ones(3, dtype=torch.int32)
    with pytest.raises(TypeError, match="dtype"):
        gg.clip_grad_norm_([p], 1.0)


# ----- clip_grad_value_ ------------------------------------------------------------------

@pytest.mark.parametrize("foreach", [None, False])
def test_clip_grad_value_equals_torch(foreach):
    ours = _params(scale=3.0)
    theirs = _clone(ours)
    gg.clip_grad_value_(ours, 0.7, foreach=foreach)
    torch.nn.utils.clip_grad_value_(theirs, 0.7, foreach=foreach)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a.grad, b.grad)
        assert a.grad.abs().max() <= 0.7


# ----- per-tensor and block-RMS ------------------------------------------------------------

@pytest.mark.parametrize("p", NORM_TYPES)
def test_per_tensor_clipping_matches_reference(p):
    ps = _params(scale=3.0)
    ref = []
    for q in ps:
        n = torch.linalg.vector_norm(q.grad, p)
        ref.append(q.grad * torch.clamp(1.5 / (n + 1e-6), max=1.0))
    total_before = torch.linalg.vector_norm(torch.cat([q.grad.flatten() for q in ps]), p)
    total = gg.clip_grad_norm_per_tensor_(ps, 1.5, p)
    torch.testing.assert_close(total, total_before)
    for q, r in zip(ps, ref, strict=True):
        torch.testing.assert_close(q.grad, r)
        assert torch.linalg.vector_norm(q.grad, p) <= 1.5 * (1 + 1e-5)


def test_block_rms_matches_optax_rule():
    ps = _params(scale=3.0)
    ref = []
    for q in ps:
        rms = q.grad.pow(2).mean().sqrt()
        ref.append(q.grad / torch.clamp(rms / 0.8, min=1.0))  # optax: u / max(1, rms/t)
    gg.clip_grad_block_rms_(ps, 0.8)
    for q, r in zip(ps, ref, strict=True):
        assert torch.equal(q.grad, r)  # optax's arithmetic, a division: bitwise
        assert q.grad.pow(2).mean().sqrt() <= 0.8 * (1 + 1e-5)


# ----- AGC ---------------------------------------------------------------------------------

def _agc_reference(params, clipping, eps):
    """The paper's rule, written plainly: unit i is a slice along dim 0 (PyTorch layout)."""
    out = []
    for p in params:
        g, w = p.grad.double(), p.detach().double()
        if g.ndim <= 1:
            gn, wn = g.norm(), w.norm()
            ratio = gn / max(wn, eps)
            out.append(g * (clipping * max(wn, eps) / gn) if ratio > clipping else g.clone())
            continue
        rows = []
        for gi, wi in zip(g, w, strict=True):
            gn, wn = gi.norm(), wi.norm()
            wstar = max(wn, eps)
            rows.append(gi * (clipping * wstar / gn) if gn / wstar > clipping else gi.clone())
        out.append(torch.stack(rows))
    return out


def _agc_model():
    torch.manual_seed(0)
    return torch.nn.ModuleDict({
        "emb": torch.nn.Embedding(11, 6),
        "conv": torch.nn.Conv2d(3, 4, 3),
        "lin": torch.nn.Linear(6 * 4, 5),
        "big": torch.nn.Linear(600, 300),  # large tensors take the unbatched path
    })


def _agc_grads(m):
    x = torch.randint(0, 11, (8, 4))
    h = m["emb"](x).flatten(1)
    img = torch.randn(2, 3, 5, 5)
    big = m["big"](torch.randn(3, 600))
    (m["lin"](h).pow(2).sum() + m["conv"](img).pow(2).sum() + big.pow(2).sum()).backward()


@pytest.mark.parametrize("clipping", [0.01, 0.1, 1e3])
def test_agc_matches_paper_rule_on_linear_conv_bias_embedding(clipping):
    m = _agc_model()
    _agc_grads(m)
    with torch.no_grad():
        m["conv"].bias.zero_()  # zero parameters: eps lets their units move
    ps = list(m.parameters())
    ref = _agc_reference(ps, clipping, 1e-3)
    gg.clip_grad_agc_(ps, clipping=clipping, eps=1e-3)
    for p, r in zip(ps, ref, strict=True):
        torch.testing.assert_close(p.grad.double(), r, rtol=1e-5, atol=1e-8)


def test_agc_returns_pre_clip_total_norm():
    m = _agc_model()
    _agc_grads(m)
    ps = list(m.parameters())
    before = _grad_total(ps)
    assert gg.clip_grad_agc_(ps, 0.01).item() == pytest.approx(before, rel=1e-5)


def test_agc_never_amplifies_small_gradients():
    # The published bug: a 1e-4 gradient scaled up to the threshold (1e-2 here).
    p = torch.nn.Parameter(torch.ones(4, 4))
    p.grad = torch.full((4, 4), 1e-4)
    gg.clip_grad_agc_([p], clipping=0.01)
    assert torch.equal(p.grad, torch.full((4, 4), 1e-4))


def test_agc_uses_output_units_not_input_columns():
    # Row 0 has a huge gradient relative to its weights, row 1 does not.
    p = torch.nn.Parameter(torch.tensor([[1.0, 0.0, 0.0], [0.0, 10.0, 0.0]]))
    p.grad = torch.tensor([[1.0, 1.0, 1.0], [0.01, 0.01, 0.01]])
    gg.clip_grad_agc_([p], clipping=0.1)
    assert torch.linalg.vector_norm(p.grad[0]).item() == pytest.approx(0.1, rel=1e-5)
    torch.testing.assert_close(p.grad[1], torch.full((3,), 0.01))


def test_agc_skips_multiply_on_cpu_when_nothing_clipped():
    m = _agc_model()
    _agc_grads(m)
    with mock.patch.object(torch, "_foreach_mul_", wraps=torch._foreach_mul_) as mul:
        gg.clip_grad_agc_(m.parameters(), clipping=1e9)
        assert mul.call_count == 0


# ----- properties ----------------------------------------------------------------------

_shapes = st.lists(st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple),
                   min_size=1, max_size=5)


@settings(max_examples=60, deadline=None)
@given(shapes=_shapes, scale=st.floats(1e-3, 1e4), max_norm=st.floats(1e-3, 10.0),
       p=st.sampled_from(NORM_TYPES), seed=st.integers(0, 9999))
def test_property_clip_grad_norm(shapes, scale, max_norm, p, seed):
    ps = _params(shapes, scale=scale, seed=seed)
    before = [q.grad.clone() for q in ps]
    gg.clip_grad_norm_(ps, max_norm, p)
    after_total = _grad_total(ps, p)
    assert after_total <= max_norm * (1 + 1e-5) or after_total <= _total(before, p) * (1 + 1e-6)
    assert after_total <= max(max_norm, 0) * (1 + 1e-5) or math.isclose(
        after_total, _total(before, p), rel_tol=1e-6)
    # direction preserved: one common non-negative factor
    flat_b = torch.cat([b.flatten() for b in before]).double()
    flat_a = torch.cat([q.grad.flatten() for q in ps]).double()
    factor = flat_a.norm() / flat_b.norm()
    torch.testing.assert_close(flat_a, flat_b * factor, rtol=1e-5, atol=1e-7 * scale)
    # idempotent: clipping twice equals clipping once, up to torch's 1e-6 in the
    # denominator, which shrinks an already clipped gradient by a factor 1 - 1e-6/max_norm.
    once = [q.grad.clone() for q in ps]
    gg.clip_grad_norm_(ps, max_norm, p)
    for a, q in zip(once, ps, strict=True):
        torch.testing.assert_close(q.grad, a, rtol=2e-6 + 1.01e-6 / max_norm, atol=0)


def _total(grads, p):
    return torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in grads]), p).item()


@settings(max_examples=60, deadline=None)
@given(shapes=_shapes, scale=st.floats(1e-6, 1e3), clipping=st.floats(1e-3, 1.0),
       seed=st.integers(0, 9999))
def test_property_agc_never_increases_a_unit_norm(shapes, scale, clipping, seed):
    ps = _params(shapes, scale=scale, seed=seed)
    before = [u.clone() for u in gg.unit_norms([q.grad for q in ps])]
    wn = gg.unit_norms([q.detach() for q in ps])
    gg.clip_grad_agc_(ps, clipping=clipping)
    after = gg.unit_norms([q.grad for q in ps])
    for b, a, w in zip(before, after, wn, strict=True):
        assert torch.all(a <= b * (1 + 1e-5) + 1e-12)
        assert torch.all(a <= torch.maximum(b, clipping * w.clamp_min(1e-3)) * (1 + 1e-5))
    once = [q.grad.clone() for q in ps]
    gg.clip_grad_agc_(ps, clipping=clipping)
    for a, q in zip(once, ps, strict=True):
        torch.testing.assert_close(q.grad, a, rtol=1e-5, atol=0)


# ----- no host synchronisation -------------------------------------------------------------

def test_every_function_is_sync_free_on_fake_cuda():
    with FakeTensorMode():
        ps = []
        for s, dt in [((300, 400), torch.float32), ((8, 3, 3, 3), torch.float32),
                      ((5,), torch.float32), ((4, 4), torch.float16), ((), torch.float32)]:
            p = torch.nn.Parameter(torch.randn(s, device="cuda", dtype=dt))
            p.grad = torch.randn(s, device="cuda", dtype=dt)
            ps.append(p)
        for p_ in NORM_TYPES:
            n = gg.clip_grad_norm_(ps, 1.0, p_)
            assert n.device.type == "cuda"
            gg.clip_grad_norm_per_tensor_(ps, 1.0, p_)
        gg.clip_grad_value_(ps, 0.1)
        gg.clip_grad_block_rms_(ps, 0.1)
        gg.clip_grad_agc_(ps, 0.01)
        gg.clip_grads_with_norm_(ps, 1.0, gg.get_total_norm([p.grad for p in ps]))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sync_debug_mode_every_function():
    ps = []
    for s, dt in [((300, 400), torch.float32), ((5,), torch.float32), ((4, 4), torch.float16)]:
        p = torch.nn.Parameter(torch.randn(s, device="cuda", dtype=dt))
        p.grad = torch.randn(s, device="cuda", dtype=dt)
        ps.append(p)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for p_ in NORM_TYPES:
            gg.clip_grad_norm_(ps, 1.0, p_)
            gg.clip_grad_norm_per_tensor_(ps, 1.0, p_)
        gg.clip_grad_value_(ps, 0.1)
        gg.clip_grad_block_rms_(ps, 0.1)
        gg.clip_grad_agc_(ps, 0.01)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ----- FSDP2 ---------------------------------------------------------------------------------

FSDP2_CASES = [
    ("clip_grad_norm_", {"max_norm": 0.5}),
    ("clip_grad_agc_", {"clipping": 0.05}),
    ("clip_grad_norm_per_tensor_", {"max_norm": 0.5}),
    ("clip_grad_block_rms_", {"threshold": 0.05}),
]


def _small_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(9, 17), torch.nn.Tanh(), torch.nn.Linear(17, 5))
    return model, torch.randn(8, 9)


def _fsdp2_clip(rank, world):
    from torch.distributed.fsdp import fully_shard

    out = []
    for fn_name, kwargs in FSDP2_CASES:
        model, x = _small_model()
        fully_shard(model)
        model(x).pow(2).sum().backward()
        total = getattr(gg, fn_name)(model.parameters(), **kwargs)
        assert type(total) is torch.Tensor
        out.append((total.item(), [p.grad.full_tensor().tolist() for p in model.parameters()]))
    return out


@pytest.mark.slow
def test_fsdp2_clipping_equals_single_process():
    from dist_utils import run_distributed

    ranks = run_distributed(_fsdp2_clip, 2)
    for k, (fn_name, kwargs) in enumerate(FSDP2_CASES):
        model, x = _small_model()
        model(x).pow(2).sum().backward()
        total = getattr(gg, fn_name)(model.parameters(), **kwargs)
        for r in ranks:
            assert r[k][0] == pytest.approx(total.item(), rel=1e-6), fn_name
            for got, p in zip(r[k][1], model.parameters(), strict=True):
                torch.testing.assert_close(torch.tensor(got), p.grad, rtol=1e-6, atol=1e-7)


def test_scale_grads_per_tensor_cpu_only_touches_clipped():
    a, b = torch.ones(3), torch.ones(2)
    clip_mod.scale_grads_([a, b], torch.tensor([1.0, 0.5]))
    assert torch.equal(a, torch.ones(3)) and torch.equal(b, torch.full((2,), 0.5))
