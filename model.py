"""
The GPT that is both the policy and every reward model's trunk: a small nanoGPT-style decoder
(pre-LayerNorm, scaled_dot_product_attention, tied embeddings; module names follow GPT-2, whose
weights gpt2.py loads), with what the methods do with it:

    GPT(GPTConfig(...))(idx, targets=None)   -> (logits (B, T, V), mean NLL or None)
    token_logprobs(model, idx, targets)      -> (B, T) per-token log-probs, 0 at -100 (the one such function)
    sequence_logprob(model, idx, targets)    -> (B,) their sum: log pi(y|x); masked_mean(values, mask)
    generate(model, prompts, n_samples, max_new_tokens, eos_id, ...)  -> KV-cached sampling, each prompt
                                                run once for its n_samples rows
    score_pairs(scorer, prompts, responses, pad_id, device)  -> (B,) a scorer on (prompt, response)
                                                pairs, each prompt run once for a group of its responses
                                                (SharedPrompts, shared_prompt_batch)
    configure_optimizer, num_params, trainable_copy(policy), frozen_copy(model)
"""
import copy
import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    block_size: int = 128   # max sequence length
    vocab_size: int = 512
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True       # bias in Linears and LayerNorms
    gelu: str = "none"      # nn.GELU approximate=: "none" (exact erf) or "tanh" (GPT-2's "gelu_new")


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, attn_mask=None, cache=None, cache_pos=0, prefix=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
        if cache is not None:  # write the new keys/values in place, attend to everything cached so far
            k_cache, v_cache = cache  # each (B, nh, T_max, hd)
            k_cache[:, :, cache_pos:cache_pos + T] = k
            v_cache[:, :, cache_pos:cache_pos + T] = v
            k, v = k_cache[:, :, :cache_pos + T], v_cache[:, :, :cache_pos + T]  # (B, nh, T_total, hd)
        if prefix is not None:
            y = shared_prefix_attention(q, k, v, attn_mask, *prefix,
                                        dropout_p=self.dropout if self.training else 0.0)  # (B, nh, T, hd)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None and T > 1,
                                               dropout_p=self.dropout if self.training else 0.0)  # (B, nh, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


