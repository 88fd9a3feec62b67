"""gradguard.engine.norms: per-tensor and total norms, exact against torch/fp64 references,
fp32 accumulation, every norm order torch takes, no host sync."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

import gradguard as gg
from gradguard.engine import norms

SHAPES = [(7,), (3, 5), (4, 3, 2, 2), (), (1, 1), (64, 33)]
NORM_TYPES = [1.0, 2.0, 3.0, math.inf]


def _tensors(shapes=SHAPES, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).mul(scale).to(dtype) for s in shapes]


@pytest.mark.parametrize("p", NORM_TYPES)
@pytest.mark.parametrize("foreach", [None, False])
def test_total_norm_equals_torch_fp32(p, foreach):
    ts = _tensors()
    ours = gg.get_total_norm(ts, p, foreach=foreach)
    theirs = torch.nn.utils.get_total_norm(ts, p, foreach=foreach)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("p", NORM_TYPES)
def test_tensor_norms_order_and_values(p):
    ts = _tensors()
    got = gg.tensor_norms(ts, p)
    want = torch.stack([torch.linalg.vector_norm(t, p) for t in ts])
    torch.testing.assert_close(got, want)


def test_mixed_dtypes_keep_input_order():
    ts = [torch.ones(4), torch.ones(9, dtype=torch.float16), torch.ones(16, dtype=torch.bfloat16),
          torch.ones(25)]
    got = gg.tensor_norms(ts)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor([2.0, 3.0, 4.0, 5.0]))


def test_fp64_inputs_give_fp64():
    ts = [torch.ones(4, dtype=torch.float64), torch.ones(9)]
    assert gg.tensor_norms(ts).dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("p", NORM_TYPES)
def test_low_precision_large_values_finite_and_accurate(dtype, p):
    # Entries near the top of fp16's range: every square overflows fp16.
    g = torch.Generator().manual_seed(1)
    ts = [(torch.rand(s, generator=g) * 6e4 + 100).to(dtype) for s in [(65536,), (300, 7), (5,)]]
    got = gg.get_total_norm(ts, p)
    ref = torch.linalg.vector_norm(torch.cat([t.double().flatten() for t in ts]), p)
    assert torch.isfinite(got)
    assert got.dtype == torch.float32
    assert abs(got.double().item() - ref.item()) <= 1e-3 * ref.item()


def test_issue_example_fp16_norm_76800():
    g = torch.full((65536,), 300.0, dtype=torch.float16)
    assert torch.isinf(torch.nn.utils.get_total_norm([g]))  # the defect we fix
    got = gg.get_total_norm([g]).item()
    assert abs(got - 76800.0) <= 1e-3 * 76800.0


def test_nonfinite_propagates():
    ts = [torch.ones(3), torch.tensor([1.0, float("nan")]), torch.ones(2)]
    n = gg.tensor_norms(ts)
    assert torch.isfinite(n[0]) and torch.isnan(n[1]) and torch.isfinite(n[2])
    assert torch.isnan(gg.total_norm(n))
    with pytest.raises(RuntimeError, match="non-finite"):
        gg.get_total_norm(ts, error_if_nonfinite=True)
    inf = [torch.tensor([float("inf"), 1.0])]
    assert torch.isinf(gg.get_total_norm(inf))


def test_empty_and_none_grads():
    assert gg.get_total_norm([]).item() == 0.0
    assert gg.tensor_norms([]).numel() == 0
    a = torch.nn.Parameter(torch.ones(3))
    b = torch.nn.Parameter(torch.ones(2))
    b.grad = torch.full((2,), 2.0)
    grads, n = norms.grad_norms([a, b])
    assert len(grads) == 1
    torch.testing.assert_close(n, torch.tensor([math.sqrt(8.0)]))


def test_accepts_generator_and_single_tensor():
    model = torch.nn.Linear(3, 2)
    model(torch.ones(1, 3)).sum().backward()
    _, n = norms.grad_norms(model.parameters())
    assert n.shape == (2,)
    assert gg.tensor_norms(torch.ones(4)).item() == 2.0


@pytest.mark.parametrize("bad", ["two", None, [1, 2], True, torch.tensor(2.0)])
def test_norm_type_must_be_a_number(bad):
    with pytest.raises(TypeError, match="norm_type"):
        gg.get_total_norm([torch.ones(2)], bad)


def test_norm_type_nan_is_rejected():
    with pytest.raises(ValueError, match="norm_type"):
        gg.get_total_norm([torch.ones(2)], float("nan"))


@pytest.mark.parametrize("p", [0, -1.0, -0.5, -math.inf])
def test_strict_norm_type_rejects_what_only_torch_functions_accept(p):
    # The Guard and AGC keep the strict check; the torch-compatible functions take p <= 0.
    with pytest.raises(ValueError, match="norm_type must be > 0"):
        norms.validate_norm_type(p)
    assert norms.validate_norm_type(p, torch_compatible=True) == p


@pytest.mark.parametrize(("text", "p"), [("inf", math.inf), ("-inf", -math.inf), ("2", 2.0)])
def test_norm_type_strings_like_torch(text, p):
    x = [torch.tensor([3.0, -4.0])]
    assert torch.equal(gg.get_total_norm(x, text), torch.nn.utils.get_total_norm(x, text))
    assert norms.validate_norm_type(text, torch_compatible=True) == p


@pytest.mark.parametrize("p", [0.0, -1.0, -0.5, -math.inf, 0.5, 3.0, math.inf])
@pytest.mark.parametrize("foreach", [None, False])
def test_every_torch_norm_order_equals_torch(p, foreach):
    ts = _tensors()
    ts[1][0, 0] = 0.0  # a zero entry: the 0-norm counts, negative orders give 0
    ours = gg.get_total_norm(ts, p, foreach=foreach)
    theirs = torch.nn.utils.get_total_norm(ts, p, foreach=foreach)
    assert torch.equal(ours, theirs), (ours, theirs)
    torch.testing.assert_close(gg.tensor_norms(ts, p, foreach=foreach),
                               torch.stack([torch.linalg.vector_norm(t, p) for t in ts]),
                               rtol=0, atol=0)


@pytest.mark.parametrize(("p", "empty"), [(math.inf, 0.0), (-math.inf, math.inf),
                                          (-1.0, math.inf), (0.0, 0.0), (2.0, 0.0)])
def test_empty_tensors_do_not_change_the_total(p, empty):
    # torch raises for inf, -inf and p < 0 on an empty tensor (no identity); an empty
    # gradient (an uneven FSDP2 shard, a zero-size parameter) must not change the total.
    ts = _tensors([(3, 4), (5,)])
    with_empty = [ts[0], torch.zeros(0), ts[1]]
    assert gg.tensor_norms(with_empty, p)[1].item() == empty
    assert torch.equal(gg.get_total_norm(with_empty, p), gg.get_total_norm(ts, p))


def test_rejects_integer_and_sparse_and_non_tensors():
    with pytest.raises(TypeError, match="dtype"):
        gg.tensor_norms([torch.ones(3, dtype=torch.int64)])
    p = torch.nn.Parameter(torch.ones(3, 2))
    p.grad = torch.ones(3, 2).to_sparse()
    with pytest.raises(TypeError, match=r"sparse|layout"):
        norms.get_grads([p])
    with pytest.raises(TypeError, match="parameters"):
        norms.get_grads(3)
    with pytest.raises(TypeError, match=r"parameters\[1\]"):
        norms.get_grads([p, "x"])


@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(
        st.lists(st.integers(1, 6), min_size=0, max_size=4).map(tuple), min_size=1, max_size=6
    ),
    p=st.sampled_from(NORM_TYPES),
    seed=st.integers(0, 10_000),
)
def test_total_is_norm_of_concatenation(shapes, p, seed):
    ts = _tensors(shapes, seed=seed)
    got = gg.get_total_norm(ts, p).double()
    ref = torch.linalg.vector_norm(torch.cat([t.double().flatten() for t in ts]), p)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


# ----- no host synchronisation ---------------------------------------------------------

def test_norm_engine_is_sync_free_on_fake_cuda():
    with FakeTensorMode():
        ts = [torch.randn(s, device="cuda") for s in [(300, 400), (8, 3, 3, 3), (5,), (4, 4)]]
        half = [torch.randn(10, 10, device="cuda", dtype=torch.float16)]
        for p in NORM_TYPES:
            n = gg.tensor_norms(ts + half, p)
            assert n.device.type == "cuda" and n.shape == (5,)
            t = gg.total_norm(n, p)
            assert t.device.type == "cuda"
            gg.get_total_norm(ts, p)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sync_debug_mode():
    ts = [torch.randn(s, device="cuda") for s in [(300, 400), (5,), (4, 4)]]
    ts.append(torch.randn(10, 10, device="cuda", dtype=torch.float16))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for p in NORM_TYPES:
            gg.get_total_norm(ts, p)
    finally:
        torch.cuda.set_sync_debug_mode("default")
