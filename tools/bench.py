"""
Throughput benchmark of our GPT (model.py) against Hugging Face transformers' GPT2LMHeadModel, with
identical weights and config (our GPT with gelu="tanh", its weights copied into a GPT2LMHeadModel with
SDPA attention), measured side by side in one run, at each model size of --sizes (vocabulary 2048):

1. Best-of-N sampling, generated tokens/s: P prompts (random, all prompt_len tokens long) x N samples x
   L new tokens, temperature 1, no top-k, EOS disabled on every side so that every row gets exactly L
   tokens (the tokens actually produced are counted and checked). Samplers:
     ours      model.generate: each prompt's prefix computed and cached once for its N samples
     hf        GPT2LMHeadModel.generate(do_sample=True, num_return_sequences=N, top_k=0,
               max_new_tokens=min_new_tokens=L, eos_token_id=None)
     no-cache  our model, a full forward of the whole (P*N, prompt + generated) sequence at every step
     draws     the draw alone, L times on random (P*N, V) logits, each side's own: ours (model._sample:
               softmax, a float64 cdf, one uniform per row, searchsorted) and HF's (softmax +
               torch.multinomial, which draws an exponential per token and row: P*N*V per step). The
               table shows each side's share of time in its draws, and ours / HF with them taken out
               of both, i.e. what the model side alone gains.
2. Training, tokens/s of one forward + backward + AdamW step on the same random (B, T) batch, ours vs
   hf (the same cross-entropy over all B*T positions on both sides), and model-FLOPs utilisation:
     FLOPs/token = 6 N + 12 n_layer n_embd T   (the PaLM estimate, as in nanoGPT's estimate_mfu;
     N = parameters without the position embedding wpe, the tied wte counted once, as the output head)
   divided by a peak measured in the same run, a 2048 x 2048 float32 matmul (2 n^3 FLOPs, best of 10)
   on CPU, or the GPU's dense bf16 peak (a table constant) on CUDA, where everything runs under bf16
   autocast.
3. Scoring, candidates scored/s: the sequence log-prob sum_t log p(y_t | x, y_<t) of P' = score_prompts random
   prompts x N candidates (random tokens, lengths uniform in 1..L, all distinct), what LogRatioReward and the
   KL estimate compute (a reward model's forward is the same trunk with another head). Scorers:
     ours      model.score_pairs, parallel.score's path: each prompt runs once for a group of up to 4 of its
               candidates, only the candidates' tokens per row (model.SharedPrompts), batches grouped by length
     plain     our model on data.make_batch's full sequences (prompt + candidate), score_batch rows at a
               time in the given order: the path parallel.score took before
     hf        GPT2LMHeadModel on the same batches as plain (attention_mask on the right padding)
   The table gives each side's candidates/s, ours / plain, ours / HF, and the largest difference of a
   score from plain's (the same numbers to float tolerance). Real Best-of-N candidates repeat (the cpu
   run's 32 per prompt hold about 12 distinct ones), which ours scores once: a further gain not measured here.
4. Memory: peak RSS (resource.getrusage ru_maxrss, its high-water mark reset before the call through
   /proc/self/clear_refs) on CPU, torch.cuda.max_memory_allocated on CUDA, during the first (warm-up)
   call of each side; "+MB" is the increase over the start of that call (freed memory handed back first).

Every time is the median of --reps timed repetitions (time.perf_counter, torch.cuda.synchronize on CUDA)
after --warmup untimed calls; the repetitions of the sides compared are taken in turns (ours, hf, ours,
hf, ...), so that a busy neighbour or a hot cache falls on both alike. The slow no-cache loop gets
--slow_reps and no warm-up of its own (it runs right after ours, on the same model). torch.set_num_threads
is left at its default. Ratios are ours / HF (or ours / plain) in tokens/s or candidates/s. Prints markdown
tables and writes every number to --out (JSON). Without transformers it prints a note and measures ours only.

    python tools/bench.py                                   # CPU: about 1.5 minutes on 2 cores
    python tools/bench.py --device=cuda --out=bench_cuda.json
    python tools/bench.py --sizes=4x128 --reps=3 --slow_reps=0   # quick look: small model, no no-cache loop
"""
import argparse
import contextlib
import ctypes
import gc
import json
import platform
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]  # the project, above tools/
sys.path.insert(0, str(ROOT))

