"""The benchmark's Transformer tasks: a small decoder-only GPT trained with AdamW on the text
of ``pydoc_data.topics`` (it ships with CPython: no download), the way language models are
trained, where the usual protection is ``clip_grad_norm_(params, 1.0)``.

Task ``gpt``, variants (``gpt`` alone means all four):

* ``gpt:preln``: Pre-LN, linear warm-up over the first 10 % of the steps, then cosine decay
  to 10 % of the peak learning rate (the GPT-2/3 recipe).
* ``gpt:postln``: Post-LN (the original Transformer's), cosine decay from step 0, no warm-up.
* ``gpt:corrupt``: ``gpt:preln`` with faults: on 2 % of the steps a corrupted batch (random
  targets) whose gradient norm is 5-160x the median of the recent clean steps, and on 1 %
  of the steps a NaN in one gradient entry. Its clean reference is ``gpt:preln`` (same
  seeds: same initialisation and batches).
* ``gpt:bf16``: ``gpt:preln`` in the arithmetic of ``torch.autocast(dtype=torch.bfloat16)``.

The model (every variant): 2 blocks, width 64, 4 heads, context 64, GELU MLP of width 256,
untied embeddings, GPT-2 initialisation (N(0, 0.02), residual projections scaled by
1/sqrt(2 * layers), zero biases); about 120k parameters. AdamW, betas (0.9, 0.95),
eps 1e-8, weight decay 0.1 on matrices and embeddings and none on biases and LayerNorm
gains. Batch 8 windows of 64 characters, 300 steps. Metric: validation cross-entropy in
nats per character on 256 fixed windows of the held-out last 10 % of the text; the trivial
predictor is the unigram distribution of the training text (add-one smoothed).

**Why emulate bf16.** ``torch.autocast`` runs matrix products in bfloat16; CPUs without
bfloat16 instructions (AVX2 only) execute a bf16 matmul ~25x slower than an fp32 one,
which would make this task the most expensive of the benchmark by far. The ``bf16`` variant
therefore reproduces autocast's *numbers* with fp32 kernels: every matrix product (the
linear layers, attention) takes its inputs rounded to bfloat16 and rounds its output to
bfloat16, and the same casts round the gradients flowing back through them, as autocast's
casts do; products of bf16 numbers are exact in fp32 and the sums accumulate in fp32, as on
bf16 matrix units. Embeddings, LayerNorms, the residual stream, the loss and the parameters
(and so their gradients) stay in fp32, as under autocast.

References:
    Radford et al. 2019, "Language Models are Unsupervised Multitask Learners" (GPT-2:
    Pre-LN, initialisation). Vaswani et al. 2017, "Attention Is All You Need" (Post-LN).
    Xiong et al. 2020, "On Layer Normalization in the Transformer Architecture",
    arXiv:2002.04745 (Post-LN needs warm-up). Loshchilov & Hutter 2019, "Decoupled Weight
    Decay Regularization" (AdamW), arXiv:1711.05101. Kalamkar et al. 2019, "A Study of
    BFLOAT16 for Deep Learning Training", arXiv:1905.12322.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from gradguard.bench.taskbase import (
    DATA_SEED,
    FAULT_STREAM,
    Batch,
    Faults,
    Task,
    seeded_generator,
)

__all__ = ["GPT", "GPTFaults", "GPTModel", "NextCharacterTask", "bf16_linear",
           "cosine_schedule", "pydoc_text", "to_bf16"]

_TEXT: dict[str, Any] = {}
_VALIDATION: dict[tuple[int, int], dict[str, Any]] = {}


def pydoc_text() -> dict[str, Any]:
    """The text of ``pydoc_data.topics`` as character ids, loaded once per process.

    Topics are concatenated in sorted key order; the first 90 % is for training, the last
    10 % for validation. Returns ``{"train", "val"}`` (int64 tensors), ``"vocab_size"`` and
    ``"vocab"`` (the sorted characters).
    """
    if not _TEXT:
        from pydoc_data.topics import topics

        text = "".join(topics[k] for k in sorted(topics))
        vocab = sorted(set(text))
        index = {c: i for i, c in enumerate(vocab)}
        ids = torch.tensor([index[c] for c in text], dtype=torch.long)
        split = int(0.9 * ids.numel())
        _TEXT.update(train=ids[:split], val=ids[split:], vocab_size=len(vocab),
                     vocab="".join(vocab))
    return _TEXT


def to_bf16(x: Tensor) -> Tensor:
    """``x`` rounded to bfloat16 and back to its dtype; the gradient through it is rounded
    the same way (autograd casts it back through both conversions)."""
    return x.to(torch.bfloat16).to(x.dtype)


def bf16_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` in the arithmetic of bf16 autocast, with fp32 kernels: inputs, weight
    and bias rounded to bfloat16, products summed in fp32, the output rounded to bfloat16
    (returned as fp32); the gradients flowing back are rounded the same way."""
    b = None if bias is None else to_bf16(bias)
    return to_bf16(F.linear(to_bf16(x), to_bf16(weight), b))


