"""The panel of real architectures for the probe, and the measurements that label them.

Stock models: Hugging Face GPT-2, BERT and Llama built from small configs (never downloaded;
``transformers`` is optional: their factories skip without it), a ResNet-18-style CNN with
BatchNorm, a small pre-LN ViT (patch embedding, class token, SDPA attention) and an LSTM
language model. Broken variants: a huge ``initializer_range`` (GPT-2, BERT, Llama), a
34-layer-style ResNet without normalisation and He on both convolutions of every block,
saturating tanh MLPs in the ViT (weights of std 0.5), recurrent weights scaled up 10x, and
a 4-layer stacked LSTM with torch's default init.

Each model's label comes from a measurement written here with plain autograd, not from the
probe's code:

* :func:`stream_gain`: the gradient norm at the input of the first block over that at the
  output of the last block, from a random cotangent on the model's output (the gradient
  along the residual stream, or through an RNN's layers), and the RMS growth of the
  activations between the same two points;
* :func:`time_gain`: for an RNN, from a random cotangent on its last output step alone,
  the gradient norm at its first input step over the middle and the last input steps.

Used by ``tests/test_signal_probe_panel.py`` and ``perf/bench_probe_panel.py``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # built from configs: nothing to download

VOCAB, BATCH, LENGTH = 256, 8, 32
TOLERANCE = 20.0  # the probe's band: healthy while every gain stays in [1/20, 20]


def token_ids(seed: int = 0) -> Tensor:
    """``BATCH x LENGTH`` ids from ``[1, VOCAB)`` (0 is left out: it is a padding id)."""
    return torch.randint(1, VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(seed))


def images(seed: int = 0) -> Tensor:
    """``BATCH`` N(0, 1) images of 3 x 32 x 32."""
    return torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@dataclass
class Built:
    """A panel model, its example inputs, and where its deep body starts and ends."""

    model: nn.Module
    inputs: Any
    first: nn.Module  # the first block (its input is where the body starts)
    last: nn.Module  # the last block (its output is where the body ends)


# --------------------------------------------------------------------------------------
# Hugging Face models from small configs
# --------------------------------------------------------------------------------------


def _transformers() -> Any:
    return pytest.importorskip("transformers")


def _text_inputs(seed: int) -> dict[str, Tensor]:
    ids = token_ids(seed)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def gpt2(initializer_range: float = 0.02, seed: int = 0) -> Built:
    """GPT-2 (4 layers, width 64, Conv1D layers, tied embeddings) with its own init."""
    tf = _transformers()
    torch.manual_seed(seed)
    config = tf.GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64,
                           bos_token_id=1, eos_token_id=2, initializer_range=initializer_range)
    model = tf.GPT2LMHeadModel(config)
    return Built(model, _text_inputs(seed), model.transformer.h[0], model.transformer.h[-1])


def bert(initializer_range: float = 0.02, seed: int = 0) -> Built:
    """BERT for masked LM (4 Post-LN layers, width 64) with its own init."""
    tf = _transformers()
    torch.manual_seed(seed)
    config = tf.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4,
                           num_attention_heads=4, intermediate_size=256,
                           max_position_embeddings=64, initializer_range=initializer_range)
    model = tf.BertForMaskedLM(config)
    layers = model.bert.encoder.layer
    return Built(model, _text_inputs(seed), layers[0], layers[-1])


def llama(initializer_range: float = 0.02, seed: int = 0) -> Built:
    """Llama (4 layers, width 64, RMSNorm, SwiGLU, rotary, grouped KV heads)."""
    tf = _transformers()
    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=172,
                            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=64, initializer_range=initializer_range,
                            bos_token_id=1, eos_token_id=2)
    model = tf.LlamaForCausalLM(config)
    return Built(model, _text_inputs(seed), model.model.layers[0], model.model.layers[-1])


# --------------------------------------------------------------------------------------
# Hand-written models
# --------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """torchvision's ResNet block: two 3x3 convolutions, BatchNorm (or none), a projection
    shortcut when the shape changes, the ReLU after the addition."""

    def __init__(self, cin: int, cout: int, stride: int = 1, norm: bool = True) -> None:
        super().__init__()

        def bn(c: int) -> nn.Module:
            return nn.BatchNorm2d(c) if norm else nn.Identity()

        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=not norm)
        self.bn1 = bn(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=not norm)
        self.bn2 = bn(cout)
        self.down: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=not norm), bn(cout))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.down is None else self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """A CIFAR-sized ResNet: 3x3 stem, four stages of BasicBlocks (widths 16-128), pool, fc."""

    def __init__(self, blocks: tuple[int, ...] = (2, 2, 2, 2), norm: bool = True) -> None:
        super().__init__()
        widths = (16, 32, 64, 128)
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=not norm),
                                  nn.BatchNorm2d(16) if norm else nn.Identity(),
                                  nn.ReLU(inplace=True))
        layers, c = [], 16
        for stage, (w, n) in enumerate(zip(widths, blocks, strict=True)):
            for i in range(n):
                layers.append(BasicBlock(c, w, 2 if i == 0 and stage > 0 else 1, norm))
                c = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1))


def resnet18(seed: int = 0) -> Built:
    """ResNet-18 layout (2, 2, 2, 2) with BatchNorm, torchvision's init (He, fan_out)."""
    torch.manual_seed(seed)
    model = ResNet((2, 2, 2, 2), norm=True)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return Built(model, images(seed), model.layers[0], model.layers[-1])