def shared_prefix_attention(q, k, v, attn_mask, k_pre, v_pre, pre_bias, dropout_p=0.0):
    """SDPA over [the prefix keys of the row's group, the row's own keys] (dropout_p on the weights, as
    SDPA's), with each group's prefix stored and read once (Best-of-N: a prompt's samples share its keys).
    q: (B, nh, T, hd); k, v: (B, nh, S, hd); attn_mask: bool (B or 1, 1, T, S) or None; k_pre, v_pre:
    (G, nh, L, hd), shared by rows g*n .. (g+1)*n-1 (n = B // G); pre_bias: (G, 1, 1, L), 0 or -inf (pad).
    In float32, as SDPA's fused kernels compute scores, also under autocast."""
    dtype, device_type = q.dtype, q.device.type
    B, nh, T, hd = q.shape
    G, L = k_pre.size(0), k_pre.size(2)
    n, scale = B // G, 1 / math.sqrt(hd)  # SDPA's default scale

    def grouped(x):  # (B, nh, T, d) -> (G*nh, n*T, d): the queries of a group side by side
        return x.reshape(G, n, nh, T, -1).transpose(1, 2).reshape(G * nh, n * T, -1)

    def ungrouped(x):  # (G*nh, n*T, d) -> (B, nh, T, d)
        return x.reshape(G, nh, n, T, -1).transpose(1, 2).reshape(B, nh, T, -1)

    with torch.autocast(device_type, enabled=False):
        q, k, v, k_pre, v_pre = (t.float() for t in (q, k, v, k_pre, v_pre))
        bias = pre_bias.float().expand(G, nh, 1, L).reshape(G * nh, 1, L)
        s_pre = torch.baddbmm(bias, grouped(q), k_pre.reshape(G * nh, L, hd).transpose(1, 2), alpha=scale)
        s_own = (q @ k.transpose(-2, -1)) * scale  # (B, nh, T, S)
        if attn_mask is not None:
            s_own = s_own.masked_fill(~attn_mask, float('-inf'))
        w = torch.cat([ungrouped(s_pre), s_own], dim=-1).softmax(dim=-1)  # (B, nh, T, L + S)
        if dropout_p > 0:
            w = F.dropout(w, dropout_p)
        w_pre, w_own = w.split([L, k.size(2)], dim=-1)
        y = ungrouped(torch.bmm(grouped(w_pre), v_pre.reshape(G * nh, L, hd))) + w_own @ v  # (B, nh, T, hd)
    return y.to(dtype)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate=config.gelu)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask=None, cache=None, cache_pos=0, prefix=None):
        x = x + self.attn(self.ln_1(x), attn_mask, cache, cache_pos, prefix)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # scaled init of the residual projections (GPT-2)
            if name.endswith('c_proj.weight'):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def hidden(self, idx, pos=None, attn_mask=None, cache=None, cache_pos=0, prefix=None):
        """Final hidden states (B, T, C) after ln_f.
        idx: (B, T) token ids. pos: (B, T) position ids, default cache_pos..cache_pos+T-1.
        attn_mask: bool (B, 1, T, T_total), True = may attend; T_total = cache_pos + T.
        cache: list (one per layer) of (k, v) tensors (B, n_head, T_max, head_dim), written in
        place at cache_pos:cache_pos+T. Without cache and mask this is the plain causal path.
        prefix: (prefix_cache, prefix_bias), keys/values every row attends to before its own cache
        (the prompt in generate): prefix_cache a list (one per layer) of (k, v) (G, n_head, L, head_dim),
        each shared by B // G consecutive rows; prefix_bias (G, 1, 1, L): 0 = real key, -inf = pad.
        idx may also be a SharedPrompts (prompts and their responses): then the hidden states of its
        responses, each prompt run once (shared_prompt_hidden)."""
        if isinstance(idx, SharedPrompts):
            return self.shared_prompt_hidden(idx)
        B, T = idx.size()
        if pos is None:
            assert cache_pos + T <= self.config.block_size, f"sequence of length {cache_pos + T} > block_size"
            pos = torch.arange(cache_pos, cache_pos + T, device=idx.device)  # (T,)
        if (cache is not None or prefix is not None) and attn_mask is None and T > 1:  # causal, aligned to the end
            attn_mask = torch.ones(T, cache_pos + T, dtype=torch.bool, device=idx.device).tril(diagonal=cache_pos)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            layer_prefix = None if prefix is None else (*prefix[0][i], prefix[1])
            x = block(x, attn_mask, None if cache is None else cache[i], cache_pos, layer_prefix)  # (B, T, C)
        return self.transformer.ln_f(x)  # (B, T, C)

    def prompt_pass(self, idx, real):
        """Each prompt's forward, once, for the rows that continue it (generate, shared_prompt_hidden).
        idx, real: (P, L) from left_padded, pad keys masked out. Returns (prefix, h): prefix = (cache, bias)
        for hidden(prefix=), keys/values (P, n_head, L, head_dim) per layer and bias (P, 1, 1, L), -inf at
        pads; h (P, L, C) the hidden states, h[:, -1] at each prompt's last token."""
        cfg = self.config
        P, L = idx.shape
        w = self.transformer.wte.weight
        hd = cfg.n_embd // cfg.n_head
        cache = [tuple(w.new_empty(P, cfg.n_head, L, hd) for _ in range(2)) for _ in range(cfg.n_layer)]
        pos = (real.cumsum(dim=1) - 1).clamp(min=0)  # (P, L)
        # causal, pad keys masked out; the diagonal stays allowed so that pad queries (outputs unused)
        # never have an all-masked row, which gives NaN on some SDPA backends
        causal = torch.ones(L, L, dtype=torch.bool, device=idx.device).tril()  # (L, L)
        mask = (causal & real[:, None, None, :]) | torch.eye(L, dtype=torch.bool, device=idx.device)  # (P, 1, L, L)
        h = self.hidden(idx, pos=pos, attn_mask=mask, cache=cache)  # (P, L, C)
        bias = w.new_zeros(P, 1, 1, L).masked_fill(~real[:, None, None, :], float('-inf'))
        return (cache, bias), h

    def shared_prompt_hidden(self, batch):
        """Hidden states (B, 1 + S, C) of a SharedPrompts batch, in response columns: column j of row b is
        the position that predicts response token j (column 0: its prompt's last token). Each prompt
        runs once (prompt_pass); each response runs on top of its prompt's keys/values (prefix=), shared
        by its n rows. Equal, to float tolerance, to hidden() on the concatenated rows, at those positions."""
        prefix, h_prompts = self.prompt_pass(batch.prompts, batch.real)  # h_prompts (G, L, C)
        n, S = batch.responses.size(0) // batch.prompts.size(0), batch.responses.size(1)
        start = batch.real.sum(dim=1).repeat_interleave(n)  # (B,) position of each response's first token
        cols = torch.arange(S, device=start.device)  # (S,)
        # pads past a response's end (outputs unused, seen by no real token) at position 0: never past the context
        pos = torch.where(cols < batch.lengths[:, None], start[:, None] + cols, 0)  # (B, S)
        h = self.hidden(batch.responses, pos=pos, prefix=prefix)  # (B, S, C)
        return torch.cat([h_prompts[:, -1:].repeat_interleave(n, dim=0), h], dim=1)  # (B, 1 + S, C)

    def forward(self, idx, targets=None):
        logits = self.lm_head(self.hidden(idx))  # (B, T, V)
        if targets is None:
            return logits, None
        # sum / count instead of the default mean, so that all-ignored targets give 0.0, not NaN
        nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                              ignore_index=-100, reduction='sum')
        loss = nll / (targets != -100).sum().clamp(min=1)
        return logits, loss


