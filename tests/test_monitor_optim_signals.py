"""Tests of gradguard.monitor.optim_signals and the monitor's Adam-aware signals: values
against real torch optimizer steps and hand-written references, NaN where undefined, no
host read, the record keys, the update_spike detector and bitwise resume."""

from __future__ import annotations

import copy
import math
import traceback

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

from gradguard.monitor import FIELDS, Monitor
from gradguard.monitor.detectors import UpdateSpike
from gradguard.monitor.optim_signals import SIGNALS, OptimizerWatch, adam_family, tensor_signals
from gradguard.monitor.record import OPTIM_RECORD_KEYS, RECORD_KEYS, IntervalRows
from monitor_utils import nan_equal, strip_time

GV, UPD, PER_LR = (SIGNALS.index(s) for s in SIGNALS)
CPU = torch.device("cpu")

OPTIMIZERS = [
    (torch.optim.Adam, {}),
    (torch.optim.Adam, {"weight_decay": 0.1, "amsgrad": True}),
    (torch.optim.AdamW, {"weight_decay": 0.1}),
    (torch.optim.AdamW, {"weight_decay": 0.1, "foreach": True, "maximize": True}),
    (torch.optim.AdamW, {"weight_decay": 0.1, "fused": True}),
    (torch.optim.NAdam, {"weight_decay": 0.1}),
    (torch.optim.NAdam, {"weight_decay": 0.1, "decoupled_weight_decay": True}),
    (torch.optim.RAdam, {"weight_decay": 0.1}),
    (torch.optim.RAdam, {"weight_decay": 0.1, "decoupled_weight_decay": True}),
    (torch.optim.Adamax, {"weight_decay": 0.1}),
]


def _grad_v_reference(opt: torch.optim.Optimizer, p: torch.Tensor) -> float:
    """rms(g / (sqrt(v_hat) + eps)) from the state, by hand, in float64."""
    group = opt.param_groups[0]
    st = opt.state[p]
    beta2, eps, wd = group["betas"][1], group["eps"], group["weight_decay"]
    g = p.grad.double()
    if not group.get("decoupled_weight_decay", False):
        g = g + wd * p.detach().double()  # L2: the gradient the moments see
    if isinstance(opt, torch.optim.Adamax):
        denom = st["exp_inf"].double()
    else:
        t = float(st["step"])
        denom = (st["exp_avg_sq"].double() / (1 - beta2 ** t)).sqrt() + eps
    return float((g / denom).square().mean().sqrt())


@pytest.mark.parametrize(("cls", "kwargs"), OPTIMIZERS,
                         ids=[f"{c.__name__}-{'-'.join(k) or 'plain'}" for c, k in OPTIMIZERS])
def test_signals_equal_the_step_the_optimizer_then_takes(cls, kwargs):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(6, 5, dtype=torch.float64, generator=gen)),
              torch.nn.Parameter(torch.randn(5, dtype=torch.float64, generator=gen))]
    opt = cls(params, lr=0.01, **kwargs)
    watch = OptimizerWatch(2)
    assert watch.add(opt, params) == 2 and watch.watched == 2
    for t in range(8):  # RAdam switches to its adaptive rule after step 5
        for p in params:
            p.grad = torch.randn(p.shape, dtype=p.dtype, generator=gen) * (1 + t)
        sig = watch.compute(CPU)
        assert sig.shape == (len(SIGNALS), 2) and sig.dtype == torch.float32
        if t == 0:  # no state before the first step: NaN, not an error
            assert torch.isnan(sig).all()
        else:
            ref = [_grad_v_reference(opt, p) for p in params]
            assert sig[GV].tolist() == pytest.approx(ref, rel=1e-6)
        before = [p.detach().clone() for p in params]
        opt.step()
        measured = [float((p.detach() - b).norm() / b.norm())
                    for p, b in zip(params, before, strict=True)]
        if t > 0:
            assert sig[UPD].tolist() == pytest.approx(measured, rel=1e-6)
            assert sig[PER_LR].tolist() == pytest.approx([m / 0.01 for m in measured], rel=1e-6)


