"""
The GPT used by both the policy and the reward model of this alignment-from-
demonstrations project: a small, nanoGPT-style decoder-only transformer.

API
    GPTConfig                      hyperparameters (dataclass)
    GPT(config)                    the model
      .forward(idx, targets=None)  -> (logits (B, T, V), mean NLL loss or None)
      .hidden(idx, pos=None, attn_mask=None, cache=None, cache_pos=0, prefix=None)
                                   -> final hidden states (B, T, C) after ln_f; idx may be a SharedPrompts
      .prompt_pass(idx, real)      -> each prompt's keys/values and hidden states, computed once
    SharedPrompts, shared_prompt_batch(prompts, responses, pad_id, device)
                                   -> data.make_batch's (idx, targets, last) for prompts with n responses
                                      each, every prompt run once (scoring: train.score)
    left_padded(prompts, device)   -> (idx, real) a left-padded batch of token lists
    score_pairs(scorer, prompts, responses, pad_id, device, batch=256)
                                   -> (B,) a scorer on flat lists of pairs, each prompt run once for a
                                      group of its responses, equal pairs scored once, batches by length
    token_logprobs(model, idx, targets)  -> (B, T) per-token log-probs, 0 at -100
    sequence_logprob(model, idx, targets)  -> (B,) log-prob of each response, the sum of the above
    masked_mean(values, mask)      -> the mean over the unmasked entries (0 when there are none)
    generate(model, prompts, n_samples, max_new_tokens, eos_id, ...)
                                   -> (tokens, lengths), KV-cached sampling; a prompt's keys/values
                                      are computed and stored once, shared by its n_samples rows; most
                                      rows that have ended stop being run (the same tokens)
    shared_prefix_attention(q, k, v, attn_mask, k_pre, v_pre, pre_bias)  -> the attention used for that
    configure_optimizer(model, lr, weight_decay, betas)  -> AdamW
    num_params(model)              -> number of (unique) parameters
    memory_bytes(config, batch_size, sample_rows)  -> rough peak bytes of training and of sampling
    trainable_copy(policy), frozen_copy(model)  -> copies of a model to train, or to hold fixed
    atomic_write(path, write)      -> write a file through a temporary one and a rename

Pre-trained GPT-2 (Hugging Face layout, model.safetensors):
    GPT.from_gpt2(name_or_path, cache_dir=None, dropout=0.0)  -> GPT with the GPT-2 weights
    gpt2_safetensors(name_or_path, cache_dir=None)  -> local path (downloads gpt2..gpt2-xl if needed)
    read_safetensors(path)         -> {name: tensor}
    gpt2_state_dict(tensors)       -> our state_dict (renamed, Conv1D weights transposed)
    gpt2_config(state_dict, hf_config=None, dropout=0.0)  -> GPTConfig

Module names follow nanoGPT / GPT-2 so that GPT-2 weights can be loaded.
"""
import copy
import errno
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import sys
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

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
    """Attention over a prefix of keys shared by groups of rows, then each row's own keys: what SDPA over the
    concatenation [prefix keys of the row's group, own keys] computes (dropout_p: on the attention weights,
    as SDPA's, in training), but the prefix is stored
    and read once per group, not once per row (Best-of-N: the n samples of a prompt share its keys).
    q: (B, nh, T, hd); k, v: (B, nh, S, hd) the row's own keys; attn_mask: bool (B or 1, 1, T, S) or None.
    k_pre, v_pre: (G, nh, L, hd), group g shared by rows g*n .. (g+1)*n-1 (n = B // G);
    pre_bias: (G, 1, 1, L) added to the prefix scores, 0 (real key) or -inf (pad). Computed in float32,
    like the scores inside SDPA's fused kernels, also under autocast."""
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

    @classmethod
    def from_gpt2(cls, name_or_path, cache_dir=None, dropout=0.0):
        """Our GPT with pre-trained GPT-2 weights: name_or_path is gpt2 / gpt2-medium / gpt2-large /
        gpt2-xl (downloaded once into cache_dir) or a local model.safetensors in the Hugging Face
        layout (or a folder holding one); a config.json beside it is read if present.
        Full GPT-2 vocabulary (50257 for the real models), tanh GELU, every parameter filled."""
        path = gpt2_safetensors(name_or_path, cache_dir)
        sd = gpt2_state_dict(read_safetensors(path))
        config_json = os.path.join(os.path.dirname(path), "config.json")
        hf_config = read_hf_config(config_json) if os.path.isfile(config_json) else None
        try:
            config = gpt2_config(sd, hf_config, dropout)
        except ValueError as e:
            raise ValueError(f"{path}{' with ' + config_json if hf_config else ''}: {e}") from None
        model = cls(config)
        load_strict(model, sd, path)
        return model

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
        """Each prompt's forward, once, for the rows that continue it (generate's samples, the scored
        responses of shared_prompt_hidden). idx, real: (P, L) from left_padded; each prompt starts at
        position 0, its pad keys masked out. Returns (prefix, h): prefix = (cache, bias) for
        hidden(..., prefix=prefix), the keys/values of every layer (P, n_head, L, head_dim) and
        bias (P, 1, 1, L), -inf at pads; h (P, L, C) the hidden states, h[:, -1] at each prompt's last token."""
        cfg = self.config
        P, L = idx.shape
        w = self.transformer.wte.weight
        cache = [tuple(w.new_empty(P, cfg.n_head, L, cfg.n_embd // cfg.n_head) for _ in range(2))
                 for _ in range(cfg.n_layer)]
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
    """scorer(idx, targets, last) -> (B,) (a reward model of reward.py, or any function of a batch)
    on each (prompt, response) pair of two flat lists: (B,) float32 on the CPU. Equal pairs are scored
    once, so they get equal scores; each prompt runs once for a group of its responses, and only the
    responses' tokens run per row (shared_prompt_batch); batches hold responses of similar lengths
    (scoring_batches). The same scores as on data.make_batch's rows, to float tolerance."""
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
    responses, sorted by length, are cut into groups of up to group_size rows (a group runs its prompt
    once); a batch holds groups of one size, of similar longest responses, so little padding. group_size
    trades reruns of a prompt against padding: on the cpu run's Best-of-32 candidates (about 12 distinct
    per prompt, 2 CPU cores) 4 was the fastest of 2, 4, 8, 16 and 32, about 7x the plain forward; 32 about 4x.
    Yields lists of groups, each a list of indices into pairs."""
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
    p = softmax(logits / temperature) (restricted to the top_k logits) by inverse CDF:
        token = min { i : cdf_i >= u * cdf_V },   cdf_i = p_1 + ... + p_i,   u ~ U(0, 1]
    one uniform per row, no token with p_i = 0 ever drawn. cdf and u are float64, so probabilities
    down to ~1e-16 are drawn at their own rate. The same distribution as torch.multinomial(p, 1),
    which draws an exponential for every token of every row, but not the same tokens for a given
    seed (the README's Performance section has the measured cost of each).
    rows (R,), n_all: logits holds these rows of a batch of n_all rows; n_all uniforms are drawn and
    those of these rows used, so that a row's draws do not depend on which other rows are still run
    (generate stops running most rows that have ended)."""
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
    The generator (if any) must live on the model's device. Each prompt's prefix is computed once and its
    keys/values are stored once, shared by its n_samples rows (shared_prefix_attention); each row caches
    only its new tokens. One draw per step for every row (_sample), also for rows that have ended, so the
    samples do not depend on which rows are still run: once half of those run have ended, most ended
    rows stop being run (rows_still_sampling). The tokens are the same as when every row runs to the end."""
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
        logits = model.lm_head(h[:, -1])  # (P, V)

        # P * n_samples rows: the prompt's keys/values stay once per prompt, shared by its n_samples rows
        # (prefix=, pad keys masked out), and each row caches only its new tokens (written before being read)
        P, n = len(prompts), n_samples
        R, hd, w = P * n, cfg.n_embd // cfg.n_head, model.transformer.wte.weight
        cache = [tuple(w.new_empty(R, cfg.n_head, max_new_tokens, hd) for _ in range(2)) for _ in range(cfg.n_layer)]
        logits = logits.repeat_interleave(n, dim=0)  # (R, V)
        next_pos = real.sum(dim=1).repeat_interleave(n)  # (R,) position of the first new token

        tokens = torch.full((R, max_new_tokens), eos_id, dtype=torch.long, device=device)
        lengths = torch.full((R,), max_new_tokens, dtype=torch.long, device=device)
        done = torch.zeros(R, dtype=torch.bool, device=device)
        rows = torch.arange(R, device=device).view(P, n)  # the rows the model runs: n_run of P_run prompts
        for t in range(max_new_tokens):
            run = rows.reshape(-1)  # (R_run,)
            tok = _sample(logits, temperature, top_k, generator, run, R)  # (R_run,)
            tok = tok.masked_fill(done[run], eos_id)
            tokens[run, t] = tok  # the other rows have ended: eos_id already
            finished = ~done & (tokens[:, t] == eos_id)
            lengths.masked_fill_(finished, t + 1)
            done |= finished
            if t == max_new_tokens - 1 or done.all():
                break
            if 2 * int((~done[run]).sum()) <= run.numel():  # half the rows run have ended: run fewer
                prompts_kept, picked = rows_still_sampling(done[rows])  # (P_new,), (P_new, n_new) into rows
                if 4 * picked.numel() <= 3 * run.numel():  # a quarter fewer at least: the cache is copied seldom
                    where = (prompts_kept[:, None] * rows.size(1) + picked).view(-1)  # (R_new,) into run
                    rows = rows[prompts_kept].gather(1, picked)
                    cache = [(k[where], v[where]) for k, v in cache]
                    prefix = ([(k[prompts_kept], v[prompts_kept]) for k, v in prefix[0]], prefix[1][prompts_kept])
                    tok = tok[where]
            h = model.hidden(tok[:, None], pos=(next_pos[rows.reshape(-1)] + t)[:, None], cache=cache, cache_pos=t,
                             prefix=prefix)  # (R_run, 1, C)
            logits = model.lm_head(h[:, -1])  # (R_run, V)
    model.train(was_training)
    return tokens.clone(), lengths.clone()  # plain tensors again, which autograd accepts


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


def memory_bytes(config, batch_size, sample_rows):
    """A rough, generous estimate of the peak memory in bytes (float32: 4 bytes a number) of
    training this model on batch_size sequences, and of sampling sample_rows rows at once;
    returns (training, sampling)."""
    C, L, T, V = config.n_embd, config.n_layer, config.block_size, config.vocab_size
    params = 12 * L * C * C + (V + T) * C  # a block: 4 C^2 in attention, 8 C^2 in the MLP; embeddings
    # AdamW: weights, gradients and two moments (16 bytes a parameter); the activations kept for
    # the backward, per token: about 34 C numbers a block (LayerNorm inputs, q, k, v, the attention
    # output, the 4C-wide MLP before and after its GELU, residuals), the attention weights
    # (n_head T a token, ~5 copies through mask, softmax and dropout), and 3 V for the logits
    training = 16 * params + 4 * batch_size * T * (L * (34 * C + 5 * config.n_head * T) + 3 * V)
    # sampling: the weights, and per row its key/value cache (2 L T C) and ~4 copies of the
    # next-token logits (the logits, their softmax, its cumulative sum, and the float64 draw)
    sampling = 4 * params + 4 * sample_rows * (2 * L * T * C + 4 * V)
    return training, sampling


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


class WriteError(OSError):
    """A file that could not be written (a full disk, a folder without permission): the message
    names the file and the reason."""


def atomic_write(path, write):
    """Every file the project writes goes through here: write(tmp_path) fills a temporary file
    beside path, which then replaces path in one rename, so path is always whole or absent. The
    temporary name is this call's own (two processes writing one path never share it) and is
    removed whatever happens; a failed write raises WriteError naming path."""
    tmp = f"{path}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        if isinstance(e, WriteError) or not is_write_failure(e):
            raise  # not the disk's fault (a network error while downloading, a bug): as it is
        raise WriteError(f"cannot write {path}: {why_not_written(e, path)}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO,
                errno.ENOENT}


def is_write_failure(error):
    """Is this error a file that could not be written: an OSError of WRITE_ERRNOS, or torch.save's
    C++ writer failing (a RuntimeError saying so)?"""
    if isinstance(error, OSError):
        return error.errno in WRITE_ERRNOS
    return any(s in str(error) for s in ("file write failed", "PytorchStreamWriter", "unexpected pos"))


def why_not_written(error, path):
    """The reason a write failed, in words: the OS's, else (torch.save's writer says only "unexpected
    pos") a full disk found by looking, else what can stop a write part-way."""
    if isinstance(error, OSError) and error.errno:
        return os.strerror(error.errno)
    try:
        if shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free < 2**20:
            return os.strerror(errno.ENOSPC)
    except OSError:
        pass
    return "it could not be written in full (no space left on the device, or a quota or file-size limit)"


# ----------------------------------------------------------------------------------------------
# Pre-trained GPT-2 weights: a model.safetensors file in the Hugging Face GPT-2 layout

GPT2_URL_BASE = "https://huggingface.co"  # files are fetched from {GPT2_URL_BASE}/{name}/resolve/main/{file}
GPT2_CACHE_DIR = os.path.join("~", ".cache", "gpt2-safetensors")  # default download folder
GPT2_N_HEAD = {768: 12, 1024: 16, 1280: 20, 1600: 25}  # n_embd -> n_head: gpt2, -medium, -large, -xl
GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
# (bytes, sha256) of files as published, checked on download and on every reuse; the other models'
# files are checked against the length the server announces, and what was downloaded is recorded
GPT2_PUBLISHED = {
    "gpt2/model.safetensors": (548105171, "248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b473182f0f81d3a707"),
    "gpt2/config.json": (665, "0daed7749b4f02b8f76240d5444551d7b08712dab4d0adb8239c56ba823bb7b4"),
}
GPT2_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}  # HF activation -> ours
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """All tensors of a .safetensors file as {name: tensor} (CPU, views of one buffer holding the file).
    Format: 8-byte little-endian unsigned header length N, N bytes of JSON {name: {"dtype", "shape",
    "data_offsets": [begin, end]}} (offsets relative to the byte after the header, plus an optional
    "__metadata__"), then the raw little-endian data. Raises ValueError naming the file if it is not one."""
    assert sys.byteorder == "little", "read_safetensors assumes a little-endian machine"
    with open(path, "rb") as f:
        data = bytearray(os.fstat(f.fileno()).st_size)  # writable, so torch.frombuffer can share it
        f.readinto(data)

    def bad(why):
        return ValueError(f"{path}: not a valid safetensors file: {why}")

    if len(data) < 8:
        raise bad(f"only {len(data)} bytes, fewer than the 8-byte header length")
    n = int.from_bytes(data[:8], "little")
    if 8 + n > len(data):
        raise bad(f"header length {n} runs past the end of the file ({len(data)} bytes; truncated?)")
    try:
        header = json.loads(data[8:8 + n])
    except ValueError as e:  # bad UTF-8 or bad JSON
        raise bad(f"the header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    header.pop("__metadata__", None)
    body = memoryview(data)[8 + n:]
    check_layout(header, len(body), bad)
    tensors = {}
    for name, info in header.items():
        dtype, shape, begin, end = safetensors_entry(info)
        nbytes = end - begin
        flat = torch.frombuffer(body[begin:end], dtype=dtype) if nbytes else torch.empty(0, dtype=dtype)
        if flat.data_ptr() % dtype.itemsize:
            flat = flat.clone()  # misaligned data: copy into an aligned buffer
        tensors[name] = flat.view(shape)
    return tensors


def check_layout(header, n_bytes, bad):
    """The format's rule: the tensors' byte ranges, in order, tile the n_bytes of data exactly,
    with no overlap, no gap and nothing after the last (a file that breaks it was not written by a
    safetensors writer, or was edited). bad(why) -> the exception to raise."""
    spans = []
    for name, info in header.items():
        entry = safetensors_entry(info)
        if entry is None:
            raise bad(f"tensor {name!r} has a bad or unsupported entry {info}")
        dtype, shape, begin, end = entry
        if not (begin <= end <= n_bytes and end - begin == math.prod(shape) * dtype.itemsize):
            raise bad(f"tensor {name!r}: data_offsets {[begin, end]} do not fit {math.prod(shape) * dtype.itemsize} "
                      f"bytes of {info['dtype']} {shape} in {n_bytes} data bytes (truncated?)")
        spans.append((begin, end, name))
    at = 0
    for begin, end, name in sorted(spans):
        if begin != at:
            raise bad(f"tensor {name!r} starts at data byte {begin}, not {at}: tensors "
                      f"{'overlap' if begin < at else 'leave a gap'}")
        at = end
    if at != n_bytes:
        raise bad(f"{n_bytes - at} data bytes after the last tensor")


def safetensors_entry(info):
    """(dtype, shape, begin, end) of one safetensors header entry; None if malformed or of an unknown dtype."""
    try:
        dtype, shape, (begin, end) = SAFETENSORS_DTYPES[info["dtype"]], list(info["shape"]), info["data_offsets"]
    except (KeyError, TypeError, ValueError):
        return None
    ok = all(isinstance(x, int) and x >= 0 for x in (begin, end, *shape))
    return (dtype, shape, begin, end) if ok else None


# config.json fields we read, and the values each may hold
HF_CONFIG_FIELDS = {"n_head": (lambda v: type(v) is int and v > 0, "a positive integer"),
                    "n_positions": (lambda v: type(v) is int and v > 0, "a positive integer"),
                    "n_ctx": (lambda v: type(v) is int and v > 0, "a positive integer"),
                    "layer_norm_epsilon": (lambda v: type(v) in (int, float) and v > 0, "a positive number"),
                    "activation_function": (lambda v: isinstance(v, str), "a string")}


def read_hf_config(path):
    """The Hugging Face config.json at path as a dict, its fields checked (HF_CONFIG_FIELDS);
    a ValueError naming the file otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            hf_config = json.load(f)
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON
        raise ValueError(f"{path} is not a readable JSON file ({e}); fix it, or delete it") from None
    if not isinstance(hf_config, dict):
        raise ValueError(f"{path} holds a JSON {type(hf_config).__name__}, not an object; fix it, or delete it")
    for key, (ok, what) in HF_CONFIG_FIELDS.items():
        if key in hf_config and not ok(hf_config[key]):
            raise ValueError(f"{path}: {key} = {hf_config[key]!r} must be {what}; fix it, or delete it")
    return hf_config


def gpt2_state_dict(tensors):
    """Hugging Face GPT-2 tensors -> our state_dict: names get the "transformer." prefix (HF files
    have it or not), the Conv1D weights (c_attn, c_proj, c_fc stored (in, out)) are transposed into
    nn.Linear's (out, in), the attention-mask buffers are dropped, and lm_head is tied to wte."""
    sd = {}
    for name, t in tensors.items():
        name = name.removeprefix("transformer.")
        if re.fullmatch(r"h\.\d+\.attn\.(bias|masked_bias)", name) or name == "lm_head.weight":
            continue  # causal-mask buffers; the output head is checked below
        if re.fullmatch(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight", name):
            t = t.t()  # Conv1D (in, out) -> Linear (out, in)
        sd["transformer." + name] = t
    wte = sd.get("transformer.wte.weight")
    head = tensors.get("lm_head.weight")
    if head is not None and (wte is None or not torch.equal(head, wte)):
        raise ValueError("GPT-2 weights have an lm_head.weight that is not tied to wte.weight; "
                         "our GPT ties them")
    if wte is not None:
        sd["lm_head.weight"] = wte  # tied
    return sd


def gpt2_config(sd, hf_config=None, dropout=0.0):
    """GPTConfig of a GPT-2 state_dict (ours, from gpt2_state_dict): sizes from the tensors' shapes,
    n_head (which shapes cannot give) from the Hugging Face config.json dict hf_config if given,
    else from the known sizes gpt2 / gpt2-medium / gpt2-large / gpt2-xl."""
    hf_config = hf_config or {}
    if "transformer.wte.weight" not in sd or "transformer.wpe.weight" not in sd:
        raise ValueError("not GPT-2 weights: no wte.weight / wpe.weight tensor")
    vocab_size, n_embd = sd["transformer.wte.weight"].shape
    block_size = sd["transformer.wpe.weight"].shape[0]
    n_layer = sum(1 for k in sd if re.fullmatch(r"transformer\.h\.\d+\.ln_1\.weight", k))
    n_head = hf_config.get("n_head", GPT2_N_HEAD.get(n_embd))
    if n_head is None:
        raise ValueError(f"GPT-2 weights with n_embd={n_embd} are not one of gpt2..gpt2-xl, so n_head is "
                         f"unknown: put the model's config.json (with n_head) beside model.safetensors")
    if n_embd % n_head:
        raise ValueError(f"n_head {n_head} does not divide n_embd {n_embd}")
    n_pos = hf_config.get("n_positions", hf_config.get("n_ctx", block_size))
    eps = hf_config.get("layer_norm_epsilon", 1e-5)
    act = hf_config.get("activation_function", "gelu_new")
    if n_pos != block_size or eps != 1e-5 or act not in GPT2_GELU:
        raise ValueError(f"unsupported GPT-2 config: n_positions {n_pos} (wpe has {block_size} rows), "
                         f"layer_norm_epsilon {eps} (need 1e-5), activation_function {act!r} "
                         f"(need one of {list(GPT2_GELU)})")
    return GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                     n_embd=n_embd, dropout=dropout, bias="transformer.ln_f.bias" in sd, gelu=GPT2_GELU[act])


def load_strict(model, sd, path):
    """Copy sd into model; every parameter must be filled, with the right shape, and nothing left over."""
    ours = model.state_dict()
    missing, unexpected = sorted(set(ours) - set(sd)), sorted(set(sd) - set(ours))
    wrong = [f"{k} {tuple(sd[k].shape)} vs ours {tuple(ours[k].shape)}"
             for k in sorted(set(ours) & set(sd)) if sd[k].shape != ours[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{path}: the weights do not fit our GPT: missing {missing}, "
                         f"unexpected {unexpected}, wrong shapes {wrong}")
    integer = [f"{k} ({sd[k].dtype})" for k in sorted(sd) if not sd[k].is_floating_point()]
    if integer:
        raise ValueError(f"{path}: weights must be floating point, but {', '.join(integer[:3])} are not")
    broken = [k for k in sorted(sd) if not torch.isfinite(sd[k]).all()]
    if broken:
        raise ValueError(f"{path}: {', '.join(broken[:3])} hold NaN or infinite values; the file is damaged")
    model.load_state_dict(sd)  # copies, casting F16/BF16 to the model's dtype


def gpt2_safetensors(name_or_path, cache_dir=None):
    """A local model.safetensors path: an existing file is returned as is (a folder: its
    model.safetensors); gpt2 / gpt2-medium / gpt2-large / gpt2-xl are downloaded with their
    config.json into cache_dir/NAME/ once, and reused after as long as they are unchanged
    (cached_file_ok); a damaged or incomplete cached file is downloaded again."""
    if os.path.isfile(name_or_path):
        return name_or_path
    if os.path.isfile(os.path.join(name_or_path, "model.safetensors")):
        return os.path.join(name_or_path, "model.safetensors")
    if name_or_path not in GPT2_NAMES:
        raise ValueError(f"{name_or_path!r} is neither a model.safetensors file nor one of {list(GPT2_NAMES)}")
    folder = os.path.join(os.path.expanduser(cache_dir or GPT2_CACHE_DIR), name_or_path)
    os.makedirs(folder, exist_ok=True)
    for fname in ("config.json", "model.safetensors"):
        dst, published = os.path.join(folder, fname), GPT2_PUBLISHED.get(f"{name_or_path}/{fname}")
        if not cached_file_ok(dst, published):
            if os.path.exists(dst):
                print(f"{dst} is damaged or incomplete: downloading it again")
            download(f"{GPT2_URL_BASE}/{name_or_path}/resolve/main/{fname}", dst, name_or_path, published)
    return os.path.join(folder, "model.safetensors")


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def cached_file_ok(path, published=None):
    """Is the downloaded file at path whole and unchanged: its length and sha256 those published
    (bytes, sha256), or else those recorded at download in path.sha256?"""
    try:
        if published is None:
            sha256, size = Path(path + ".sha256").read_text().split()
            published = (int(size), sha256)
        return os.path.getsize(path) == published[0] and file_sha256(path) == published[1]
    except (OSError, ValueError):
        return False  # no file, or no record of it


def download(url, dst, name, published=None):
    """Fetch url into dst atomically (atomic_write, through a temporary file of this call's own,
    so that processes downloading at once do not mix), checked before it is kept: its length
    against the server's Content-Length, and against published = (bytes, sha256) where known.
    Its length and sha256 then go to dst.sha256, which every reuse checks (cached_file_ok)."""
    print(f"downloading {url} -> {dst}")
    got = {}

    def fetch(tmp):
        digest, size = hashlib.sha256(), 0
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            announced = r.headers.get("Content-Length")
            while chunk := r.read(1 << 20):
                f.write(chunk)
                digest.update(chunk)
                size += len(chunk)
        if announced is not None and size != int(announced):
            raise ValueError(f"the download of {url} stopped at {size} of {announced} bytes; run again")
        if published is not None and (size, digest.hexdigest()) != published:
            raise ValueError(f"the download of {url} is not the published file ({size} bytes, sha256 "
                             f"{digest.hexdigest()[:16]}... instead of {published[0]} bytes, {published[1][:16]}...); "
                             f"run again, or download it yourself and pass --init_from=PATH/model.safetensors")
        got.update(size=size, sha256=digest.hexdigest())
    try:
        atomic_write(dst, fetch)
        atomic_write(dst + ".sha256", lambda tmp: Path(tmp).write_text(f"{got['sha256']} {got['size']}\n"))
    except OSError as e:  # URLError, HTTPError, timeouts, a connection reset, a full disk
        raise RuntimeError(f"cannot download {name} ({url}: {e}); download model.safetensors yourself "
                           f"and pass --init_from=PATH/model.safetensors") from None