@dataclass
class SharedPrompts:
    """The idx of a batch whose rows share prompts, in place of a (B, T) tensor: G prompts, each with its
    n responses (B = G * n rows, prompt-major). GPT.hidden runs each prompt once and each response on
    top of it (GPT.shared_prompt_hidden). Made by shared_prompt_batch, with targets and last to match."""
    prompts: torch.Tensor    # (G, L) left-padded (left_padded)
    real: torch.Tensor       # (G, L) True at real prompt tokens
    responses: torch.Tensor  # (B, S) right-padded; rows g*n .. (g+1)*n-1 continue prompt g
    lengths: torch.Tensor    # (B,) response lengths


def left_padded(prompts, device):
    """Token lists as one left-padded batch (pad 0): idx (P, L) and real (P, L), True at real tokens."""
    P, L = len(prompts), max(len(p) for p in prompts)
    idx = torch.zeros(P, L, dtype=torch.long, device=device)
    real = torch.zeros(P, L, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        idx[i, L - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        real[i, L - len(p):] = True
    return idx, real


def shared_prompt_batch(prompts, responses, pad_id, device="cpu"):
    """data.make_batch for G prompts (token lists) with n responses each (responses: G lists of n token
    lists), each prompt to be run once: (idx, targets, last) with idx a SharedPrompts and targets, last
    in its response columns (GPT.shared_prompt_hidden): targets (B, 1 + S), targets[b, j] = response token
    j, -100 past the response; last (B,) = the response length, the column of its last token (0, the
    prompt's last token, for an empty response). Every scorer reads the same positions as on make_batch's."""
    n = len(responses[0])
    assert all(len(group) == n for group in responses), "every prompt needs the same number of responses"
    rows = [r for group in responses for r in group]
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    S = max(1, int(lengths.max()))  # at least one column, so that empty responses have a pass too
    tokens = torch.full((len(rows), S), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), 1 + S), -100, dtype=torch.long)
    for b, r in enumerate(rows):
        tokens[b, :len(r)] = targets[b, :len(r)] = torch.tensor(r, dtype=torch.long)
    idx, real = left_padded(prompts, device)
    batch = SharedPrompts(idx, real, tokens.to(device), lengths.to(device))
    return batch, targets.to(device), lengths.to(device)


