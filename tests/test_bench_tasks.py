"""The benchmark's tasks (:mod:`gradguard.bench.tasks`): seeded, cached, as specified."""

from __future__ import annotations

import math

import pytest
import torch

from gradguard.bench import tasks as T


def test_seed_changes_init_and_batches_but_not_test_set():
    task = T.get_task("deep-mlp-digits")
    w0 = task.build_model(0)[0].weight
    w1 = task.build_model(1)[0].weight
    assert not torch.equal(w0, w1)
    assert torch.equal(task.build_model(0)[0].weight, w0)
    s0, s1 = task.new_sampler(task.batch_generator(0)), task.new_sampler(task.batch_generator(1))
    assert not torch.equal(s0(0)[0], s1(0)[0])
    assert task.data() is T.get_task("deep-mlp-digits").data()  # cached per process


def test_build_model_leaves_global_rng_alone():
    state = torch.get_rng_state()
    T.get_task("adding-rnn").build_model(3)
    assert torch.equal(torch.get_rng_state(), state)


def test_task_specs_as_specified():
    rnn = T.get_task("adding-rnn")
    model = rnn.build_model(0)
    assert model.rnn.hidden_size == 128 and model.rnn.nonlinearity == "tanh"
    assert abs(float(model.rnn.weight_hh_l0.detach().std()) - 1.5 / math.sqrt(128)) < 0.01
    assert abs(rnn.trivial_metric - 1 / 6) < 0.02  # always answering 1
    x, y = T.adding_problem(5, 50, torch.Generator().manual_seed(0))
    assert x.shape == (5, 50, 2) and torch.equal(x[..., 1].sum(1), torch.full((5,), 2.0))
    assert torch.allclose((x[..., 0] * x[..., 1]).sum(1), y)

    mlp = T.get_task("deep-mlp-digits")
    linears = [m for m in mlp.build_model(0) if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 50 and all(m.in_features == 64 for m in linears)
    d = mlp.data()
    assert d["x"].shape == (1500, 64) and d["x_test"].shape == (297, 64)
    assert abs(float(d["x"].mean())) < 1e-5

    lin = [m for m in T.get_task("deep-linear").build_model(0)]
    assert len(lin) == 20 and all(m.weight.shape == (32, 32) and m.bias is None for m in lin)

    lm = T.get_task("charlm-postln")
    model = lm.build_model(0)
    layer = model.blocks.layers[0]
    assert len(model.blocks.layers) == 4 and not layer.norm_first
    assert layer.self_attn.embed_dim == 64 and layer.self_attn.num_heads == 4
    assert isinstance(lm.build_optimizer(model.parameters(), 1e-3), torch.optim.Adam)


def test_spike_schedule_is_seeded_and_one_percent():
    task = T.get_task("spike-injection:x100")
    s = task.corruption_steps(0, 300)
    assert s == task.corruption_steps(0, 300) and len(s) == 3 and min(s) >= 10
    assert s != task.corruption_steps(1, 300)
    assert T.get_task("spike-injection:clean").corruption_steps(0, 300) == frozenset()
    x = torch.ones(4, 64)
    assert torch.equal(task.corrupt((x, x))[0], x * 100)
    bad = T.get_task("spike-injection:nan").corrupt((x, x))[0]
    assert bool(bad[0].isnan().all()) and bool(bad[1:].isfinite().all())


def test_task_spec_errors_and_expansion():
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        T.get_task("nope")
    with pytest.raises(ValueError, match="variant"):
        T.get_task("spike-injection:x7")
    with pytest.raises(ValueError, match="takes no variant"):
        T.get_task("adding-rnn:x")
    assert T.expand_task_specs(["spike-injection"]) == [
        "spike-injection:x100", "spike-injection:nan", "spike-injection:clean"]
    assert T.expand_task_specs(["spike-injection:nan"]) == [
        "spike-injection:nan", "spike-injection:clean"]
    assert len(T.expand_task_specs(["all"])) == 7