def cosine_schedule(step: int, steps: int, warmup: int, final: float) -> float:
    """Linear warm-up over ``warmup`` steps (``(step + 1) / warmup``), then cosine decay
    from 1 to ``final`` at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - 1 - warmup)
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


class _Block(nn.Module):
    """One Transformer block: causal self-attention and a GELU MLP, Pre- or Post-LN."""

    def __init__(self, d: int, heads: int, pre_ln: bool, bf16: bool) -> None:
        super().__init__()
        self.heads, self.pre_ln, self.bf16 = heads, pre_ln, bf16
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def _low(self, x: Tensor) -> Tensor:
        return to_bf16(x) if self.bf16 else x

    def _linear(self, layer: nn.Linear, x: Tensor) -> Tensor:
        return bf16_linear(x, layer.weight, layer.bias) if self.bf16 else layer(x)

    def attention(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self._linear(self.qkv, x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = self._low(F.scaled_dot_product_attention(q, k, v, is_causal=True))
        return self._linear(self.proj, y.transpose(1, 2).reshape(b, t, c))

    def mlp(self, x: Tensor) -> Tensor:
        return self._linear(self.fc2, self._low(F.gelu(self._linear(self.fc, x))))

    def forward(self, x: Tensor) -> Tensor:
        if self.pre_ln:
            x = x + self.attention(self.ln1(x))
            return x + self.mlp(self.ln2(x))
        x = self.ln1(x + self.attention(x))
        return self.ln2(x + self.mlp(x))


class GPTModel(nn.Module):
    """A decoder-only character model: token and position embeddings, ``layers`` blocks,
    a final LayerNorm (Pre-LN only: a Post-LN block already ends with one), a linear head.

    Args:
        vocab: vocabulary size.
        d: width.
        heads: attention heads.
        layers: blocks.
        context: the longest sequence.
        pre_ln: Pre-LN (``True``) or Post-LN blocks.
        bf16: the arithmetic of bf16 autocast in the matrix products (see the module
            docstring).
        gen: the generator of the initialisation (GPT-2's).
    """

    def __init__(self, vocab: int, d: int, heads: int, layers: int, context: int, *,
                 pre_ln: bool, bf16: bool, gen: torch.Generator) -> None:
        super().__init__()
        self.bf16 = bf16
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(_Block(d, heads, pre_ln, bf16) for _ in range(layers))
        self.lnf: nn.Module = nn.LayerNorm(d) if pre_ln else nn.Identity()
        self.head = nn.Linear(d, vocab)
        residual_std = 0.02 / math.sqrt(2 * layers)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
                elif p.dim() >= 2:
                    std = residual_std if name.endswith(("proj.weight", "fc2.weight")) else 0.02
                    p.normal_(0.0, std, generator=gen)

    def forward(self, idx: Tensor) -> Tensor:
        h = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            h = block(h)
        h = self.lnf(h)
        return bf16_linear(h, self.head.weight, self.head.bias) if self.bf16 else self.head(h)


@dataclass
class GPTFaults(Faults):
    """The faults of ``gpt:corrupt`` for one run.

    At a spike step the batch's targets are replaced by uniform random characters, and
    after ``backward()`` the gradients are scaled so that their total norm is ``factor``
    times the median of the raw norms of the last ``window`` clean steps. At a NaN step
    one gradient entry (the head's first weight) becomes NaN, the way one overflowing
    product poisons a step. The raw norm of every other step is recorded.

    Attributes:
        spikes: step -> norm factor.
        nan_steps: steps with a NaN gradient entry.
        vocab: the vocabulary size (random targets).
        gen: the generator of the random targets.
        window: how many recent clean norms the median is over.
    """

    spikes: dict[int, float] = field(default_factory=dict)
    nan_steps: frozenset[int] = frozenset()
    vocab: int = 1
    gen: torch.Generator = field(default_factory=torch.Generator, repr=False)
    window: int = 50
    history: list[float] = field(default_factory=list, repr=False)

    def batch(self, step: int, batch: Batch) -> Batch:
        if step not in self.spikes:
            return batch
        x, y = batch
        return x, torch.randint(0, self.vocab, y.shape, generator=self.gen)

    def gradients(self, step: int, model: nn.Module) -> None:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if step in self.nan_steps:
            model.head.weight.grad[0, 0] = math.nan  # type: ignore[union-attr,index]
            return
        with torch.no_grad():
            norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))
        if step in self.spikes:
            recent = sorted(self.history[-self.window:]) or [norm]
            target = self.spikes[step] * recent[len(recent) // 2]
            torch._foreach_mul_(grads, target / max(norm, 1e-30))
        elif math.isfinite(norm):
            self.history.append(norm)


class NextCharacterTask(Task):
    """What the character-level language-model tasks share: next-character cross-entropy
    on ``(inputs, targets)`` windows, and the validation loss (nats per character) on the
    ``val_windows`` of :meth:`~gradguard.bench.taskbase.Task.data` as the metric."""

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> tuple[float, float]:
        w = self.data()["val_windows"]
        model.eval()
        loss = float(self.loss(model, (w[:, :-1], w[:, 1:])))
        model.train()
        return loss, loss


class GPT(NextCharacterTask):
    """A 2-block GPT character model on ``pydoc_data.topics`` with AdamW; variants
    ``preln``, ``postln``, ``corrupt`` and ``bf16`` (see :mod:`gradguard.bench.gpt`).

    References:
        Radford et al. 2019, "Language Models are Unsupervised Multitask Learners".
        Xiong et al. 2020, "On Layer Normalization in the Transformer Architecture",
        arXiv:2002.04745.
    """

    name = "gpt"
    metric_name = "val_loss"
    higher_is_better = False
    variants: ClassVar[tuple[str, ...]] = ("preln", "postln", "corrupt", "bf16")
    # From where every variant learns slowly (1e-3) to past where Post-LN without warm-up
    # fails and Pre-LN degrades (0.1).
    default_lrs = (0.001, 0.003, 0.01, 0.03, 0.1)
    references = (
        "Radford et al. 2019, Language Models are Unsupervised Multitask Learners (GPT-2)",
        "Xiong et al. 2020, On Layer Normalization in the Transformer Architecture, "
        "arXiv:2002.04745",
        "Loshchilov & Hutter 2019, Decoupled Weight Decay Regularization, arXiv:1711.05101",
    )
    d_model = 64
    heads = 4
    layers = 2
    context = 64
    batch_size = 8
    n_val_windows = 256
    betas = (0.9, 0.95)
    eps = 1e-8
    weight_decay = 0.1
    warmup_fraction = 0.1
    final_lr_fraction = 0.1
    spike_fraction = 0.02
    nan_fraction = 0.01
    spike_factors = (5.0, 160.0)
    first_faulty_step = 10

    def __init__(self, variant: str = "preln") -> None:
        if variant not in self.variants:
            raise ValueError(f"gpt variant must be one of {self.variants}, got {variant!r}")
        self.variant = variant

    @property
    def spec(self) -> str:
        return f"{self.name}:{self.variant}"

    @property
    def pre_ln(self) -> bool:
        """Pre-LN blocks (every variant but ``postln``)."""
        return self.variant != "postln"

    def companions(self) -> tuple[str, ...]:
        return (f"{self.name}:preln",) if self.variant == "corrupt" else ()

    def data(self) -> dict[str, Any]:
        text = pydoc_text()
        key = (self.context, self.n_val_windows)
        if key not in _VALIDATION:
            val = text["val"]
            g = seeded_generator(DATA_SEED + 3)
            starts = torch.randint(0, val.numel() - self.context - 1, (self.n_val_windows,),
                                   generator=g)
            windows = torch.stack([val[s : s + self.context + 1] for s in starts.tolist()])
            counts = torch.bincount(text["train"], minlength=text["vocab_size"]).double() + 1
            logp = (counts / counts.sum()).log()
            _VALIDATION[key] = {"val_windows": windows,
                          "trivial_metric": float(-logp[windows[:, 1:]].mean()),
                          "zero_loss": math.log(text["vocab_size"])}
        return {**text, **_VALIDATION[key]}

    def _make_model(self, gen: torch.Generator) -> nn.Module:
        return GPTModel(self.data()["vocab_size"], self.d_model, self.heads, self.layers,
                        self.context, pre_ln=self.pre_ln, bf16=self.variant == "bf16", gen=gen)

    def head_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return list(model.head.parameters())  # type: ignore[union-attr]

    def build_optimizer(self, params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        """AdamW with weight decay on matrices and embeddings only (GPT-2's groups)."""
        params = list(params)
        return torch.optim.AdamW(
            [{"params": [p for p in params if p.dim() >= 2], "weight_decay": self.weight_decay},
             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
            lr=lr, betas=self.betas, eps=self.eps)

    def lr_factor(self, step: int, steps: int) -> float:
        warmup = round(self.warmup_fraction * steps) if self.pre_ln else 0
        return cosine_schedule(step, steps, warmup, self.final_lr_fraction)

    def new_sampler(self, gen: torch.Generator) -> Callable[[int], Batch]:
        train = self.data()["train"]
        n = train.numel() - self.context - 1
        offsets = torch.arange(self.context + 1)

        def sample(step: int) -> Batch:
            w = train[torch.randint(0, n, (self.batch_size, 1), generator=gen) + offsets]
            return w[:, :-1], w[:, 1:]

        return sample

    def faults(self, seed: int, steps: int) -> Faults:
        if self.variant != "corrupt":
            return Faults()
        g = seeded_generator(seed + FAULT_STREAM)
        lo = min(self.first_faulty_step, max(steps - 1, 0))
        n_spike = max(1, round(self.spike_fraction * steps))
        n_nan = max(1, round(self.nan_fraction * steps))
        pick = (torch.randperm(steps - lo, generator=g)[: n_spike + n_nan] + lo).tolist()
        low, high = (math.log(f) for f in self.spike_factors)
        factors = torch.empty(len(pick[:n_spike])).uniform_(low, high, generator=g).exp()
        spikes = dict(zip(pick[:n_spike], factors.tolist(), strict=True))
        nan_steps = frozenset(pick[n_spike:])
        return GPTFaults(frozenset(pick), spikes=spikes, nan_steps=nan_steps,
                         vocab=self.data()["vocab_size"],
                         gen=seeded_generator(seed + FAULT_STREAM + 1))

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update(variant=self.variant, optimizer="AdamW", betas=list(self.betas),
                   weight_decay=self.weight_decay,
                   schedule="warm-up + cosine" if self.pre_ln else "cosine, no warm-up")
        if self.variant == "corrupt":
            out.update(spike_fraction=self.spike_fraction, nan_fraction=self.nan_fraction,
                       spike_factors=list(self.spike_factors), reference=self.companions()[0])
        return out