@torch.inference_mode()
def score_pairs(scorer, prompts, responses, pad_id, device, batch=256):
    """scorer(idx, targets, last) -> (B,) (a reward model of reward.py, or any function of a batch) on
    each (prompt, response) pair of two flat lists: (B,) float32 on the CPU. Equal pairs are scored once
    (equal scores); each prompt runs once for a group of its responses (shared_prompt_batch), in batches
    of similar lengths (scoring_batches). data.make_batch's rows give the same, to float tolerance."""
    pairs = list(zip(map(tuple, prompts), map(tuple, responses)))
    unique = list(dict.fromkeys(pairs))  # the distinct pairs, in first-seen order
    out = torch.zeros(len(unique))
    for groups in scoring_batches(unique, batch):
        idx, targets, last = shared_prompt_batch([unique[g[0]][0] for g in groups],
                                                 [[unique[i][1] for i in g] for g in groups], pad_id, device)
        out[[i for g in groups for i in g]] = scorer(idx, targets, last).float().cpu()
    where = {pair: i for i, pair in enumerate(unique)}
    return out[[where[pair] for pair in pairs]]


def scoring_batches(pairs, batch, group_size=4):
    """The distinct (prompt, response) pairs to score, in batches of up to `batch` rows: each prompt's
    responses, sorted by length, in groups of up to group_size rows (a group runs its prompt once); a
    batch holds groups of one size and similar longest responses. group_size 4 was the fastest of 2..32
    on the cpu run's Best-of-32 candidates (2 CPU cores). Yields lists of groups of indices into pairs."""
    by_prompt = {}
    for i, (prompt, _) in enumerate(pairs):
        by_prompt.setdefault(prompt, []).append(i)
    groups = []
    for rows in by_prompt.values():
        rows.sort(key=lambda i: len(pairs[i][1]))
        groups += [rows[k:k + group_size] for k in range(0, len(rows), group_size)]
    groups.sort(key=lambda g: (len(g), len(pairs[g[-1]][1]), len(pairs[g[0]][0])))  # size, longest response, prompt
    for size, same_size in itertools.groupby(groups, key=len):
        same_size, per_batch = list(same_size), max(1, batch // size)
        for k in range(0, len(same_size), per_batch):
            yield same_size[k:k + per_batch]


def token_logprobs(model, idx, targets):
    """Per-token log-probabilities (B, T) of targets under the model:
        out[b, t] = log softmax(logits[b, t])[targets[b, t]] = log p(targets[b, t] | idx[b, :t+1])
    and exactly 0.0 where targets[b, t] == -100. Computed in float32."""
    logits, _ = model(idx)  # (B, T, V)
    logp = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    mask = targets != -100  # (B, T)
    out = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    return out.masked_fill(~mask, 0.0)


def masked_mean(values, mask):
    """sum(values * mask) / max(sum(mask), 1): a mean over the unmasked entries, 0 if there are none."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def sequence_logprob(model, idx, targets):
    """log d^pi(y|x) = sum_t log pi(y_t | x, y_<t), one value per row: (B,)."""
    return token_logprobs(model, idx, targets).sum(dim=1)


def _sample(logits, temperature, top_k, generator, rows=None, n_all=None):
    """One token id per row from logits (R, V): greedy if temperature == 0, else a draw from
    p = softmax(logits / temperature) (within the top_k logits) by inverse CDF, one uniform per row:
        token = min { i : cdf_i >= u * cdf_V },   cdf_i = p_1 + ... + p_i,   u ~ U(0, 1]
    in float64, so probabilities down to ~1e-16 are drawn at their own rate and p_i = 0 never; the
    distribution of torch.multinomial(p, 1), not its tokens (README: Performance). rows (R,), n_all:
    logits holds these rows of a batch of n_all rows; n_all uniforms are drawn and these rows' used,
    so that a row's draws do not depend on which other rows generate still runs."""
    if temperature == 0:
        return logits.argmax(dim=-1)  # (R,)
    logits = logits.float()
    if temperature != 1:  # x / 1 == x exactly: skip the pass
        logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, [-1]]  # (R, 1)
        logits = logits.masked_fill(logits < kth, float('-inf'))
    cdf = torch.cumsum(F.softmax(logits, dim=-1), dim=-1, dtype=torch.float64)  # (R, V)
    n_draws = cdf.size(0) if rows is None else n_all
    u = 1 - torch.rand(n_draws, 1, dtype=torch.float64, device=cdf.device, generator=generator)  # (n_draws, 1)
    if rows is not None:
        u = u[rows]  # (R, 1)
    return torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(1)  # (R,)


