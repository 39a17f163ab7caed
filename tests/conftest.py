"""What the tests share: the project on sys.path, a tiny GPT, and `python train.py ARGS`."""
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import GPT, GPTConfig  # noqa: E402  (after the sys.path line above)


@pytest.fixture
def tiny_gpt():
    """tiny_gpt(vocab=12, seed=0, **config): a fresh seeded GPT, one layer of width 16, context 16;
    config overrides any GPTConfig field."""
    def make(vocab=12, seed=0, **config):
        torch.manual_seed(seed)
        return GPT(GPTConfig(**{**dict(block_size=16, vocab_size=vocab, n_layer=1, n_head=2, n_embd=16), **config}))
    return make


@pytest.fixture(scope="session")
def run():
    """run(*args): `python train.py ARGS` in the project root, output captured as text.
    Session-scoped, so that module-scoped fixtures can use it too."""
    def run_train(*args, **kw):
        return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=300, **kw)
    return run_train