from data import make_batch  # noqa: E402  (after the sys.path line above)
from checkpoint import atomic_write  # noqa: E402
from model import (GPT, GPTConfig, _sample, configure_optimizer, generate,  # noqa: E402
                   score_pairs, sequence_logprob)

try:
    import transformers
    transformers.logging.set_verbosity_error()
except ImportError:
    transformers = None

NO_EOS = -1  # an eos_id no sampler can produce: every row runs the full L new tokens
GPU_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12,
                 "RTX 4090": 165e12, "RTX 3090": 71e12}  # dense bf16 tensor-core FLOP/s, by device-name substring


@dataclass
class Settings:
    device: str = "cpu"
    out: str = "bench.json"
    sizes: str = "4x128,6x384"   # n_layer x n_embd, comma-separated; n_head = n_embd // 64
    vocab_size: int = 2048
    block_size: int = 128
    prompts: int = 8             # P
    prompt_len: int = 30
    samples: int = 16            # N
    new_tokens: int = 32         # L
    batch: int = 16              # B (training)
    score_prompts: int = 32      # P' (scoring): N = samples candidates each, lengths uniform in 1..new_tokens
    score_batch: int = 256       # rows per scoring batch (train.score's default)
    seq_len: int = 128           # T (training)
    warmup: int = 1
    reps: int = 5
    slow_reps: int = 1           # timed repetitions of the no-cache sampler (0 = skip it)
    peak_n: int = 2048           # CPU peak: an n x n float32 matmul
    seed: int = 0


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(Settings):
        p.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
    return Settings(**vars(p.parse_args()))


# ---------------------------------------------------------------------------------------------- measuring

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak_memory(device):
    """Reset the peak-memory high-water mark; returns the memory in use now (MB) and whether it was reset.
    On CPU, freed memory is first handed back to the OS (glibc malloc_trim), so that the increase over the
    start is what the measured code allocates rather than what earlier code left in malloc's free lists."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20, True
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:  # Linux: "5" resets the peak RSS to the current RSS
            f.write("5")
        return peak_memory(device), True
    except OSError:
        return peak_memory(device), False


def peak_memory(device):
    """Peak memory (MB) since the last reset: CUDA allocations, or the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / (2**20 if sys.platform == "darwin" else 1024)  # macOS reports bytes, Linux kB


def run_once(fn, device, memory=False):
    """One timed call of fn (which returns the number of tokens it processed) -> (tokens, seconds, memory);
    memory (peak MB, increase over the start, whether the peak could be reset) only if asked for."""
    start_mb, was_reset = reset_peak_memory(device) if memory else (None, None)
    t0 = time.perf_counter()
    n_tokens = fn()
    sync(device)
    sec = time.perf_counter() - t0
    if not memory:
        return n_tokens, sec, None
    peak = peak_memory(device)
    return n_tokens, sec, dict(peak_mb=peak, delta_mb=peak - start_mb, peak_reset=was_reset)


def measure(fns, device, reps, warmup):
    """Time the callables of fns ({name: fn}) side by side: warmup untimed calls of each (the first one
    measures memory), then reps rounds that call each fn once in turn, so that every side sees the same
    machine (a busy neighbour, a hot cache) alike. Without warm-up the first timed call measures memory.
    -> {name: dict(tokens, sec = median, tok_per_s, times, peak_mb, delta_mb, peak_reset)}"""
    res = {name: dict(times=[], tokens=set()) for name in fns}
    for name, fn in fns.items():
        for i in range(warmup):
            n_tokens, _, mem = run_once(fn, device, memory=i == 0)
            res[name]["tokens"].add(n_tokens)
            res[name].update(mem or {})
    for i in range(reps):
        for name, fn in fns.items():
            n_tokens, sec, mem = run_once(fn, device, memory=warmup == 0 and i == 0)
            res[name]["tokens"].add(n_tokens)
            res[name]["times"].append(sec)
            res[name].update(mem or {})
    for name, r in res.items():
        assert len(r["tokens"]) == 1, f"{name}: token counts differ between calls: {r['tokens']}"
        r["tokens"] = r["tokens"].pop()
        r["sec"] = statistics.median(r["times"])
        r["tok_per_s"] = r["tokens"] / r["sec"]
    return res


