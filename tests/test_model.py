import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702

import pytest
import torch
import torch.nn.functional as F

import model as model_module
from model import (MIN_ROWS, GPT, GPTConfig, _sample, configure_optimizer, generate, rows_still_sampling,
                   shared_prefix_attention)

V, BLOCK = 50, 32


def tiny_model(seed=0, sharp=False, **kw):
    """A tiny GPT in eval mode. sharp=True re-draws the matrices with a large std, so that greedy outputs
    depend strongly on every token and position (a fresh std-0.02 model barely looks at positions)."""
    torch.manual_seed(seed)
    cfg = GPTConfig(block_size=BLOCK, vocab_size=V, n_layer=2, n_head=2, n_embd=32, **kw)
    model = GPT(cfg).eval()
    if sharp:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 0.3)
    return model


def rand_tokens(*shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, shape, generator=g)


def greedy_reference(model, prompt, max_new_tokens, eos_id):
    """Greedy decoding with plain full forwards (no cache)."""
    x, out = torch.tensor([prompt]), []
    for _ in range(max_new_tokens):
        tok = model(x)[0][0, -1].argmax().item()
        out.append(tok)
        x = torch.cat([x, torch.tensor([[tok]])], dim=1)
        if tok == eos_id:
            break
    return out


def check_eos_consistency(tokens, lengths, eos_id, max_new_tokens):
    for row, n in zip(tokens.tolist(), lengths.tolist()):
        if eos_id in row:
            j = row.index(eos_id)
            assert n == j + 1
            assert all(t == eos_id for t in row[j:])
        else:
            assert n == max_new_tokens


def test_causality():
    model = tiny_model()
    idx = rand_tokens(2, 16)
    logits, _ = model(idx)
    t = 9
    idx2 = idx.clone()
    idx2[:, t] = (idx2[:, t] + 1) % V
    logits2, _ = model(idx2)
    assert torch.allclose(logits[:, :t], logits2[:, :t], atol=1e-6)
    assert not torch.allclose(logits[:, t:], logits2[:, t:], atol=1e-4)