def test_fused_gradscaler_scale_is_divided_out():
    gen = torch.Generator().manual_seed(1)
    w = torch.nn.Parameter(torch.randn(4, 3, generator=gen))
    opt = torch.optim.AdamW([w], lr=0.01, fused=True)
    watch = OptimizerWatch(1)
    watch.add(opt, [w])
    for _ in range(3):
        w.grad = torch.randn(4, 3, generator=gen)
        opt.step()
    w.grad = torch.randn(4, 3, generator=gen)
    plain = watch.compute(CPU)
    w.grad = w.grad * 1024.0
    opt.grad_scale = torch.tensor(1024.0)  # what GradScaler.step sets on a fused optimizer
    try:
        scaled = watch.compute(CPU)
    finally:
        del opt.grad_scale
    assert torch.allclose(scaled, plain, rtol=1e-6)


def test_what_is_not_watched_is_nan_and_other_optimizers_are_ignored():
    a = torch.nn.Parameter(torch.ones(3))
    b = torch.nn.Parameter(torch.ones(3))
    zero = torch.nn.Parameter(torch.zeros(2))
    adam = torch.optim.Adam([a, zero], lr=0.1)
    sgd = torch.optim.SGD([b], lr=0.1)
    watch = OptimizerWatch(3)
    assert watch.add(sgd, [a, b, zero]) == 0 and adam_family(sgd) is None
    assert watch.add(adam, [a, b, zero]) == 2 and watch.watched == 2
    for p in (a, b, zero):
        p.grad = torch.ones_like(p)
    adam.step()
    zero.data.zero_()  # a zero weight: the ratio is undefined, not inf
    a.grad = None  # no gradient this step
    b.grad, zero.grad = torch.ones(3), torch.ones(2)
    sig = watch.compute(CPU)
    assert torch.isnan(sig[:, 0]).all() and torch.isnan(sig[:, 1]).all()  # no grad; SGD
    assert sig[GV, 2].item() == pytest.approx(1.0) and math.isnan(sig[UPD, 2].item())
    assert tensor_signals("adam", b, {}, adam.param_groups[0]) is None  # no state yet
    with pytest.raises(ValueError, match="family"):
        tensor_signals("lion", a, {}, adam.param_groups[0])
    with pytest.raises(ValueError, match="params"):
        watch.add(adam, [a])
    with pytest.raises(TypeError, match="optimizer"):
        watch.add("adam", [a, b, zero])  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# Sync-freedom
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["adam", "nadam", "radam", "adamax"])
@pytest.mark.parametrize("step_device", ["cpu", "cuda"])  # plain vs fused/capturable state
def test_compute_does_no_host_read_under_fake_tensor_mode(family, step_device):
    with FakeTensorMode():
        params = [torch.nn.Parameter(torch.rand(64, 32, device="cuda")),
                  torch.nn.Parameter(torch.rand(32, device="cuda"))]
        cls = {"adam": torch.optim.AdamW, "nadam": torch.optim.NAdam,
               "radam": torch.optim.RAdam, "adamax": torch.optim.Adamax}[family]
        opt = cls(params, lr=1e-3, weight_decay=0.1)
        for p in params:
            p.grad = torch.rand_like(p)
            second = "exp_inf" if family == "adamax" else "exp_avg_sq"
            opt.state[p] = {"step": torch.tensor(7.0, device=step_device),
                            "exp_avg": torch.rand_like(p), second: torch.rand_like(p),
                            "mu_product": torch.tensor(0.5, device=step_device)}
        watch = OptimizerWatch(3)
        watch.add(opt, [*params, torch.nn.Parameter(torch.rand(2, device="cuda"))])
        sig = watch.compute(torch.device("cuda"))  # any host read would raise here
        assert sig.shape == (len(SIGNALS), 3) and sig.device.type == "cuda"