def matmul_peak(device, n=2048, reps=10):
    """FLOP/s: measured float32 n x n matmul on CPU; the GPU's dense bf16 peak from GPU_BF16_PEAK on CUDA."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in GPU_BF16_PEAK.items() if k in name), None)
        return peak, f"{name}: dense bf16 peak (table constant)"
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times), f"measured: {n}x{n} float32 matmul, 2 n^3 FLOPs, best of {reps}"


def autocast(device):
    """bf16 autocast on CUDA (the peak MFU is measured against), plain float32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------- models

def build_models(n_layer, n_embd, s, device):
    """Our GPT (gelu="tanh", random init) and, if transformers is installed, a GPT2LMHeadModel with the same
    config and a copy of the same weights (Conv1D weights are (in, out): transposed). -> (ours, hf or None)"""
    torch.manual_seed(s.seed)
    cfg = GPTConfig(block_size=s.block_size, vocab_size=s.vocab_size, n_layer=n_layer, n_head=n_embd // 64,
                    n_embd=n_embd, dropout=0.0, bias=True, gelu="tanh")
    ours = GPT(cfg).to(device).eval()
    if transformers is None:
        return ours, None
    hf_cfg = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, activation_function="gelu_new", layer_norm_epsilon=1e-5, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        tie_word_embeddings=True, attn_implementation="sdpa")
    hf = transformers.GPT2LMHeadModel(hf_cfg).to(device).eval()
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    sd = {k: (v.t() if k.endswith(conv1d) else v).clone() for k, v in ours.state_dict().items()}
    hf.load_state_dict(sd, strict=True)
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr(), "hf head not tied"
    return ours, hf


@torch.no_grad()
def max_logit_diff(ours, hf, s, device):
    """Max |logit difference| of the two models on one random batch: the weights really are the same."""
    idx = torch.randint(0, s.vocab_size, (2, s.seq_len), device=device)
    return (ours.eval()(idx)[0] - hf.eval()(idx).logits).abs().max().item()


# ---------------------------------------------------------------------------------------------- samplers
# Each returns the number of new tokens it produced (and checks it is P * N * L).

def sample_ours(model, prompts, s, device):
    g = torch.Generator(device=device).manual_seed(s.seed)
    _, lengths = generate(model, prompts, s.samples, s.new_tokens, eos_id=NO_EOS, temperature=1.0,
                          top_k=None, generator=g)
    return int(lengths.sum())


@torch.no_grad()
def sample_hf(model, prompts, s, device):
    torch.manual_seed(s.seed)
    idx = torch.tensor(prompts, device=device)  # (P, prompt_len): all prompts have the same length
    out = model.generate(idx, attention_mask=torch.ones_like(idx), do_sample=True, temperature=1.0, top_k=0,
                         top_p=1.0, num_return_sequences=s.samples, max_new_tokens=s.new_tokens,
                         min_new_tokens=s.new_tokens, eos_token_id=None, pad_token_id=0)
    return out[:, idx.size(1):].numel()


@torch.no_grad()
def sample_no_cache(model, prompts, s, device):
    """The plain loop: a full forward of the whole sequence at every step, sampled with model._sample."""
    g = torch.Generator(device=device).manual_seed(s.seed)
    model.eval()
    x = torch.tensor(prompts, device=device).repeat_interleave(s.samples, dim=0)  # (P*N, prompt_len)
    for _ in range(s.new_tokens):
        logits, _ = model(x)  # (P*N, T, V)
        x = torch.cat([x, _sample(logits[:, -1], 1.0, None, g)[:, None]], dim=1)
    return x[:, len(prompts[0]):].numel()


@torch.no_grad()
def draws_only(draw, prompts, s, device):
    """Only the draws a generate loop makes: L calls of draw(logits, generator) on (P*N, V) float32 logits."""
    g = torch.Generator(device=device).manual_seed(s.seed)
    logits = torch.randn(len(prompts) * s.samples, s.vocab_size, generator=g, device=device)
    return sum(draw(logits, g).numel() for _ in range(s.new_tokens))


def draw_ours(logits, g):
    return _sample(logits, 1.0, None, g)  # inverse CDF: one uniform per row


def draw_hf(logits, g):
    """What HF generate(do_sample=True) does per step after its logits processors (none active here)."""
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=g).squeeze(1)


# ---------------------------------------------------------------------------------------------- scoring
# Each returns the number of candidates it scored, and keeps its scores in `out` for the comparison.

