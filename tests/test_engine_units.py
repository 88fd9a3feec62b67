"""gradguard.engine.units: unit-wise norms (PyTorch layout), fp32 accumulation, no host sync."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import gradguard as gg
from gradguard.engine import units

SHAPES = [(7,), (3, 5), (4, 3, 2, 2), (), (1, 1), (64, 33)]


def _tensors(shapes=SHAPES, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).mul(scale).to(dtype) for s in shapes]


# ----- unit-wise norms (AGC) -----------------------------------------------------------

def _ref_unit_norms(t):
    if t.ndim <= 1:
        return torch.linalg.vector_norm(t.double()).reshape((1,) * t.ndim)
    return torch.linalg.vector_norm(t.double(), dim=tuple(range(1, t.ndim)), keepdim=True)


@pytest.mark.parametrize("big", [False, True])
def test_unit_norms_pytorch_layout(big):
    n = 300 if big else 3  # big tensors take the per-tensor path, small ones are batched
    shapes = [(n, 400), (8, 3, 3, 3), (n,), (), (50, 16), (7, 400), (0, 4)]
    ts = _tensors(shapes)
    got = gg.unit_norms(ts)
    for t, u in zip(ts, got, strict=True):
        assert u.shape == units.unit_shape(t)
        torch.testing.assert_close(u.double(), _ref_unit_norms(t), rtol=1e-5, atol=1e-6)


def test_unit_norms_embedding_rows_are_units():
    emb = torch.nn.Embedding(10, 4)
    u = gg.unit_norms([emb.weight])[0]
    assert u.shape == (10, 1)
    torch.testing.assert_close(u.flatten(), emb.weight.detach().norm(dim=1))


def test_unit_norms_low_precision_accumulate_fp32():
    t = torch.full((2, 65536), 300.0, dtype=torch.float16)
    u = gg.unit_norms([t])[0]
    assert u.dtype == torch.float32
    torch.testing.assert_close(u.flatten(), torch.full((2,), 76800.0), rtol=1e-3, atol=0)


# ----- no host synchronisation ---------------------------------------------------------

def test_unit_norms_are_sync_free_on_fake_cuda():
    with FakeTensorMode():
        ts = [torch.randn(s, device="cuda") for s in [(300, 400), (8, 3, 3, 3), (5,), (4, 4)]]
        units = gg.unit_norms(ts)
        assert units[0].shape == (300, 1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_unit_norms_cuda_sync_debug_mode():
    ts = [torch.randn(s, device="cuda") for s in [(300, 400), (5,), (4, 4)]]
    ts.append(torch.randn(10, 10, device="cuda", dtype=torch.float16))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gg.unit_norms(ts)
    finally:
        torch.cuda.set_sync_debug_mode("default")