def test_monitor_samples_without_host_read_until_the_interval_transfer():
    names = [f"h.{i}.weight" for i in range(3)]
    with FakeTensorMode():
        params = [torch.nn.Parameter(torch.rand(8, 8, device="cuda")) for _ in names]
        opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
        for p in params:
            p.grad = torch.rand_like(p)
            opt.state[p] = {"step": torch.tensor(3.0, device="cuda"),
                            "exp_avg": torch.rand_like(p), "exp_avg_sq": torch.rand_like(p)}
        mon = Monitor(names, log_every=4, device="cuda", sinks=[])
        assert mon.watch_optimizer(opt, params) == 3 and mon.watches_optimizer
        for step in range(3):
            mon.observe(step, torch.rand(len(FIELDS), device="cuda"),
                        torch.rand(len(names), device="cuda"))
        with pytest.raises(DataDependentOutputException) as err:
            mon.observe(3, torch.rand(len(FIELDS), device="cuda"),
                        torch.rand(len(names), device="cuda"))
    # The signals were computed and written; the first value read on the host is the
    # interval's one transfer.
    # (compute runs before flush_interval: had it read a value, it would be in the trace)
    frames = [f.name for f in traceback.extract_tb(err.tb)]
    assert "flush_interval" in frames and "compute" not in frames
    assert "write_aux" not in frames


def test_buffer_aux_rows_ride_the_same_read():
    from gradguard.monitor.buffer import RingBuffer

    buf = RingBuffer(4, rows=3, device="cpu")
    buf.write(1, torch.tensor([1.0]), torch.tensor([2.0, 3.0, 4.0]))
    buf.set_aux_rows(2)  # reallocated: the pending row is kept
    assert buf.aux_rows == 2 and buf.shape == (3, 4) and buf.steps == [1]
    buf.write(2, torch.tensor([5.0]), torch.tensor([6.0, 7.0, 8.0]))
    buf.write_aux(torch.full((2, 1), math.nan), torch.arange(6.0).reshape(2, 3))
    values, steps, aux = buf.read_with_aux()
    assert values.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]] and steps == [1, 2]
    assert aux[:, 1:].tolist() == [[0, 1, 2], [3, 4, 5]] and torch.isnan(aux[:, 0]).all()
    buf.write(3, torch.tensor([9.0]), torch.zeros(3))
    assert buf.read_with_aux()[2] is None  # not written since the last read
    with pytest.raises(RuntimeError, match="aux_rows"):
        RingBuffer(4, rows=3, device="cpu").write_aux(torch.zeros(1, 1), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="aux_rows"):
        buf.set_aux_rows(-1)