def scoring_data(s):
    """P' random prompts of prompt_len tokens, N random candidates each of lengths uniform in 1..L: flat lists."""
    g = torch.Generator().manual_seed(s.seed + 3)
    prompts = torch.randint(0, s.vocab_size, (s.score_prompts, s.prompt_len), generator=g).tolist()
    lengths = torch.randint(1, s.new_tokens + 1, (s.score_prompts * s.samples,), generator=g).tolist()
    candidates = [torch.randint(0, s.vocab_size, (n,), generator=g).tolist() for n in lengths]
    return [p for p in prompts for _ in range(s.samples)], candidates


def score_ours(model, prompts, candidates, s, device, out):
    """model.score_pairs: each prompt once per group of its candidates, batches grouped by length."""
    out["ours"] = score_pairs(lambda idx, targets, last: sequence_logprob(model, idx, targets), prompts, candidates,
                              0, device, s.score_batch)
    return len(candidates)


@torch.inference_mode()
def score_plain(logprob, prompts, candidates, s, device, out, name):
    """logprob(idx, targets) (B,) on data.make_batch's full sequences, score_batch rows at a time, in order."""
    scores = []
    for i in range(0, len(prompts), s.score_batch):
        idx, targets, last = make_batch(prompts[i:i + s.score_batch], candidates[i:i + s.score_batch], 0, device)
        scores.append(logprob(idx, targets, last).float().cpu())
    out[name] = torch.cat(scores)
    return len(candidates)


