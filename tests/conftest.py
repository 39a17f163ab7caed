"""What the tests share: the project and its tools/ on sys.path, a tiny GPT, `python train.py ARGS`,
and an independent token_logprobs for tests that must not depend on that objective (course mode:
`python tools/course.py check` removes one objective at a time and expects only its own tests to fail)."""
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))  # bench, budget, course
sys.path.insert(0, str(ROOT))

import afd  # noqa: E402  (after the sys.path line above)
import model  # noqa: E402
import reward  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402


@pytest.fixture
def tiny_gpt():
    """tiny_gpt(vocab=12, seed=0, **config): a fresh seeded GPT, one layer of width 16, context 16;
    config overrides any GPTConfig field."""
    def make(vocab=12, seed=0, **config):
        torch.manual_seed(seed)
        return GPT(GPTConfig(**{**dict(block_size=16, vocab_size=vocab, n_layer=1, n_head=2, n_embd=16), **config}))
    return make


def reference_token_logprobs(gpt, idx, targets):
    """model.token_logprobs written another way: minus the per-token cross-entropy, which is 0 where
    targets == -100. (B, T) float32."""
    logits, _ = gpt(idx)                                             # (B, T, V)
    return -F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=-100, reduction="none")


@pytest.fixture
def reference_logprobs(monkeypatch):
    """Replaces model.token_logprobs, wherever a module looks it up by name, by the reference above,
    so that a test of another objective (sft_loss, LogRatioReward, ...) does not depend on it.
    model.sequence_logprob looks it up in model, so it is covered too. Returns the reference."""
    for module in (model, afd, reward):
        if hasattr(module, "token_logprobs"):
            monkeypatch.setattr(module, "token_logprobs", reference_token_logprobs)
    return reference_token_logprobs


def reference_reward_weights(attention, rows):
    """reward.reward_weights written another way: the mean over a row's real queries of the attention
    each position receives, by masked_select per row. (B, T), 0 at padding."""
    out = torch.zeros(rows.shape, dtype=attention.dtype)
    for b in range(rows.shape[0]):
        n = int(rows[b].sum())
        out[b, :n] = attention[b, :n, :n].mean(dim=0)
    return out


@pytest.fixture
def reference_weights(monkeypatch):
    """Replaces reward.reward_weights by the reference above, so that a test of AVA's model (its heads,
    read-outs, scoring) does not depend on that objective. Returns the reference."""
    monkeypatch.setattr(reward, "reward_weights", reference_reward_weights)
    return reference_reward_weights


@pytest.fixture(scope="session")
def run():
    """run(*args): `python train.py ARGS` in the project root, output captured as text.
    Session-scoped, so that module-scoped fixtures can use it too."""
    def run_train(*args, **kw):
        return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=300, **kw)
    return run_train


def pytest_sessionfinish(session, exitstatus):
    """In CI (CI=true, as .ci/run sets it) a skipped test fails the run: CI installs every dependency
    (requirements-dev.txt) and has the HH-RLHF sample beside the project, so a skip there means a broken
    install, not a missing option. Elsewhere a skip is reported (-rs) and allowed."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if os.environ.get("CI", "").lower() in ("1", "true") and skipped:
        reporter.write_line(f"CI: {len(skipped)} test(s) skipped, which CI does not allow (a dependency or the "
                            f"HH-RLHF sample is missing): {skipped[0].nodeid}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
