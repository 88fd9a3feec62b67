"""``gradguard probe`` (:mod:`gradguard.cli.probe`): bad targets, factories and inputs
refused in one line before probing."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from torch import nn

from cli_utils import forbid_work, refused
from gradguard.cli import CLIError
from gradguard.cli import probe as probe_cli

ZOO = """\
import torch.nn as nn

def deep():
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))

def needs(width):
    return nn.Linear(width, width)

class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc = nn.Linear(width, width)

def number():
    return 3

def fails():
    raise RuntimeError("the weights file is missing")
"""


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    forbid_work(monkeypatch)


@pytest.fixture
def zoo(tmp_path: Path) -> Path:
    path = tmp_path / "zoo.py"
    path.write_text(ZOO)
    return path


def test_probe_fix_refuses_a_directory(zoo, tmp_path, capsys, no_work):
    refused(["probe", f"{zoo}:deep", "--input-shape", "4", "8", "--fix", str(tmp_path)],
            capsys, "--fix", "is a directory", "fixed.pt")
    refused(["probe", f"{zoo}:deep", "--input-shape", "4", "8", "--fix", f"{zoo}/x.pt"],
            capsys, "--fix", "is a file, not a directory")


@pytest.mark.parametrize("factory, needles", [
    ("needs", ("needs arguments (width)", "def build():")),
    ("Block", ("needs arguments (width)",)),
    ("number", ("returned int, not an nn.Module",)),
    ("fails", ("fails() raised RuntimeError: the weights file is missing",)),
    ("missing", ("'missing' is not a callable",)),
])
def test_probe_refuses_bad_factories(zoo, capsys, no_work, factory, needles):
    refused(["probe", f"{zoo}:{factory}", "--input-shape", "4", "8"], capsys, *needles)


def test_probe_refuses_bad_targets(zoo, tmp_path, capsys, no_work):
    refused(["probe", "no_such_module_xyz:build", "--input-shape", "4"], capsys,
            "cannot import 'no_such_module_xyz'", "path of a .py file")
    refused(["probe", str(tmp_path / "absent.py") + ":build", "--input-shape", "4"], capsys,
            "no such file")
    refused(["probe", str(zoo), "--input-shape", "4"], capsys, "MODULE:FACTORY expected")
    broken = tmp_path / "broken.py"
    broken.write_text("import torch\nraise ValueError('bad config')\n")
    refused(["probe", f"{broken}:build", "--input-shape", "4"], capsys,
            "importing", "ValueError: bad config")
    needs_dep = tmp_path / "needs_dep.py"
    needs_dep.write_text("import no_such_dependency_xyz\n")
    line = refused(["probe", f"{needs_dep}:build", "--input-shape", "4"], capsys,
                   "no_such_dependency_xyz")
    assert "path of a .py file" not in line  # the file was found; its import was not


@pytest.mark.parametrize("argv, needles", [
    (["--input-shape", "4", "9"], ("--input-shape 4 9", "mat1 and mat2", "batch first")),
    (["--input-shape", "4", "8", "--input-shape", "4", "8"], ("forward fails",)),
    (["--input-shape", "4", "8", "--input-dtype", "long"], ("--input-dtype",)),
    (["--input-shape", "0", "8"], ("--input-shape", "'0'")),
    (["--input-shape", "4", "-8"], ("--input-shape", "'-8'")),
    (["--input-shape", "4", "x"], ("--input-shape",)),
    (["--input-shape", "4", "8", "--tolerance", "1"], ("--tolerance",)),
    (["--input-shape", "4", "8", "--n-batches", "0"], ("--n-batches",)),
    (["--input-shape", "4", "8", "--vocab", "0"], ("--vocab",)),
    ([], ("--input-shape",)),
])
def test_probe_refuses_inputs_the_model_does_not_take(zoo, capsys, no_work, argv, needles):
    refused(["probe", f"{zoo}:deep", *argv], capsys, *needles)


def test_probe_input_check_leaves_the_model_as_it_was(zoo, capsys, monkeypatch):
    """The forward pass that checks the inputs runs in eval mode without gradients and
    restores every module's mode: BatchNorm's running statistics do not move."""
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Dropout(0.5))
    model[2].eval()  # mixed modes survive
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = {}

    def fake_probe(m, example, **kwargs):
        seen["modes"] = [x.training for x in m.modules()]
        seen["state"] = {k: v.clone() for k, v in m.state_dict().items()}
        raise ValueError("stop here")

    monkeypatch.setattr(probe_cli, "probe", fake_probe)
    args = argparse.Namespace(target="x:y", input_shape=[[16, 8]], input_dtype="float32",
                              vocab=10, n_batches=1, eval=False, tolerance=20.0, seed=0,
                              max_rows=10, fix=None)
    monkeypatch.setattr(probe_cli, "load_factory", lambda target: lambda: model)
    with pytest.raises(CLIError, match="stop here"):
        probe_cli.cli_main(args)
    assert seen["modes"] == [True, True, True, False]
    for k, v in before.items():
        assert torch.equal(seen["state"][k], v), k


def test_cli_probe_and_fix(tmp_path, capsys) -> None:
    from gradguard.cli import main

    src = tmp_path / "zoo.py"
    src.write_text(
        "import torch.nn as nn\n"
        "def deep():\n"
        "    layers = []\n"
        "    for _ in range(20):\n"
        "        layers += [nn.Linear(32, 32), nn.ReLU()]\n"
        "    return nn.Sequential(*layers, nn.Linear(32, 4))\n")
    out = tmp_path / "fixed.pt"
    code = main(["probe", f"{src}:deep", "--input-shape", "128", "32", "--fix", str(out)])
    text = capsys.readouterr().out
    assert code == 0
    assert "VANISHING" in text and "healthy" in text and "bwd cum" in text
    state = torch.load(out)
    assert len(state) == 42 and state["0.weight"].shape == (32, 32)
    code = main(["probe", f"{src}:deep", "--input-shape", "128", "32"])
    assert code == 1
    assert main(["probe", f"{src}:missing", "--input-shape", "4", "32"]) == 2


KEYWORD_ZOO = """\
import torch
import torch.nn as nn