def hf_logprob(model):
    """The sequence log-prob under a GPT2LMHeadModel of make_batch's rows (right-padded: attention_mask)."""
    def logprob(idx, targets, last):
        mask = torch.arange(idx.size(1), device=idx.device) <= last[:, None]  # (B, T) real tokens
        logits = model(input_ids=idx, attention_mask=mask.long()).logits  # (B, T, V)
        logp = F.log_softmax(logits.float(), dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return logp.masked_fill(targets == -100, 0.0).sum(dim=1)  # (B,)
    return logprob


# ---------------------------------------------------------------------------------------------- training

def train_step_fn(model, logits_of, s, device):
    """A closure doing one forward + backward + AdamW step on a fixed random (B, T) batch; returns B*T."""
    g = torch.Generator().manual_seed(s.seed + 1)
    data = torch.randint(0, s.vocab_size, (s.batch, s.seq_len + 1), generator=g).to(device)
    x, y = data[:, :-1], data[:, 1:]
    model.train()
    opt = configure_optimizer(model, lr=1e-4, weight_decay=0.1)

    def step():
        with autocast(device):
            logits = logits_of(model, x)  # (B, T, V)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return x.numel()
    return step


def flops_per_token(model, n_layer, n_embd, T):
    """6 N + 12 n_layer n_embd T (PaLM appendix B, nanoGPT's estimate_mfu): N = parameters without wpe,
    the tied wte counted once (it is the output head's matmul). -> (FLOPs per token, N)"""
    n = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    return 6 * n + 12 * n_layer * n_embd * T, n


# ---------------------------------------------------------------------------------------------- the run

def bench_size(n_layer, n_embd, s, device, peak_flops):
    """All measurements at one model size -> dict of results."""
    ours, hf = build_models(n_layer, n_embd, s, device)
    fpt, n_params = flops_per_token(ours, n_layer, n_embd, s.seq_len)
    res = dict(n_layer=n_layer, n_embd=n_embd, n_head=ours.config.n_head, n_params_flops=n_params,
               flops_per_token=fpt)
    if hf is not None:
        res["max_logit_diff"] = max_logit_diff(ours, hf, s, device)
    g = torch.Generator().manual_seed(s.seed + 2)
    prompts = torch.randint(0, s.vocab_size, (s.prompts, s.prompt_len), generator=g).tolist()

    samplers = {"ours": lambda: sample_ours(ours, prompts, s, device),
                "hf": lambda: sample_hf(hf, prompts, s, device),
                "draws-ours": lambda: draws_only(draw_ours, prompts, s, device),
                "draws-hf": lambda: draws_only(draw_hf, prompts, s, device)}
    if hf is None:
        del samplers["hf"], samplers["draws-hf"]
    print(f"  {n_layer}x{n_embd}: sampling", file=sys.stderr, flush=True)
    with autocast(device):
        res["sampling"] = measure(samplers, device, s.reps, s.warmup)
        if s.slow_reps:  # no warm-up of its own: the same model ran just before
            print(f"  {n_layer}x{n_embd}: sampling without a cache", file=sys.stderr, flush=True)
            slow = {"no-cache": lambda: sample_no_cache(ours, prompts, s, device)}
            res["sampling"] |= measure(slow, device, s.slow_reps, warmup=0)
    for name, r in res["sampling"].items():
        assert r["tokens"] == s.prompts * s.samples * s.new_tokens, f"{name} produced {r['tokens']} tokens"

    print(f"  {n_layer}x{n_embd}: scoring", file=sys.stderr, flush=True)
    prompts, candidates, scores = *scoring_data(s), {}
    scorers = {"ours": lambda: score_ours(ours, prompts, candidates, s, device, scores),
               "plain": lambda: score_plain(lambda idx, targets, last: sequence_logprob(ours, idx, targets),
                                            prompts, candidates, s, device, scores, "plain"),
               "hf": lambda: score_plain(hf_logprob(hf), prompts, candidates, s, device, scores, "hf")}
    if hf is None:
        del scorers["hf"]
    with autocast(device):
        res["scoring"] = measure(scorers, device, s.reps, s.warmup)
    for name, r in res["scoring"].items():
        r["max_diff_vs_plain"] = (scores[name] - scores["plain"]).abs().max().item()

    print(f"  {n_layer}x{n_embd}: training", file=sys.stderr, flush=True)
    trainers = {"ours": train_step_fn(ours, lambda m, x: m(x)[0], s, device)}
    if hf is not None:
        trainers["hf"] = train_step_fn(hf, lambda m, x: m(input_ids=x).logits, s, device)
    res["training"] = measure(trainers, device, s.reps, s.warmup)
    for r in res["training"].values():
        r["mfu"] = r["tok_per_s"] * fpt / peak_flops if peak_flops else None
    return res


def ratio(res, kind, a, b):
    ra, rb = res[kind].get(a), res[kind].get(b)
    return ra["tok_per_s"] / rb["tok_per_s"] if ra and rb else None


def fmt(x, spec, suffix=""):
    return "-" if x is None else format(x, spec) + suffix


def mem(r):
    return "-" if r is None else f"{r['peak_mb']:.0f} (+{r['delta_mb']:.0f})"


def size_name(r):
    return f"{r['n_layer']} x {r['n_embd']} ({r['n_head']} heads)"


def sampling_table(results, s):
    out = [f"Best-of-N sampling, generated tokens/s: P={s.prompts} prompts of {s.prompt_len} tokens x N={s.samples} "
           f"samples x L={s.new_tokens} new tokens = {s.prompts * s.samples * s.new_tokens} tokens, temperature 1, "
           f"no top-k, no EOS.",
           "",
           "| model | ours | HF generate | no-cache loop | ours / HF | ours / no-cache "
           "| draws, share of time: ours / HF | ours / HF without the draws | peak MB (+MB): ours / HF / no-cache |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        sm = r["sampling"]
        sec = {k: v["sec"] for k, v in sm.items()}
        tps = [fmt(sm[k]["tok_per_s"], ".0f") if k in sm else "-" for k in ("ours", "hf", "no-cache")]
        share = [fmt(100 * sec[d] / sec[k], ".0f", "%") if k in sec else "-"
                 for k, d in (("ours", "draws-ours"), ("hf", "draws-hf"))]
        rest = (sec["hf"] - sec["draws-hf"]) / (sec["ours"] - sec["draws-ours"]) if "hf" in sec else None
        out.append(f"| {size_name(r)} | {' | '.join(tps)} | {fmt(ratio(r, 'sampling', 'ours', 'hf'), '.2f', 'x')} "
                   f"| {fmt(ratio(r, 'sampling', 'ours', 'no-cache'), '.1f', 'x')} | {' / '.join(share)} "
                   f"| {fmt(rest, '.2f', 'x')} | {' / '.join(mem(sm.get(k)) for k in ('ours', 'hf', 'no-cache'))} |")
    out += ["", "Draws: L steps on (P*N, V) float32 logits. Ours: softmax, float64 cdf, one uniform per row, "
                "searchsorted (model._sample). HF: softmax + torch.multinomial, an exponential per token and row. "
                "The same distribution; not the same tokens."]
    return out


def scoring_table(results, s):
    n = s.score_prompts * s.samples
    out = [f"Scoring, candidates scored/s: the sequence log-prob of P'={s.score_prompts} prompts of {s.prompt_len} "
           f"tokens x N={s.samples} candidates = {n} candidates of 1..{s.new_tokens} tokens (uniform, all distinct), "
           f"{s.score_batch} rows a batch.",
           "",
           "| model | ours (shared prompts) | plain | HF | ours / plain | ours / HF | max score diff vs plain: ours / HF "
           "| peak MB (+MB): ours / plain / HF |",
           "|---|---:|---:|---:|---:|---:|---|---|"]
    for r in results:
        sc = r["scoring"]
        cps = [fmt(sc[k]["tok_per_s"], ".0f") if k in sc else "-" for k in ("ours", "plain", "hf")]
        diffs = " / ".join(fmt(sc[k]["max_diff_vs_plain"], ".1e") if k in sc else "-" for k in ("ours", "hf"))
        out.append(f"| {size_name(r)} | {' | '.join(cps)} | {fmt(ratio(r, 'scoring', 'ours', 'plain'), '.2f', 'x')} "
                   f"| {fmt(ratio(r, 'scoring', 'ours', 'hf'), '.2f', 'x')} | {diffs} "
                   f"| {' / '.join(mem(sc.get(k)) for k in ('ours', 'plain', 'hf'))} |")
    return out


def training_table(results, s, env):
    peak = env["peak_flops"]
    out = [f"Training, tokens/s of one forward + backward + AdamW step, B={s.batch} x T={s.seq_len}. "
           f"MFU = tokens/s x (6 N + 12 n_layer n_embd T) / peak, N = parameters without wpe (PaLM / nanoGPT "
           f"estimate); peak {fmt(peak and peak / 1e9, '.0f')} GFLOP/s ({env['peak_how']}).",
           "",
           "| model | ours | HF | ours / HF | MFU ours | MFU HF | peak MB (+MB): ours / HF |",
           "|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        tr = r["training"]
        tps = [fmt(tr[k]["tok_per_s"], ".0f") if k in tr else "-" for k in ("ours", "hf")]
        mfu = [fmt(tr[k]["mfu"] and 100 * tr[k]["mfu"], ".1f", "%") if k in tr else "-" for k in ("ours", "hf")]
        out.append(f"| {size_name(r)} | {' | '.join(tps)} | {fmt(ratio(r, 'training', 'ours', 'hf'), '.2f', 'x')} "
                   f"| {' | '.join(mfu)} | {' / '.join(mem(tr.get(k)) for k in ('ours', 'hf'))} |")
    return out


def markdown(results, s, env):
    head = [f"Device: {env['device']}; torch {env['torch']}, transformers {env['transformers']}, "
            f"{env['threads']} threads. Medians of {s.reps} timed repetitions (sides in turns) after {s.warmup} "
            f"warm-up ({s.slow_reps} for no-cache, no warm-up). Vocabulary {s.vocab_size}, random weights"
            + (", identical in ours and HF." if env["transformers"] else "."), ""]
    notes = ["", env["memory_note"]] if env["memory_note"] else []
    return "\n".join(head + sampling_table(results, s) + [""] + training_table(results, s, env) + [""]
                     + scoring_table(results, s) + notes)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"CPU {name}"


def main():
    s = parse_args()
    device = torch.device(s.device)
    if transformers is None:
        print("transformers is not installed (pip install -r requirements-dev.txt): measuring ours only")
    peak_flops, peak_how = matmul_peak(device, s.peak_n)
    _, was_reset = reset_peak_memory(device)
    env = dict(device=device_name(device), torch=torch.__version__,
               transformers=transformers.__version__ if transformers else None,
               threads=torch.get_num_threads(), peak_flops=peak_flops, peak_how=peak_how,
               memory_note=None if was_reset else "Peak RSS could not be reset: each is the process's peak so far.")
    sizes = [tuple(int(v) for v in size.split("x")) for size in s.sizes.split(",")]
    t0 = time.perf_counter()
    results = [bench_size(n_layer, n_embd, s, device, peak_flops) for n_layer, n_embd in sizes]
    env["total_sec"] = time.perf_counter() - t0
    print(markdown(results, s, env))
    text = json.dumps(dict(settings=asdict(s), env=env, results=results), indent=1)
    atomic_write(s.out, lambda tmp: Path(tmp).write_text(text))
    print(f"\n(wrote {s.out}; {env['total_sec']:.0f} s)")


if __name__ == "__main__":
    main()
