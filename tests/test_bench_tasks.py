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
    assert len(T.expand_task_specs(["sgd"])) == 7
    assert T.expand_task_specs(["transformer"]) == [
        "gpt:preln", "gpt:postln", "gpt:corrupt", "gpt:bf16"]
    assert T.expand_task_specs(["all"]) == (T.expand_task_specs(["sgd"])
                                            + T.expand_task_specs(["transformer"]))
    assert T.expand_task_specs(["gpt:corrupt"]) == ["gpt:corrupt", "gpt:preln"]
    assert T.get_task("gpt").spec == "gpt:preln"
    with pytest.raises(ValueError, match="variant must be one of"):
        T.get_task("gpt:fp8")


# ---- the Transformer tasks (gradguard.bench.gpt) -------------------------------------


def test_gpt_tasks_as_specified():
    pre, post = T.get_task("gpt:preln"), T.get_task("gpt:postln")
    model = pre.build_model(0)
    assert len(model.blocks) == 2 and model.tok.weight.shape[1] == 64
    assert isinstance(model.lnf, torch.nn.LayerNorm)
    assert isinstance(post.build_model(0).lnf, torch.nn.Identity)  # Post-LN ends with a LN
    # GPT-2 initialisation: N(0, 0.02), residual projections / sqrt(2 * layers), zero biases
    assert abs(float(model.tok.weight.detach().std()) - 0.02) < 0.001
    assert abs(float(model.blocks[0].fc2.weight.detach().std()) - 0.01) < 0.0005
    assert float(model.blocks[0].qkv.bias.detach().abs().max()) == 0.0
    opt = pre.build_optimizer(model.parameters(), 0.01)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.95)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])
    # Pre-LN: linear warm-up over 10 % of the steps, then cosine to 10 % of the peak;
    # Post-LN: cosine from the first step
    assert pre.lr_factor(0, 300) == pytest.approx(1 / 30) and pre.lr_factor(29, 300) == 1.0
    assert pre.lr_factor(299, 300) == pytest.approx(0.1)
    assert pre.lr_factor(55, 101) == pytest.approx(0.55)  # half-way: steps 10..100
    assert post.lr_factor(0, 300) == 1.0 and post.lr_factor(299, 300) == pytest.approx(0.1)
    d = pre.data()
    assert d["val_windows"].shape == (256, 65) and d["vocab_size"] == len(d["vocab"])
    # the trivial predictor (unigram) is better than uniform, the cap 10x uniform
    assert pre.trivial_metric < math.log(d["vocab_size"]) == pre.loss_cap / 10
    x, y = pre.new_sampler(pre.batch_generator(0))(0)
    assert x.shape == (8, 64) and torch.equal(x[:, 1:], y[:, :-1])


def test_gpt_corruption_schedule():
    task = T.get_task("gpt:corrupt")
    faults = task.faults(3, 300)
    assert faults.steps == task.faults(3, 300).steps != task.faults(4, 300).steps
    assert len(faults.spikes) == 6 and len(faults.nan_steps) == 3  # 2 % and 1 % of 300
    assert faults.steps == set(faults.spikes) | faults.nan_steps and min(faults.steps) >= 10
    assert all(5.0 <= k <= 160.0 for k in faults.spikes.values())
    assert T.get_task("gpt:preln").faults(3, 300).steps == frozenset()

    model = task.build_model(0)
    spike, nan_step = min(faults.spikes), min(faults.nan_steps)
    batch = task.new_sampler(task.batch_generator(0))(0)
    assert faults.batch(0, batch) is batch
    x, y = faults.batch(spike, batch)
    assert torch.equal(x, batch[0]) and not torch.equal(y, batch[1])  # random targets

    def backward():
        model.zero_grad()
        task.loss(model, batch).backward()
        grads = [p.grad for p in model.parameters()]
        return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))

    clean = backward()
    faults.history[:] = [1.0, 3.0, 2.0]  # median 2
    faults.gradients(0, model)  # a clean step: its raw norm is recorded, grads untouched
    assert faults.history[-1] == pytest.approx(clean) and backward() == pytest.approx(clean)
    faults.history[:] = [1.0, 3.0, 2.0]
    backward()
    faults.gradients(spike, model)
    norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])))
    assert norm == pytest.approx(faults.spikes[spike] * 2.0, rel=1e-5)
    assert faults.history == [1.0, 3.0, 2.0]  # a spike is not a clean step
    backward()
    faults.gradients(nan_step, model)
    grad = model.head.weight.grad
    assert math.isnan(float(grad[0, 0])) and int(grad.isnan().sum()) == 1