class TinyLM(nn.Module):
    def __init__(self, scale=1.0):
        super().__init__()
        self.config = type("Config", (), {"vocab_size": 50})()
        self.embed = nn.Embedding(50, 16)
        self.layers = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.Tanh())
                                      for _ in range(30)])
        self.head = nn.Linear(16, 50)
        with torch.no_grad():
            for m in self.layers.modules():
                if isinstance(m, nn.Linear):
                    m.weight.mul_(scale)

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.layers(self.embed(input_ids)))


def lm():
    return TinyLM()


def lm_with_inputs():
    ids = torch.randint(0, 50, (8, 12), generator=torch.Generator().manual_seed(0))
    return TinyLM(scale=6.0), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def gpt2_huge_init():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=256,
                                      n_positions=64, bos_token_id=1, eos_token_id=2,
                                      initializer_range=1.0))
"""


@pytest.fixture
def keyword_zoo(tmp_path: Path) -> Path:
    path = tmp_path / "keyword_zoo.py"
    path.write_text(KEYWORD_ZOO)
    return path


def test_probe_takes_input_ids_with_the_models_vocabulary(keyword_zoo, capsys, monkeypatch):
    seen = {}

    def record(model, example, **kwargs):
        seen["example"] = example
        raise ValueError("stop here")

    monkeypatch.setattr(probe_cli, "probe", record)
    refused(["probe", f"{keyword_zoo}:lm", "--input-ids-shape", "4", "9"], capsys, "stop here")
    ids = seen["example"]["input_ids"]
    assert set(seen["example"]) == {"input_ids"} and ids.shape == (4, 9)
    assert int(ids.max()) < 50 and ids.dtype == torch.long  # config.vocab_size, not 1000


def test_probe_takes_a_factory_that_returns_its_inputs(keyword_zoo, capsys, tmp_path):
    from gradguard.cli import main

    out = tmp_path / "fixed.pt"
    argv = ["probe", f"{keyword_zoo}:lm_with_inputs", "--max-rows", "4"]
    code = main([*argv, "--fix", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "EXPLODING" in text and "healthy" in text and "fixed state_dict written" in text
    refused(["probe", f"{keyword_zoo}:lm_with_inputs", "--input-shape", "4", "8"], capsys,
            "returned (model, example_inputs)", "drop --input-shape")


def test_probe_refuses_missing_inputs_and_bad_keyword_inputs(keyword_zoo, capsys, no_work):
    refused(["probe", f"{keyword_zoo}:lm"], capsys, "no example inputs", "--input-ids-shape")
    refused(["probe", f"{keyword_zoo}:lm", "--input-ids-shape", "4", "9", "--vocab", "60"],
            capsys, "forward fails on --input-ids-shape 4 9", "IndexError")


def test_probe_fixes_a_hugging_face_model_from_its_config(keyword_zoo, capsys, tmp_path):
    pytest.importorskip("transformers")
    from gradguard.cli import main

    argv = ["probe", f"{keyword_zoo}:gpt2_huge_init", "--input-ids-shape", "4", "16",
            "--max-rows", "4"]
    assert main(argv) == 1
    assert "EXPLODING" in capsys.readouterr().out
    out = tmp_path / "gpt2.pt"
    assert main([*argv, "--fix", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Conv1D" in text and "NOT INITIALISED" not in text
    assert "healthy" in text.split("fixed state_dict")[0].split("init_model")[-1]
    state = torch.load(out)
    assert state["transformer.h.0.attn.c_attn.weight"].shape == (64, 192)  # (in, out): Conv1D