class _Wrapper(torch.optim.Optimizer):
    """An optimizer wrapper as accelerate's AcceleratedOptimizer: the real one inside."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:  # no super().__init__
        self.optimizer = optimizer


def test_a_wrapped_optimizer_is_read_through_its_inner_one():
    w = torch.nn.Parameter(torch.ones(3))
    inner = torch.optim.Adam([w], lr=0.1)
    watch = OptimizerWatch(1)
    assert watch.add(_Wrapper(_Wrapper(inner)), [w]) == 1
    w.grad = torch.ones(3)
    inner.step()
    assert watch.compute(CPU)[GV, 0].item() == pytest.approx(1.0)
    assert OptimizerWatch(1).add(_Wrapper(torch.optim.SGD([w], lr=0.1)), [w]) == 0


def test_unwatched_monitor_is_unchanged():
    w = torch.nn.Parameter(torch.ones(2))
    mon = Monitor(["w"], log_every=2, sinks=[])
    assert mon.watch_optimizer(torch.optim.SGD([w], lr=0.1), [w]) == 0
    assert not mon.watches_optimizer and mon.buffer.aux_rows == 0
    for step in (1, 2):
        mon.observe(step, torch.ones(len(FIELDS)), torch.ones(1))
    assert list(mon.records[-1]) == list(RECORD_KEYS)


# --------------------------------------------------------------------------------------
# In a training loop, fed as the Guard feeds it
# --------------------------------------------------------------------------------------


class _Loop:
    """A small regression MLP trained with AdamW; the monitor is fed before each step
    (norms and fields as the Guard computes them)."""

    def __init__(self, seed: int = 0, log_every: int = 5, **monitor_options) -> None:
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(),
                                         torch.nn.Linear(16, 1))
        self.names = [n for n, _ in self.model.named_parameters()]
        self.params = list(self.model.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=3e-3, betas=(0.9, 0.95),
                                     weight_decay=0.1)
        self.mon = Monitor(self.names, log_every=log_every, sinks=[], **monitor_options)
        self.mon.watch_optimizer(self.opt, self.params)
        self.gen = torch.Generator().manual_seed(seed + 100)
        self.step_count = 0

    def step(self, grad_factor: dict[int, float] | None = None,
             v_factor: dict[int, float] | None = None) -> torch.Tensor:
        """One step; returns the signals' reference: ||update|| / ||weight|| measured.

        ``grad_factor``/``v_factor``: multiply these layers' gradient / second moment."""
        self.step_count += 1
        x = torch.randn(32, 8, generator=self.gen)
        loss = (self.model(x).squeeze(1) - x[:, 0].sin()).square().mean()
        self.opt.zero_grad()
        loss.backward()
        for i, f in (grad_factor or {}).items():
            self.params[i].grad.mul_(f)
        for i, f in (v_factor or {}).items():
            self.opt.state[self.params[i]]["exp_avg_sq"].mul_(f)
        self.grads = [p.grad.clone() for p in self.params]
        self.v_before = [self.opt.state[p]["exp_avg_sq"].clone() if p in self.opt.state
                         else None for p in self.params]
        norms = torch.stack([p.grad.norm() for p in self.params])
        total = norms.norm()
        fields = torch.stack([total, total, torch.tensor(math.inf), torch.tensor(1.0),
                              torch.tensor(0.0), torch.tensor(0.0), torch.tensor(0.0),
                              loss.detach()])
        self.mon.observe(self.step_count, fields, norms)
        before = [p.detach().clone() for p in self.params]
        self.opt.step()
        return torch.stack([(p.detach() - b).norm() / b.norm()
                            for p, b in zip(self.params, before, strict=True)])


def test_record_carries_the_signals_of_the_interval_last_step():
    loop = _Loop(log_every=5)
    for _ in range(9):
        loop.step()
    measured = loop.step()  # step 10: completes the second interval
    grads, v_before = loop.grads, loop.v_before
    rec = loop.mon.records[-1]
    keys = list(RECORD_KEYS)
    assert list(rec) == [*keys[:keys.index("rank")], *OPTIM_RECORD_KEYS, "rank", "time"]
    assert rec["optim_step"] == 10 and (rec["step_first"], rec["step_last"]) == (6, 10)
    assert rec["layer_update_ratio"] == pytest.approx(measured.tolist(), rel=1e-4)
    # grad/v of the step, by hand from the state the optimizer had before it
    bc2 = 1 - 0.95 ** 9
    ref = [float((g / ((v / bc2).sqrt() + 1e-8)).square().mean().sqrt())
           for g, v in zip(grads, v_before, strict=True)]
    assert rec["layer_grad_v_rms"] == pytest.approx(ref, rel=1e-5)
    ups = rec["layer_update_ratio"]
    k = max(range(len(ups)), key=ups.__getitem__)
    assert rec["update_ratio_max"] == ups[k] and rec["update_ratio_top_layer"] == loop.names[k]
    assert rec["update_ratio_median"] == pytest.approx(sorted(ups)[1] / 2 + sorted(ups)[2] / 2)
    assert rec["grad_v_rms_max"] == max(rec["layer_grad_v_rms"])
    # A partial interval flushed by hand has no sample: NaN and None, same keys.
    loop.step()
    partial = loop.mon.flush_interval().record
    assert list(partial) == list(rec) and partial["optim_step"] is None
    assert partial["update_ratio_top_layer"] is None and math.isnan(partial["grad_v_rms_max"])
    assert all(math.isnan(x) for x in partial["layer_update_ratio"])