def test_bf16_linear_is_autocast_linear():
    """One product in the arithmetic of torch.autocast(bfloat16), with fp32 kernels: the
    output and the three gradients are autocast's (all but a handful of entries bitwise,
    the rest one bf16 rounding apart, from the order of the fp32 sums); fp32 matches none."""
    from gradguard.bench.gpt import bf16_linear

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 48, generator=g).requires_grad_()
    w = (0.05 * torch.randn(80, 48, generator=g)).requires_grad_()
    b = (0.1 * torch.randn(80, generator=g)).requires_grad_()
    grad_out = torch.randn(64, 80, generator=g)

    def run(fn):
        for t in (x, w, b):
            t.grad = None
        out = fn().float()
        (out * grad_out).sum().backward()
        return [out.detach(), x.grad, w.grad, b.grad]

    def autocast():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return torch.nn.functional.linear(x, w, b)

    ref = run(autocast)
    emulated = run(lambda: bf16_linear(x, w, b))
    fp32 = run(lambda: torch.nn.functional.linear(x, w, b))
    for r, e, f in zip(ref, emulated, fp32, strict=True):
        assert float((r == e).float().mean()) >= 0.99 and float((r == f).float().mean()) < 0.5
        assert float((r - e).abs().max()) <= 2.0**-6 * float(r.abs().max())


def test_gpt_bf16_follows_autocast():
    """The bf16 variant's model computes what torch.autocast(bfloat16) computes with the
    same weights: bf16 logits, fp32 gradients, close to autocast's."""
    task = T.get_task("gpt:bf16")
    model = task.build_model(0)
    ref = T.get_task("gpt:preln").build_model(0)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters(), strict=True))
    x, y = task.new_sampler(task.batch_generator(0))(0)
    x, y = x[:2, :16], y[:2, :16]
    logits = model(x)
    assert torch.equal(logits, logits.to(torch.bfloat16).float())  # bf16 values
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = ref(x)
    assert auto.dtype == torch.bfloat16
    gap = (logits - auto.float()).detach().abs().max()
    assert float(gap) <= 0.02 * float(auto.detach().float().abs().max())
    fp32 = ref.float()(x)
    assert not torch.equal(logits, fp32)  # rounding is there
    for m, out in ((model, logits), (ref, auto.float())):
        m.zero_grad()
        torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        assert a.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
        scale = float(b.grad.abs().max()) + 1e-12
        assert float((a.grad - b.grad).abs().max()) <= 0.05 * scale


@pytest.mark.parametrize("variant", ["preln", "postln", "corrupt", "bf16"])
def test_gpt_short_run_is_deterministic_and_scheduled(variant):
    from gradguard.bench.run import run_one

    keep: dict = {}
    a = run_one(f"gpt:{variant}", "clip:1", 0.01, seed=1, steps=4, full_trace=True, keep=keep)
    b = run_one(f"gpt:{variant}", "clip:1", 0.01, seed=1, steps=4, full_trace=True)
    assert a["full"] == b["full"] and a["metric"] == b["metric"] and not a["diverged"]
    # the run trains at the task's schedule: its last step's learning rate
    lrs = {g["lr"] for g in keep["controller"].optimizer.param_groups}
    assert lrs == {0.01 * T.get_task(f"gpt:{variant}").lr_factor(3, 4)}


def test_gpt_corrupt_run_spikes_and_nan():
    """In a run, the spike reaches the method k x the median of the clean norms before it,
    and the NaN entry kills a method without a skip at that step."""
    from gradguard.bench.run import run_one

    task = T.get_task("gpt:corrupt")
    # a seed whose spike comes before its NaN step (20 steps: one of each)
    seed = next(s for s in range(100) if min(task.faults(s, 20).spikes)
                < min(task.faults(s, 20).nan_steps))
    faults = task.faults(seed, 20)
    ((spike, k),), (nan_step,) = faults.spikes.items(), faults.nan_steps
    r = run_one("gpt:corrupt", "none", 0.01, seed=seed, steps=20, full_trace=True)
    norms = r["full"]["grad_norm"]
    assert r["corrupt_steps"] == sorted(faults.steps)
    clean = sorted(norms[s] for s in range(spike) if s not in faults.steps)
    assert norms[spike] == pytest.approx(k * clean[len(clean) // 2], rel=1e-4)
    # the NaN step's own loss is finite; the NaN weight it leaves shows in the next loss
    assert r["diverged"] and r["diverged_step"] == nan_step + 1