# generate keeps running at least this many rows: fewer would hardly make a step cheaper (its fixed
# cost dominates), and under 16 rows the CPU's matrix kernels round differently, which would change a
# run's samples for no gain
MIN_ROWS = 16


def generate(model, prompts, n_samples, max_new_tokens, eos_id, temperature=1.0, top_k=None, generator=None):
    """Sample n_samples continuations of each prompt (a list of P lists of token ids) with a KV cache.
    Returns tokens (P*n_samples, max_new_tokens) and lengths (P*n_samples,); rows of prompt i are
    i*n_samples .. (i+1)*n_samples-1. A row ends with (and includes) eos_id and is padded with eos_id;
    its length counts the eos, or is max_new_tokens if it never produced one. temperature 0 = greedy.
    The generator (if any) must live on the model's device. nanoGPT's loop: run the prompt once, then
    sample a token, append it, feed it back; each prompt's keys/values are stored once, shared by its
    n_samples rows (prefix=), and each row caches only its new tokens."""
    cfg = model.config
    device = next(model.parameters()).device
    for i, p in enumerate(prompts):
        if len(p) == 0 or len(p) + max_new_tokens > cfg.block_size:
            raise ValueError(f"prompt {i}: length {len(p)} + max_new_tokens {max_new_tokens} exceeds "
                             f"block_size {cfg.block_size} (or the prompt is empty)")
    was_training = model.training
    model.eval()
    with torch.inference_mode():  # no autograd bookkeeping at all: ~10% faster than no_grad here
        idx, real = left_padded(prompts, device)  # (P, L) each
        prefix, h = model.prompt_pass(idx, real)  # the prompts' keys/values, once per prompt; h (P, L, C)
        P, n = len(prompts), n_samples
        R, hd, w = P * n, cfg.n_embd // cfg.n_head, model.transformer.wte.weight
        cache = [tuple(w.new_empty(R, cfg.n_head, max_new_tokens, hd) for _ in range(2)) for _ in range(cfg.n_layer)]
        logits = model.lm_head(h[:, -1]).repeat_interleave(n, dim=0)  # (R, V) the first token's
        next_pos = real.sum(dim=1).repeat_interleave(n)  # (R,) position of the first new token
        tokens = torch.full((R, max_new_tokens), eos_id, dtype=torch.long, device=device)
        lengths = torch.full((R,), max_new_tokens, dtype=torch.long, device=device)
        done = torch.zeros(R, dtype=torch.bool, device=device)
        rows = torch.arange(R, device=device).view(P, n)  # the rows the model runs: n_run of P_run prompts
        for t in range(max_new_tokens):
            run = rows.reshape(-1)  # (R_run,)
            tok = _sample(logits, temperature, top_k, generator, run, R).masked_fill(done[run], eos_id)  # (R_run,)
            tokens[run, t] = tok  # the other rows have ended: eos_id already
            finished = ~done & (tokens[:, t] == eos_id)
            lengths.masked_fill_(finished, t + 1)
            done |= finished
            if t == max_new_tokens - 1 or done.all():
                break
            rows, cache, prefix, tok = drop_ended_rows(rows, done, cache, prefix, tok)
            h = model.hidden(tok[:, None], pos=(next_pos[rows.reshape(-1)] + t)[:, None], cache=cache, cache_pos=t,
                             prefix=prefix)  # (R_run, 1, C)
            logits = model.lm_head(h[:, -1])  # (R_run, V)
    model.train(was_training)
    return tokens.clone(), lengths.clone()  # plain tensors again, which autograd accepts


