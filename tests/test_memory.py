"""The memory estimate (cli.memory_bytes) against what a small model really holds, and the refusal of
a run that cannot fit (cli.check_memory)."""
import pytest
import torch

import cli
import data
from model import GPT, GPTConfig, configure_optimizer, generate


def saved_for_backward_bytes(model, idx, targets):
    """The bytes of the distinct tensors autograd keeps for the backward of one training forward: the
    activations, measured (each storage counted once)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, targets)[1].backward()
    return sum(storages.values())


def test_memory_bytes_bounds_the_measured_training_memory_of_a_small_model():
    """Training: the weights, gradients and AdamW's two moments are exactly 16 bytes a parameter (the
    estimate's parameter count is the model's to within the LayerNorms and biases), and the
    activations kept for the backward, measured, are under the estimate and over a quarter of it
    (generous, not absurd)."""
    config = GPTConfig(block_size=64, vocab_size=300, n_layer=2, n_head=4, n_embd=64)
    torch.manual_seed(0)
    model = GPT(config)
    params = sum(p.numel() for p in model.parameters())
    opt = configure_optimizer(model, 1e-3, 0.0)
    B = 8
    idx = torch.randint(300, (B, 64))
    activations = saved_for_backward_bytes(model, idx, idx)
    opt.step()
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if t.dim() > 0)
    held = 4 * params + sum(p.grad.numel() * 4 for p in model.parameters()) + state
    assert held == 16 * params
    training, _ = cli.memory_bytes(config, B, sample_rows=1)
    estimated_params = 12 * 2 * 64 * 64 + (300 + 64) * 64
    assert abs(estimated_params - params) / params < 0.02
    assert held + activations <= training <= 4 * (held + activations)  # 2.4x here


def test_memory_bytes_bounds_the_key_value_cache_of_sampling():
    """Sampling R rows: the estimate covers the weights and each row's key/value cache and logits,
    which generate allocates as 2 n_layer tensors of (R, n_head, max_new_tokens, head_dim)."""
    config = GPTConfig(block_size=64, vocab_size=300, n_layer=2, n_head=4, n_embd=64)
    R = 32
    cache = 2 * config.n_layer * R * config.block_size * config.n_embd * 4  # at most a whole block per row
    weights = 4 * sum(p.numel() for p in GPT(config).parameters())
    _, sampling = cli.memory_bytes(config, batch_size=1, sample_rows=R)
    assert weights + cache + 4 * R * config.vocab_size <= sampling <= 3 * (weights + cache + 4 * R * config.vocab_size)
    tokens, _ = generate(GPT(config), [[1, 2, 3]] * 4, 8, 10, eos_id=0, generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (R, 10)  # the run it sizes


def test_a_run_that_cannot_fit_is_refused_before_any_work_with_the_fix(monkeypatch, capsys):
    cfg = cli.parse_args(["--preset=smoke", "--device=cpu"])
    vocab = data.Vocab(range(100))
    monkeypatch.setattr(cli, "available_host_memory", lambda: 10 * 2**30)
    cli.check_memory(cfg, vocab)  # 10 GiB free: fits
    monkeypatch.setattr(cli, "available_host_memory", lambda: 2**20)  # 1 MiB free
    with pytest.raises(SystemExit) as e:
        cli.check_memory(cfg, vocab)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "needs about" in err and "GiB is free" in err and "lower --batch_size" in err
    big = cli.parse_args(["--preset=smoke", "--device=cpu", "--bon_n=200000"])  # the candidates dominate
    with pytest.raises(SystemExit):
        cli.check_memory(big, vocab)
    assert "lower --bon_n or --n_eval" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.check_memory(big, vocab, host_fix="lower --factors")  # budget.py names its own option
    assert "lower --factors" in capsys.readouterr().err
