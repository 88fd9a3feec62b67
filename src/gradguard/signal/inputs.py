"""Feeding a model and running it without side effects: example inputs as ``(args, kwargs)``
batches (a dict is keyword arguments: ``input_ids``, ``attention_mask``), the tensors inside
nested structures and dataclass outputs, the outputs a probe starts its backward pass from,
and an isolated run (buffers, modes and the global RNG restored).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

__all__ = ["Call", "as_batches", "cuda_devices", "isolated", "output_tensors", "tensors_in"]


class Call(NamedTuple):
    """One batch given as positional *and* keyword arguments: ``model(*args, **kwargs)``."""

    args: tuple
    kwargs: dict


def as_batches(example_inputs: Any, n_batches: int,
               name: str = "example_inputs") -> list[tuple[tuple, dict]]:
    """Turn ``example_inputs`` into up to ``n_batches`` ``(args, kwargs)`` calls.

    A Tensor is one positional argument, a tuple is the positional arguments, a dict the
    keyword arguments (``input_ids``, ``attention_mask``), a :class:`Call` both; a list or
    any other iterable (a DataLoader) is a sequence of such batches. With one batch and
    ``n_batches > 1`` the batch is reused (fresh random cotangents and dropout masks each
    time). ``name`` is the argument's name in errors.
    """
    if isinstance(n_batches, bool) or not isinstance(n_batches, int) or n_batches < 1:
        raise ValueError(f"n_batches must be an int >= 1, got {n_batches!r}")

    def one(b: Any) -> tuple[tuple, dict]:
        if isinstance(b, Call):
            return tuple(b.args), dict(b.kwargs)
        if isinstance(b, Tensor):
            return (b,), {}
        if isinstance(b, tuple):
            return b, {}
        if isinstance(b, Mapping):
            return (), dict(b)
        raise TypeError(
            f"{name} must be a Tensor, a tuple of positional arguments, a dict of "
            f"keyword arguments, or an iterable of those; got {type(b).__name__}"
        )

    if isinstance(example_inputs, (Tensor, tuple, Mapping)):
        return [one(example_inputs)] * n_batches
    if isinstance(example_inputs, (str, bytes)) or not isinstance(example_inputs, Iterable):
        raise TypeError(
            f"{name} must be a Tensor, a tuple, a dict or an iterable of batches, "
            f"got {type(example_inputs).__name__}"
        )
    batches = []
    for b in example_inputs:
        if isinstance(b, list):
            b = tuple(b)
        batches.append(one(b))
        if len(batches) == n_batches:
            break
    if not batches:
        raise ValueError(f"{name} is an empty iterable")
    return batches


def _is_dataclass_instance(obj: Any) -> bool:
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)


def tensors_in(obj: Any) -> list[Tensor]:
    """The tensors in a (nested) structure of tuples, lists, dicts and dataclasses, in order."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in tensors_in(o)]
    if isinstance(obj, Mapping):
        return [t for o in obj.values() for t in tensors_in(o)]
    if _is_dataclass_instance(obj):
        return [t for f in dataclasses.fields(obj) for t in tensors_in(getattr(obj, f.name))]
    return []


def _field(output: Any, name: str) -> Any:
    if isinstance(output, Mapping):
        return output.get(name)
    return getattr(output, name, None) if _is_dataclass_instance(output) else None


def output_tensors(output: Any) -> list[Tensor]:
    """The outputs of a network, from a model's return value.

    ``logits`` when the output has them (a ``transformers`` ``ModelOutput``, a dict); for
    any other dataclass, its first field other than ``loss`` that holds tensors (e.g.
    ``last_hidden_state``); otherwise every tensor in it. A ``loss`` (computed from
    ``labels`` passed with the inputs) is the training objective, not an output of the
    network: it counts only when the output holds nothing else.

    Args:
        output: what the model returned.

    Returns:
        The tensors, in order (possibly none).
    """
    logits = _field(output, "logits")
    if tensors_in(logits):
        return tensors_in(logits)
    if _is_dataclass_instance(output):
        for f in dataclasses.fields(output):
            value = tensors_in(getattr(output, f.name)) if f.name != "loss" else []
            if value:
                return value
        return tensors_in(_field(output, "loss"))
    return tensors_in(output)


def cuda_devices(model: nn.Module) -> list[int]:
    """The indices of the CUDA devices holding the model's parameters or buffers."""
    return sorted({
        t.device.index or 0
        for t in list(model.parameters()) + list(model.buffers())
        if t.device.type == "cuda"
    })


@contextlib.contextmanager
def isolated(model: nn.Module, *, train: bool = True, seed: int = 0) -> Iterator[None]:
    """Run ``model`` without side effects on its buffers, modes or the global RNG.

    Buffers (BatchNorm running statistics, counters) are copied and restored, every
    module's ``training`` flag is restored, and the CPU and CUDA RNGs of the model's
    devices are forked and seeded with ``seed`` (dropout masks are reproducible and the
    caller's random stream is untouched).
    """
    modes = [(m, m.training) for m in model.modules()]
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    cuda = cuda_devices(model)
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for i in cuda:
            torch.cuda.default_generators[i].manual_seed(seed)
        model.train(train)
        try:
            yield
        finally:
            for m, flag in modes:
                m.training = flag
            with torch.no_grad():
                for b, copy in saved:
                    b.copy_(copy)


# --------------------------------------------------------------------------------------
# The tracer: execution order, activations around each layer, residual branches
# --------------------------------------------------------------------------------------