def test_tied_embedding():
    model = tiny_model()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def new_cache(model, B, T_max):
    c = model.config
    return [tuple(torch.zeros(B, c.n_head, T_max, c.n_embd // c.n_head) for _ in range(2))
            for _ in range(c.n_layer)]


def test_kv_cache_matches_full_forward_unpadded():
    model = tiny_model()
    idx = rand_tokens(2, 12)
    full, _ = model(idx)
    cache = new_cache(model, 2, 12)
    # a prefix of 5, then a chunk of 3 (tests the end-aligned causal mask), then one token at a time
    chunks = [(0, 5), (5, 8)] + [(t, t + 1) for t in range(8, 12)]
    for a, b in chunks:
        logits = model.lm_head(model.hidden(idx[:, a:b], cache=cache, cache_pos=a))
        assert torch.allclose(logits, full[:, a:b], atol=1e-5)


def test_kv_cache_left_padded_matches_full_forward():
    model = tiny_model()
    seqs = [rand_tokens(10, seed=2).tolist(), rand_tokens(8, seed=3).tolist()]
    plens = [4, 2]  # prompt lengths; 6 continuation tokens each
    L, steps = max(plens), 6
    idx = torch.zeros(2, L, dtype=torch.long)
    real = torch.zeros(2, L, dtype=torch.bool)
    for i, (s, n) in enumerate(zip(seqs, plens)):
        idx[i, L - n:] = torch.tensor(s[:n])
        real[i, L - n:] = True
    pos = (real.cumsum(1) - 1).clamp(min=0)
    mask = (torch.ones(L, L, dtype=torch.bool).tril() & real[:, None, None, :]) | torch.eye(L, dtype=torch.bool)
    cache = new_cache(model, 2, L + steps)
    pre = model.lm_head(model.hidden(idx, pos=pos, attn_mask=mask, cache=cache))  # (2, L, V)
    fulls = [model(torch.tensor([s]))[0][0] for s in seqs]
    for i, n in enumerate(plens):
        assert torch.allclose(pre[i, L - n:], fulls[i][:n], atol=1e-5)
    key_ok = torch.ones(2, 1, 1, L + steps, dtype=torch.bool)
    key_ok[:, 0, 0, :L] = real
    for t in range(steps):
        tok = torch.tensor([[seqs[i][plens[i] + t]] for i in range(2)])
        p = torch.tensor([[plens[i] + t] for i in range(2)])
        h = model.hidden(tok, pos=p, attn_mask=key_ok[..., :L + t + 1], cache=cache, cache_pos=L + t)
        logits = model.lm_head(h)[:, 0]
        for i in range(2):
            assert torch.allclose(logits[i], fulls[i][plens[i] + t], atol=1e-5)


PROMPTS = [[3, 14, 15, 9, 2, 6], [27, 1], [8, 8, 41, 7]]


def test_generate_greedy_matches_full_forward_loop():
    model = tiny_model(sharp=True)
    max_new = 12
    # pick as eos a token greedy decoding of prompt 0 produces at step 3, so early stopping is exercised
    eos_id = greedy_reference(model, PROMPTS[0], max_new, eos_id=-1)[3]
    refs = [greedy_reference(model, p, max_new, eos_id) for p in PROMPTS]
    tokens, lengths = generate(model, PROMPTS, n_samples=2, max_new_tokens=max_new, eos_id=eos_id, temperature=0)
    assert tokens.shape == (6, max_new) and lengths.shape == (6,)
    assert tokens.dtype == torch.long and lengths.dtype == torch.long
    assert lengths[0].item() <= 4
    for i, ref in enumerate(refs):
        for r in (2 * i, 2 * i + 1):
            assert lengths[r].item() == len(ref)
            assert tokens[r, :len(ref)].tolist() == ref
            assert (tokens[r, len(ref):] == eos_id).all()


def sampling_reference(model, prompts, n_samples, max_new_tokens, eos_id, temperature, top_k, generator):
    """generate() without any cache, padding or sharing: at each step a full forward of every row's own
    sequence (its prompt + the tokens so far), then one draw for all P*n_samples rows at once, as generate
    draws (model._sample on the (R, V) logits; its distribution is tested on its own below). Rows that have
    ended keep going (fed eos_id) and get eos_id, so the random draws are the same."""
    rows = [list(p) for p in prompts for _ in range(n_samples)]
    out = [[] for _ in rows]
    for t in range(max_new_tokens):
        logits = torch.stack([model(torch.tensor([r]))[0][0, -1] for r in rows])  # (R, V)
        tok = _sample(logits, temperature, top_k, generator).tolist()
        for r, (row, o) in enumerate(zip(rows, out)):
            ended = bool(o) and o[-1] == eos_id
            o.append(eos_id if ended else tok[r])
            row.append(o[-1])
        if all(eos_id in o for o in out):
            break
    tokens = [o + [eos_id] * (max_new_tokens - len(o)) for o in out]
    lengths = [o.index(eos_id) + 1 if eos_id in o else max_new_tokens for o in out]
    return torch.tensor(tokens), torch.tensor(lengths)


@pytest.mark.parametrize("temperature, top_k", [(1.0, None), (0.5, None), (1.0, 3), (0.7, 2)])
def test_sample_draws_from_the_tempered_top_k_softmax(temperature, top_k):
    """The inverse-CDF draw: token frequencies over 200k rows within 5 standard errors of
    softmax(logits / temperature) restricted to the top_k; probability-0 tokens (-inf logit, outside
    the top k) never drawn, also when they come first or last in the row."""
    logits = torch.tensor([float('-inf'), 2.0, 0.5, -1.0, 1.2, float('-inf'), -3.0, float('-inf')])
    R = 200_000
    draws = _sample(logits.expand(R, -1), temperature, top_k, torch.Generator().manual_seed(0))
    kept = logits.clone()
    if top_k is not None:
        kept[logits < torch.topk(logits, top_k).values[-1]] = float('-inf')
    p = F.softmax(kept / temperature, dim=0).double()
    freq = torch.bincount(draws, minlength=len(logits)).double() / R
    assert (freq[p == 0] == 0).all()
    se = (p * (1 - p) / R).sqrt()
    assert ((freq - p).abs() <= 5 * se).all(), (freq, p)
    # and a different seed gives different draws
    other = _sample(logits.expand(R, -1), temperature, top_k, torch.Generator().manual_seed(1))
    assert not torch.equal(draws, other)


@pytest.mark.parametrize("temperature, top_k", [(1.0, None), (0.7, 8)])
def test_generate_sampling_matches_no_cache_reference(temperature, top_k):
    """Same seed, same tokens as the plain sampler above: the shared prompt cache, the padding and the
    per-row caches change nothing (prompts of different lengths; some rows end early on eos)."""
    model = tiny_model(sharp=True)
    kw = dict(n_samples=3, max_new_tokens=10, temperature=temperature, top_k=top_k)
    free, _ = sampling_reference(model, PROMPTS, eos_id=-1, generator=torch.Generator().manual_seed(0), **kw)
    eos_id = free.flatten().mode().values.item()  # the most sampled token: rows stop at different steps
    ref = sampling_reference(model, PROMPTS, eos_id=eos_id, generator=torch.Generator().manual_seed(0), **kw)
    got = generate(model, PROMPTS, eos_id=eos_id, generator=torch.Generator().manual_seed(0), **kw)
    assert (ref[1] < kw["max_new_tokens"]).any() and len(set(ref[1].tolist())) > 2  # early stops, at different steps
    assert len(set(ref[0][:, 0].tolist())) > 1  # the samples differ
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_shared_prefix_attention_equals_sdpa_on_the_concatenation():
    g = torch.Generator().manual_seed(0)
    G, n, nh, L, S, T, hd = 3, 4, 2, 5, 6, 3, 8
    q, k, v = (torch.randn(G * n, nh, T, hd, generator=g) for _ in range(3))
    k, v = (torch.randn(G * n, nh, S, hd, generator=g) for _ in range(2))
    k_pre, v_pre = (torch.randn(G, nh, L, hd, generator=g) for _ in range(2))
    real = torch.ones(G, L, dtype=torch.bool)
    real[0, :2] = real[2, :4] = False  # left padding of groups 0 and 2
    bias = torch.zeros(G, 1, 1, L).masked_fill(~real[:, None, None, :], float('-inf'))
    causal = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)  # (T, S): the end-aligned causal mask
    for mask in (causal, None):
        got = shared_prefix_attention(q, k, v, mask, k_pre, v_pre, bias)
        own_ok = torch.ones(T, S, dtype=torch.bool) if mask is None else mask
        full_mask = torch.cat([real.repeat_interleave(n, 0)[:, None, None, :].expand(-1, 1, T, L),
                               own_ok.expand(G * n, 1, T, S)], dim=-1)
        ref = F.scaled_dot_product_attention(q, torch.cat([k_pre.repeat_interleave(n, 0), k], 2),
                                             torch.cat([v_pre.repeat_interleave(n, 0), v], 2), attn_mask=full_mask)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def test_generate_restores_training_flag():
    model = tiny_model().train()
    tokens, lengths = generate(model, PROMPTS, 1, 3, eos_id=0, temperature=0)
    assert model.training
    # it runs in inference mode, but returns tensors autograd accepts: a loss on the samples backpropagates
    assert not tokens.is_inference() and not lengths.is_inference()
    model(tokens, tokens)[1].backward()
    model.eval()
    generate(model, PROMPTS, 1, 3, eos_id=0, temperature=0)
    assert not model.training


def test_generate_seeded_reproducible_and_contiguous():
    model = tiny_model()
    kw = dict(prompts=PROMPTS, n_samples=4, max_new_tokens=10, eos_id=0, temperature=1.0)
    a = generate(model, **kw, generator=torch.Generator().manual_seed(123))
    b = generate(model, **kw, generator=torch.Generator().manual_seed(123))
    c = generate(model, **kw, generator=torch.Generator().manual_seed(456))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    # rows of one prompt are contiguous: greedy with n_samples=3 gives blocks of 3 identical rows
    model = tiny_model(sharp=True)
    tok, _ = generate(model, PROMPTS, 3, 6, eos_id=0, temperature=0)
    for i in range(len(PROMPTS)):
        block = tok[3 * i:3 * i + 3]
        assert (block == block[0]).all()
        assert tok[3 * i].tolist() == (greedy_reference(model, PROMPTS[i], 6, eos_id=0) + [0] * 6)[:6]


def test_generate_eos_lengths_and_padding():
    model = tiny_model()
    eos_id, max_new = 7, 16
    with torch.no_grad():  # make eos likely at every step: logits become wte @ (k * w_eos / |w_eos|^2)
        w_eos = model.transformer.wte.weight[eos_id]
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(2.3 * w_eos / w_eos.pow(2).sum())
    tokens, lengths = generate(model, PROMPTS, n_samples=4, max_new_tokens=max_new, eos_id=eos_id,
                               generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (12, max_new)
    assert (lengths < max_new).any()  # some rows stopped early
    check_eos_consistency(tokens, lengths, eos_id, max_new)
    # and on an unmodified model with sampling + top_k
    model = tiny_model()
    tokens, lengths = generate(model, PROMPTS, n_samples=4, max_new_tokens=max_new, eos_id=3, top_k=5,
                               generator=torch.Generator().manual_seed(1))
    check_eos_consistency(tokens, lengths, 3, max_new)


def test_sample_on_some_rows_draws_what_those_rows_draw_in_the_whole_batch():
    """_sample(logits[rows], ..., rows, n_all) consumes the generator as a draw for all n_all rows and gives
    each of the rows its token of that whole draw: a row's sample does not depend on the others."""
    logits = torch.randn(40, V, generator=torch.Generator().manual_seed(0))
    rows = torch.tensor([1, 2, 7, 30, 39])
    for temperature, top_k in [(1.0, None), (0.7, 5)]:
        g_all, g_some = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        whole = _sample(logits, temperature, top_k, g_all)
        some = _sample(logits[rows], temperature, top_k, g_some, rows, len(logits))
        assert torch.equal(some, whole[rows])
        assert torch.equal(g_all.get_state(), g_some.get_state())


def test_rows_still_sampling_keeps_the_prompts_with_a_row_not_done_and_puts_those_rows_first():
    done = torch.tensor([[1, 1, 1, 1],   # prompt 0: every row ended
                         [1, 0, 1, 1],   # prompt 1: row 1 still sampling
                         [0, 1, 1, 0],   # prompt 2: rows 0 and 3
                         [1, 1, 1, 1]], dtype=torch.bool).repeat(MIN_ROWS, 1)  # so that MIN_ROWS adds none
    prompts_kept, picked = rows_still_sampling(done)
    assert prompts_kept.tolist() == [p for p in range(len(done)) if p % 4 in (1, 2)]
    # two rows per prompt, the most not-done rows of any prompt: its not-done rows first, in order
    assert picked[:2].tolist() == [[1, 0], [0, 3]]
    assert not done[prompts_kept[:, None], picked][:, 0].any()


def test_rows_still_sampling_keeps_two_rows_a_prompt_and_at_least_min_rows():
    done = torch.ones(2 * MIN_ROWS, 4, dtype=torch.bool)
    done[5, 2] = False  # one row of one prompt still sampling
    prompts_kept, picked = rows_still_sampling(done)
    assert picked.shape[1] == 2  # never a lone row per prompt (n > 1): the CPU rounds that case differently
    assert picked.numel() >= MIN_ROWS and 5 in prompts_kept.tolist()
    assert picked[prompts_kept.tolist().index(5), 0] == 2
    # one sample per prompt: one row each
    done = torch.ones(3 * MIN_ROWS, 1, dtype=torch.bool)
    done[[4, 40]] = False
    prompts_kept, picked = rows_still_sampling(done)
    assert picked.shape == (MIN_ROWS, 1) and {4, 40} <= set(prompts_kept.tolist())


def test_generate_that_stops_running_ended_rows_gives_the_tokens_of_running_every_row(monkeypatch):
    """64 rows whose responses end at different steps: generate stops running most ended rows (and
    says so through rows_still_sampling), and the tokens and lengths are those of a generate that runs
    every row to the end."""
    model = tiny_model(sharp=True)
    prompts = [rand_tokens(3 + i % 5, seed=10 + i).tolist() for i in range(8)]
    kw = dict(prompts=prompts, n_samples=8, max_new_tokens=20, temperature=1.0)
    free, _ = generate(model, eos_id=-1, generator=torch.Generator().manual_seed(0), **kw)
    eos_id = free.flatten().mode().values.item()  # a frequent token: rows end at different steps
    kept_sizes = []

    def recorded(done):
        prompts_kept, picked = rows_still_sampling(done)
        kept_sizes.append((done.numel(), picked.numel()))
        return prompts_kept, picked

    monkeypatch.setattr(model_module, "rows_still_sampling", recorded)
    got = generate(model, eos_id=eos_id, generator=torch.Generator().manual_seed(0), **kw)
    assert any(4 * kept <= 3 * run for run, kept in kept_sizes)  # rows were dropped
    monkeypatch.setattr(model_module, "rows_still_sampling",
                        lambda done: (torch.arange(done.size(0)), torch.arange(done.size(1)).expand_as(done)))
    every_row = generate(model, eos_id=eos_id, generator=torch.Generator().manual_seed(0), **kw)
    assert len(set(every_row[1].tolist())) > 3  # lengths of several kinds
    assert torch.equal(got[0], every_row[0]) and torch.equal(got[1], every_row[1])


def test_sampling_as_temperature_goes_to_zero_equals_greedy():
    model = tiny_model(sharp=True)
    g, lg = generate(model, PROMPTS, 3, 10, eos_id=0, temperature=0)
    t, lt = generate(model, PROMPTS, 3, 10, eos_id=0, temperature=1e-3,
                     generator=torch.Generator().manual_seed(5))
    assert torch.equal(g, t) and torch.equal(lg, lt)


def test_top_k_1_equals_greedy():
    model = tiny_model()
    g, lg = generate(model, PROMPTS, 2, 10, eos_id=0, temperature=0)
    t, lt = generate(model, PROMPTS, 2, 10, eos_id=0, temperature=0.8, top_k=1,
                     generator=torch.Generator().manual_seed(5))
    assert torch.equal(g, t) and torch.equal(lg, lt)


def test_forward_loss_is_the_mean_nll_over_targets_and_0_when_all_are_ignored():
    """GPT.forward's loss (pre-training); model.token_logprobs is tested in test_objectives.py."""
    model = tiny_model()
    idx = rand_tokens(3, 10)
    targets = rand_tokens(3, 11, seed=9)[:, 1:]  # a non-contiguous slice, as in idx[:, 1:]
    targets[0, :4] = -100
    targets[2, 7:] = -100
    logits, loss = model(idx, targets)
    ce = F.cross_entropy(logits.view(-1, V), targets.reshape(-1), ignore_index=-100, reduction='none').view(3, 10)
    assert torch.allclose(loss, ce[targets != -100].mean(), atol=1e-5)
    # all targets ignored: loss is exactly 0, finite, and backward works
    model.train()
    _, loss = model(idx, torch.full_like(targets, -100))
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_too_long_prompt_raises():
    model = tiny_model()
    with pytest.raises(ValueError, match="prompt 1"):
        generate(model, [[1, 2], list(range(30))], n_samples=1, max_new_tokens=5, eos_id=0)
    generate(model, [[1, 2], list(range(27))], n_samples=1, max_new_tokens=5, eos_id=0)  # exactly fits


def test_optimizer_groups():
    model = tiny_model()
    opt = configure_optimizer(model, lr=1e-3, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert decay['weight_decay'] == 0.1 and no_decay['weight_decay'] == 0.0
    assert all(p.dim() >= 2 for p in decay['params']) and all(p.dim() < 2 for p in no_decay['params'])
    n_opt = sum(p.numel() for g in opt.param_groups for p in g['params'])
    assert n_opt == sum(p.numel() for p in model.parameters())


@pytest.mark.slow
def test_overfit_one_batch():
    model = tiny_model().train()
    idx = rand_tokens(4, 16)
    targets = rand_tokens(4, 16, seed=4)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(100):
        _, loss = model(idx, targets)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