def test_update_spike_fires_on_an_injected_spike_and_not_on_a_steady_run():
    steady = _Loop(seed=3)
    for _ in range(200):
        steady.step()
    assert steady.mon.event_counts["update_spike"] == 0, list(steady.mon.events)
    spiked = _Loop(seed=3)
    for step in range(1, 201):
        # Step 100: the first layer's second moment underestimated 1e4x (the cause of
        # update spikes in Wortsman et al.); step 150: the last layer's gradient 300x.
        # Both are the last steps of an interval (log_every=5), where the monitor samples.
        spiked.step(grad_factor={2: 300.0} if step == 150 else None,
                    v_factor={0: 1e-4} if step == 100 else None)
    events = [e for e in spiked.mon.events if e.kind == "update_spike"]
    assert [e.step for e in events] == [100, 150], events

    def jumped(event):
        return {(j["layer"], j["signal"]) for j in event.data["jumps"]}

    # An out-of-date v shows in both signals. Adam's update is bounded: with beta2 = 0.95
    # a 300x gradient moves it ~2x, so a gradient spike shows in grad/sqrt(v) only.
    assert jumped(events[0]) == {("0.weight", "grad_v_rms"), ("0.weight", "update_ratio_per_lr")}
    assert jumped(events[1]) == {("2.weight", "grad_v_rms")}
    assert events[0].layers == ["0.weight"] and "0.weight" in events[0].message
    assert all(j["ratio"] > 3 for e in events for j in e.data["jumps"])
    assert spiked.mon.records[19]["update_ratio_top_layer"] == "0.weight"
    assert spiked.mon.records[29]["grad_v_rms_top_layer"] == "2.weight"


def test_monitor_resume_is_bitwise():
    def run(split: int | None) -> tuple[list, list]:
        loop = _Loop(seed=5, update_spike_warmup=2)
        for step in range(1, 61):
            loop.step(v_factor={1: 1e-4} if step == 40 else None)  # an event after the split
            if step == split:
                saved = copy.deepcopy((loop.mon.state_dict(), loop.model.state_dict(),
                                       loop.opt.state_dict(), loop.gen.get_state()))
                records = list(loop.mon.records)
                events = list(loop.mon.events)
                loop = _Loop(seed=99, update_spike_warmup=2)  # fresh objects, then load
                mon_sd, model_sd, opt_sd, gen_state = saved
                loop.model.load_state_dict(model_sd)
                loop.opt.load_state_dict(opt_sd)
                loop.gen.set_state(gen_state)
                loop.mon.load_state_dict(mon_sd)
                loop.step_count = step
                loop.mon.records.extend(records)
                loop.mon.events.extend(events)
        return strip_time(list(loop.mon.records)), list(loop.mon.events)

    full_records, full_events = run(None)
    resumed_records, resumed_events = run(23)  # mid-interval
    assert any(e.kind == "update_spike" for e in full_events)
    assert nan_equal(resumed_records, full_records)
    assert resumed_events == full_events


# --------------------------------------------------------------------------------------
# The detector alone
# --------------------------------------------------------------------------------------


def _rows(step: int, values: list[list[float]], bad: bool = False,
          skipped: bool = False) -> IntervalRows:
    """A one-step interval whose optimizer sample has ``values`` per signal and layer."""
    n = len(values[0])
    block = torch.zeros(1, len(FIELDS) + n, dtype=torch.float64)
    block[0, 0] = math.nan if bad else 1.0
    block[0, FIELDS.index("skipped")] = float(skipped)
    block[0, len(FIELDS):] = 1.0
    return IntervalRows(block, [step], torch.tensor(values, dtype=torch.float64))


