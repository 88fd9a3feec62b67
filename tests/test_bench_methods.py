"""The benchmark's methods (:mod:`gradguard.bench.methods`): specs, controllers against
torch, the plug-in protocol, the Guard methods."""

from __future__ import annotations

import pytest
import torch

from gradguard.bench import methods as M
from gradguard.bench import tasks as T
from gradguard.bench.run import run_one


def test_method_specs_canonical_and_errors():
    assert M.get_method("clip:1.0").spec == "clip:1"
    assert M.get_method("value").arg == 1.0 and M.get_method("value").spec == "value:1"
    assert M.get_method("agc").spec == "agc:0.01"
    assert M.get_method("none").spec == "none"
    for bad, match in [("clip", "needs an argument"), ("clip:-1", "must be in"),
                       ("clip:abc", "must be a number"), ("none:3", "takes no argument"),
                       ("bogus", "unknown method 'bogus'"), ("tuned", "meta-method"),
                       ("clip:nan", "must be in"), ("", "non-empty")]:
        with pytest.raises(ValueError, match=match):
            M.get_method(bad)
    specs, metas = M.expand_method_specs(["none", "tuned", "clip:1"])
    assert specs == ["none", "clip:0.1", "clip:0.3", "clip:1", "clip:3", "clip:10"]
    assert metas == {"tuned": ("clip:0.1", "clip:0.3", "clip:1", "clip:3", "clip:10")}


def _ctx(seed=0):
    task = T.get_task("deep-mlp-digits")
    model = task.build_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: inspect clipped grads
    x, y = task.new_sampler(task.batch_generator(seed))(0)
    (task.loss(model, (x, y)) * 50).backward()
    return M.MethodContext(model, opt, tuple(task.head_parameters(model)))


def test_clip_controller_matches_torch():
    ctx = _ctx()
    ref = [p.grad.clone() for p in ctx.parameters()]
    info = M.get_method("clip:1").build(ctx).step()
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in ref]))
    assert float(info.norm) == pytest.approx(float(total), rel=1e-5) and info.clipped
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ctx.parameters()]))
    assert float(after) == pytest.approx(1.0, rel=1e-4)


def test_value_and_agc_controllers():
    ctx = _ctx()
    info = M.get_method("value:0.01").build(ctx).step()
    assert info.clipped and max(float(p.grad.abs().max()) for p in ctx.parameters()) <= 0.01
    ctx = _ctx()
    head_before = [p.grad.clone() for p in ctx.head]
    info = M.get_method("agc:0.001").build(ctx).step()
    assert info.clipped and not info.skipped
    assert all(torch.equal(a, p.grad) for a, p in zip(head_before, ctx.head, strict=True))


@pytest.mark.parametrize("spec", ["peer-zclip", "peer-zclip:none", "peer-autoclip"])
def test_peer_methods(spec):
    m = M.get_method(spec)
    if not m.definition.available():
        with pytest.raises(M.MethodUnavailable, match="not installed"):
            m.build(_ctx())
        return
    r = run_one("deep-linear", spec, 0.01, seed=0, steps=3)
    assert r["steps_run"] >= 1 and r["method"] == m.spec


def test_guard_style_method_plugs_in():
    """A method that works inside optimizer.step() (as an attached Guard does), in a few
    lines: the protocol the Guard methods will use."""

    class FakeGuard:  # stands in for gg.Guard(params, clip=...) + attach(optimizer)
        def __init__(self, params, clip):
            self.params, self.clip = list(params), clip

        def attach(self, opt):
            opt.register_step_pre_hook(lambda *_: self._run())

        def _run(self):
            self.last_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
            self.last_clipped = self.last_norm > self.clip
            self.last_skipped = torch.tensor(False)

    name = "fakeguard-test"
    try:
        @M.register_method(name, parse=M.float_arg(name, 1.0), help="test only")
        def _fake(ctx: M.MethodContext, clip: float) -> M.Controller:
            guard = FakeGuard(ctx.model.parameters(), clip=clip)
            guard.attach(ctx.optimizer)
            return M.StepThenReport(ctx.optimizer, lambda: M.StepInfo(
                guard.last_norm, guard.last_clipped, guard.last_skipped))

        M.register_alias("fakeauto-test", f"{name}:1")
        a = run_one("deep-linear", "fakeauto-test", 0.03, seed=0, steps=5, full_trace=True)
        b = run_one("deep-linear", "clip:1", 0.03, seed=0, steps=5, full_trace=True)
        assert a["method"] == f"{name}:1"
        assert a["full"]["loss"] == b["full"]["loss"] and a["frac_clipped"] == 1.0
        with pytest.raises(ValueError, match="already registered"):
            M.register_method(name)
    finally:
        M.unregister(name)
        M.unregister("fakeauto-test")
    with pytest.raises(ValueError, match="unknown method 'fakeauto-test'"):
        M.get_method("fakeauto-test")


def test_guard_methods_registered_and_skip_nan_batch():
    assert M.get_method("auto").spec == "guard:auto"
    assert M.get_method("guard:1.0").spec == "guard:1"
    with pytest.raises(ValueError, match="guard:bogus"):
        M.get_method("guard:bogus")
    specs, _ = M.expand_method_specs(["default"])
    assert {"guard:auto", "guard:zclip", "guard:autoclip", "guard:adagc"} <= set(specs)
    steps = 12
    (bad,) = T.get_task("spike-injection:nan").corruption_steps(0, steps)
    r = run_one("spike-injection:nan", "auto", 0.003, seed=0, steps=steps)
    assert not r["diverged"] and r["frac_skipped"] == pytest.approx(1 / steps)
    assert r["corrupt_steps"] == [bad]