def resnet34_no_norm(seed: int = 0) -> Built:
    """ResNet-34 layout (3, 4, 6, 3) without normalisation, He (fan_in) on both
    convolutions of every block and zero biases: each block adds its variance."""
    torch.manual_seed(seed)
    model = ResNet((3, 4, 6, 3), norm=False)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return Built(model, images(seed), model.layers[0], model.layers[-1])


class Attention(nn.Module):
    """Multi-head self-attention: one fused qkv projection, ``scaled_dot_product_attention``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class ViTBlock(nn.Module):
    """A pre-LN transformer block."""

    def __init__(self, dim: int, heads: int, act: type[nn.Module]) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), act(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A small ViT: 4x4 patches of a 32x32 image, a class token, learned positions, four
    pre-LN blocks of width 64, a final LayerNorm and a linear head on the class token."""

    def __init__(self, act: type[nn.Module] = nn.GELU, dim: int = 64, depth: int = 4) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, 65, dim))
        self.blocks = nn.Sequential(*[ViTBlock(dim, 4, act) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


def vit(seed: int = 0, act: type[nn.Module] = nn.GELU, std: float = 0.02) -> Built:
    """timm's init: truncated normal (std 0.02) linear weights, zero biases, class token
    and positions of std 0.02; ``std`` changes the linear weights."""
    torch.manual_seed(seed)
    model = ViT(act)
    nn.init.trunc_normal_(model.pos, std=0.02)
    nn.init.trunc_normal_(model.cls, std=0.02)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            nn.init.zeros_(m.bias)
    return Built(model, images(seed), model.blocks[0], model.blocks[-1])


class LSTMLanguageModel(nn.Module):
    """Embedding, ``nn.LSTM`` (batch first), linear head over the vocabulary."""

    def __init__(self, width: int = 128, layers: int = 1) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.lstm = nn.LSTM(width, width, layers, batch_first=True)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.lstm(self.embed(ids))[0])


def lstm_lm(seed: int = 0, layers: int = 1, width: int = 128,
            recurrent_scale: float = 1.0) -> Built:
    """An LSTM language model with torch's default init (recurrent weights times
    ``recurrent_scale``)."""
    torch.manual_seed(seed)
    model = LSTMLanguageModel(width, layers)
    with torch.no_grad():
        for name, p in model.lstm.named_parameters():
            if name.startswith("weight_hh"):
                p.mul_(recurrent_scale)
    return Built(model, token_ids(seed), model.lstm, model.lstm)


# name -> (factory(seed), label, needs transformers)
PANEL: dict[str, tuple[Callable[[int], Built], str, bool]] = {
    "gpt2": (lambda s: gpt2(seed=s), "healthy", True),
    "bert": (lambda s: bert(seed=s), "healthy", True),
    "llama": (lambda s: llama(seed=s), "healthy", True),
    "resnet18": (lambda s: resnet18(seed=s), "healthy", False),
    "vit": (lambda s: vit(seed=s), "healthy", False),
    "lstm_lm": (lambda s: lstm_lm(seed=s), "healthy", False),
    "gpt2_init_range_1": (lambda s: gpt2(1.0, seed=s), "exploding", True),
    "bert_init_range_1": (lambda s: bert(1.0, seed=s), "exploding", True),
    "llama_init_range_1": (lambda s: llama(1.0, seed=s), "exploding", True),
    "resnet34_no_norm_he": (lambda s: resnet34_no_norm(seed=s), "exploding", False),
    "vit_saturating_tanh": (lambda s: vit(seed=s, act=nn.Tanh, std=0.5), "exploding", False),
    "lstm_lm_recurrent_x10": (lambda s: lstm_lm(seed=s, recurrent_scale=10.0), "exploding",
                              False),
    "lstm_lm_stacked_4": (lambda s: lstm_lm(seed=s, layers=4, width=64), "vanishing", False),
}


# --------------------------------------------------------------------------------------
# Independent measurements (plain autograd, no probe code)
# --------------------------------------------------------------------------------------


def model_output(out: Any) -> Tensor:
    """The logits of a ``transformers`` output, or the output itself."""
    return out.logits if hasattr(out, "logits") else out


def run(model: nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def stream_gain(built: Built, seed: int = 1) -> tuple[float, float]:
    """``(backward, forward)``: |grad at the first block's input| / |grad at the last
    block's output| from a random N(0, 1) cotangent on the model's output, and
    RMS(last block's output) / RMS(first block's input). Train mode, as the probe."""
    model, seen = built.model, {}

    def first_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.setdefault("in", args[0] if args else kwargs["hidden_states"])

    def last_output(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        seen["out"] = out[0] if isinstance(out, tuple) else out

    hooks = [built.first.register_forward_pre_hook(first_input, with_kwargs=True),
             built.last.register_forward_hook(last_output, with_kwargs=True)]
    model.train()
    torch.manual_seed(seed)  # dropout masks
    try:
        out = model_output(run(model, built.inputs))
    finally:
        for h in hooks:
            h.remove()
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    g_in, g_out = torch.autograd.grad(out, [seen["in"], seen["out"]], cot)

    def rms(t: Tensor) -> float:
        return float(t.detach().float().pow(2).mean().sqrt())

    return float(g_in.norm() / g_out.norm()), rms(seen["out"]) / rms(seen["in"])


def time_gain(built: Built, seed: int = 1) -> tuple[float, float]:
    """``(whole, far half)`` for the RNN ``built.first``: from a random cotangent on its last
    output step alone, |grad at input step 0| over |grad at the last input step| and over
    |grad at the middle input step|."""
    rnn, seen = built.first, {}

    def keep(module: nn.Module, args: tuple, out: Any) -> None:
        seen["in"], seen["out"] = args[0], out[0]

    hook = rnn.register_forward_hook(keep)
    try:
        run(built.model, built.inputs)
    finally:
        hook.remove()
    last = seen["out"][:, -1]
    cot = torch.randn(last.shape, generator=torch.Generator().manual_seed(seed))
    (g,) = torch.autograd.grad(last, seen["in"], cot)
    steps = g.norm(dim=(0, 2))
    return float(steps[0] / steps[-1]), float(steps[0] / steps[len(steps) // 2])


def measured_label(built: Built, margin: float) -> str | None:
    """The label the measurements give, or None when one of them lies within ``margin``
    (a factor) of the band's edges: every gain inside ``[margin/20, 20/margin]`` is
    healthy, one beyond ``20 * margin`` (or below ``1 / (20 * margin)``) is not."""
    back, fwd = stream_gain(built)
    gains = [back, fwd]
    if isinstance(built.first, nn.RNNBase):
        whole, far = time_gain(built)
        if whole > TOLERANCE and far > TOLERANCE ** 0.5:
            gains.append(whole)
    if all(TOLERANCE ** -1 * margin < g < TOLERANCE / margin for g in gains):
        return "healthy"
    if any(g > TOLERANCE * margin for g in gains):
        return "exploding"
    if any(g < 1 / (TOLERANCE * margin) for g in gains):
        return "vanishing"
    return None