def test_detector_rule_by_hand():
    det = UpdateSpike(["a", "b"], z=4.0, factor=3.0, beta=0.5, warmup=2)
    # grad_v of "a": 1, 2 (mean of logs log(sqrt 2), variance (log 2 / 2)^2)
    for step, a in ((1, 1.0), (2, 2.0)):
        assert det.update(_rows(step, [[a, 1.0], [1.0, 1.0], [1.0, 1.0]])) == []
    mean, std = math.log(2) / 2, math.log(2) / 2
    assert det.optim_log_mean[0, 0].item() == pytest.approx(mean)
    assert det.optim_log_var[0, 0].item() == pytest.approx(std ** 2)
    band = max(4 * std, math.log(3.0))  # = 4 std = 1.386 > log 3 = 1.0986
    below = math.exp(mean + band) * 0.99
    assert det.update(_rows(3, [[below, 1.0], [1.0, 1.0], [1.0, 1.0]])) == []
    # NaN, inf and zero samples, and samples of non-finite steps, change nothing
    snapshot = det.state_dict()
    assert det.update(_rows(4, [[math.nan, math.nan], [1.0, 1.0], [0.0, math.inf]])) == []
    assert det.update(_rows(5, [[1e9, 1e9], [1e9, 1e9], [1e9, 1e9]], bad=True)) == []
    assert det.update(_rows(5, [[1e9, 1e9], [1e9, 1e9], [1e9, 1e9]], skipped=True)) == []
    for name, value in det.state_dict().items():
        assert torch.equal(value.nan_to_num(), snapshot[name].nan_to_num()), name
    mean3 = det.optim_log_mean[0, 0].item()
    std3 = det.optim_log_var[0, 0].sqrt().item()
    limit = math.exp(mean3 + max(4 * std3, math.log(3.0)))
    events = det.update(_rows(6, [[limit * 1.01, 1.0], [1.0, 1.0], [1.0, 1.0]]))
    assert len(events) == 1 and events[0].layers == ["a"] and events[0].step == 6
    assert events[0].data["jumps"][0]["signal"] == "grad_v_rms"
    # still above: flagged, no second event; back inside: re-armed
    assert det.update(_rows(7, [[limit * 1e3, 1.0], [1.0, 1.0], [1.0, 1.0]])) == []
    assert bool(det.optim_flagged[0, 0])
    det.update(_rows(8, [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]))
    assert not bool(det.optim_flagged[0, 0])


def test_detector_state_round_trip_and_old_state():
    det = UpdateSpike(["a"], warmup=1)
    for step in range(1, 5):
        det.update(_rows(step, [[float(step)], [1.0], [2.0]]))
    other = UpdateSpike(["a"], warmup=1)
    other.load_state_dict(det.state_dict())
    for name in det.state_names:
        assert torch.equal(getattr(other, name), getattr(det, name))
    other.load_state_dict({"log_base": None})  # saved before this detector existed
    assert int(other.optim_samples.sum()) == 0
    with pytest.raises(ValueError, match="update_spike_z"):
        UpdateSpike(["a"], z=0.0)
    with pytest.raises(ValueError, match="update_spike_factor"):
        Monitor(["a"], update_spike_factor=1.0)
    with pytest.raises(TypeError, match="update_spike_warmup"):
        Monitor(["a"], update_spike_warmup=1.5)


# --------------------------------------------------------------------------------------
# FSDP2: this rank's shard, no collective
# --------------------------------------------------------------------------------------


def _fsdp2_signals(rank, world):
    from torch.distributed.fsdp import fully_shard

    from gradguard.testing import CollectiveCounter

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Linear(8, 2))
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    params = list(model.parameters())
    watch = OptimizerWatch(len(params))
    watch.add(opt, params)
    gen = torch.Generator().manual_seed(rank)
    for _ in range(3):
        model(torch.randn(4, 6, generator=gen)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    model(torch.randn(4, 6, generator=gen)).square().sum().backward()
    with CollectiveCounter() as counter:
        sig = watch.compute(CPU)
    # by hand, from the local shards
    ref = []
    for p in params:
        g, v = p.grad.to_local(), opt.state[p]["exp_avg_sq"].to_local()
        bc2 = 1 - 0.999 ** float(opt.state[p]["step"])
        ref.append(float((g / ((v / bc2).sqrt() + 1e-8)).square().mean().sqrt()))
    return counter.count, type(sig).__name__, sig[GV].tolist(), ref


@pytest.mark.slow
def test_fsdp2_signals_are_over_the_local_shard_without_collective():
    from dist_utils import run_distributed

    for count, kind, got, ref in run_distributed(_fsdp2_signals, 2):
        assert count == 0 and kind == "Tensor"
        assert got == pytest.approx(ref, rel=1e-5)