def drop_ended_rows(rows, done, cache, prefix, tok):
    """generate's speed-up: once half of the rows it runs have ended, stop running most ended rows
    (rows_still_sampling), and keep only their caches, prefixes and last tokens; only when that drops a
    quarter of the rows at least, so that the cache is copied seldom. Each row draws its own uniform at
    every step whether it runs or not (_sample), so the samples are the same as without it."""
    run = rows.reshape(-1)
    if 2 * int((~done[run]).sum()) > run.numel():
        return rows, cache, prefix, tok
    prompts_kept, picked = rows_still_sampling(done[rows])  # (P_new,), (P_new, n_new) into rows
    if 4 * picked.numel() > 3 * run.numel():
        return rows, cache, prefix, tok
    where = (prompts_kept[:, None] * rows.size(1) + picked).view(-1)  # (R_new,) into run
    cache = [(k[where], v[where]) for k, v in cache]
    prefix = ([(k[prompts_kept], v[prompts_kept]) for k, v in prefix[0]], prefix[1][prompts_kept])
    return rows[prompts_kept].gather(1, picked), cache, prefix, tok[where]


def rows_still_sampling(done):
    """Which rows generate goes on running, from done (P_run, n_run), the rows it runs now (n_run per
    prompt): the prompts with a row not done, each with n_new rows, its rows not done first (in order),
    then ended ones to fill up; n_new the most not-done rows of a prompt, at least 2 (unless n_run is 1:
    the CPU rounds a lone row per prompt differently); while under MIN_ROWS rows, the first prompts with
    all rows done too. Returns prompts_kept (P_new,) and picked (P_new, n_new), indices into done."""
    busy = ~done  # (P_run, n_run)
    n_new = max(int(busy.sum(dim=1).max()), min(2, done.size(1)))
    has_busy = busy.any(dim=1)  # (P_run,)
    missing = -(-MIN_ROWS // n_new) - int(has_busy.sum())  # prompts short of MIN_ROWS rows
    kept = has_busy | (~has_busy & ((~has_busy).cumsum(dim=0) <= missing))
    prompts_kept = kept.nonzero().squeeze(1)  # (P_new,)
    picked = torch.sort(done[prompts_kept].int(), dim=1, stable=True).indices[:, :n_new]  # not done first
    return prompts_kept, picked


def configure_optimizer(model, lr, weight_decay, betas=(0.9, 0.95)):
    """AdamW; weight decay on parameters with dim >= 2 (matmul weights, embeddings), none on biases/LayerNorms."""
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    groups = [
        {'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
        {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def num_params(model):
    return sum(p.numel() for p in model.parameters())


def trainable_copy(model):
    """A trainable copy of a policy: a fresh GPT with the same weights, on the same device."""
    clone = GPT(model.config).to(next(model.parameters()).device)
    clone.load_state_dict(model.state_dict())
    return clone


def frozen_copy(model):
    """A frozen copy of a model (the reference of a KL term, a fixed scorer): no gradients, eval mode."""
    model = copy.deepcopy(model)
    model.requires_grad_(False)
    return model.eval()
