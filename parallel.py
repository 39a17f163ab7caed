"""
Processes and devices, which no method needs to know about: one process by default; under
torchrun, WORLD data-parallel ranks. Each rank trains on its own share of a batch and the
gradients are averaged (average_gradients); sampling and scoring split the rows and gather them
in order, so every rank holds the same results and rank 0 alone writes files and prints.

    sample(policy, prompts, n, cfg, eos_id, seed, desc)   n responses per prompt, prompt-major
    score(scorer, prompts, responses, cfg, eos_id)        a reward of each (prompt, response) pair
    autocast(cfg)                                         bf16 autocast on CUDA (a no-op on the CPU)
"""
import itertools
import os
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from tqdm import tqdm

from cli import die
from model import generate, score_pairs

WORLD, RANK = 1, 0


def setup_distributed(cfg):
    global WORLD, RANK
    if "RANK" not in os.environ:
        return
    cuda = cfg.device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    WORLD, RANK = dist.get_world_size(), dist.get_rank()
    if cuda:
        cfg.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(cfg.device)
    if cfg.batch_size % WORLD or cfg.batch_size < 2 * WORLD:
        die(f"--batch_size={cfg.batch_size} must be a multiple of the {WORLD} processes, at least 2 each")


def is_main():
    return RANK == 0


def log(msg):
    if is_main():
        print(msg, flush=True)


def progress(iterable, desc, total=None, initial=0):
    """A progress bar on a terminal; written to a file (not a terminal), a line every
    PROGRESS_EVERY seconds instead of a redraw per step."""
    if sys.stderr.isatty():
        return tqdm(iterable, desc=desc, total=total, initial=initial, leave=False, disable=not is_main())
    return ProgressLines(iterable, desc, total if total is not None else len(iterable), initial)


PROGRESS_EVERY = 60.0  # seconds between two progress lines in a log file


class ProgressLines:
    """tqdm's interface (iterate, set_postfix) for a log file: "[desc] 120/400 (30%), loss=0.812, 61 s"."""

    def __init__(self, iterable, desc, total, initial):
        self.iterable, self.desc, self.total, self.done, self.postfix = iterable, desc, total, initial, {}

    def set_postfix(self, **values):
        self.postfix = values

    def __iter__(self):
        start = last = time.time()
        for item in self.iterable:
            yield item
            self.done += 1
            if time.time() - last >= PROGRESS_EVERY and is_main():
                last = time.time()
                figures = "".join(f", {k}={v}" for k, v in self.postfix.items())
                print(f"[{self.desc}] {self.done}/{self.total} ({100 * self.done / max(self.total, 1):.0f}%)"
                      f"{figures}, {last - start:.0f} s", file=sys.stderr, flush=True)



def average_gradients(model):
    """The mean of every rank's gradients, in place (what DistributedDataParallel does): after
    backward, every rank holds the gradient of the whole batch. Nothing to do in one process."""
    if WORLD == 1:
        return
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= WORLD

def shard(n):
    """This rank's contiguous slice [lo, hi) of n rows."""
    return n * RANK // WORLD, n * (RANK + 1) // WORLD


def gather_tensor(t):
    """Every rank's t concatenated along dim 0, in rank order (lengths may differ)."""
    if WORLD == 1:
        return t
    comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    size = torch.tensor([t.shape[0]], device=comm)
    sizes = [torch.zeros_like(size) for _ in range(WORLD)]
    dist.all_gather(sizes, size)
    padded = t.new_zeros((max(int(s) for s in sizes), *t.shape[1:]), device=comm)
    padded[:t.shape[0]] = t
    parts = [torch.zeros_like(padded) for _ in range(WORLD)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:int(s)] for p, s in zip(parts, sizes)]).to(t.device)


def gather_rows(rows):
    """Every rank's list of token lists, concatenated in rank order."""
    lengths = gather_tensor(torch.tensor([len(r) for r in rows], dtype=torch.long)).tolist()
    flat = gather_tensor(torch.tensor([t for r in rows for t in r], dtype=torch.long)).tolist()
    ends = list(itertools.accumulate(lengths))
    return [flat[end - n:end] for n, end in zip(lengths, ends)]


def all_finite(loss):
    """Whether the loss is finite on every rank (so that all ranks stop together)."""
    ok = torch.isfinite(loss.detach()).float().reshape(1)
    if WORLD > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())



def autocast(cfg):
    """bf16 autocast on CUDA with --bf16 (the forward passes of training, sampling and scoring)."""
    if cfg.device.startswith("cuda") and cfg.bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def sample(policy, prompts, n, cfg, eos_id, seed, desc, temperature=None):
    """n responses (token lists, ending with eos_id if they ended) per prompt, prompt-major, at
    --temperature unless another is given."""
    lo, hi = shard(len(prompts))
    gen = torch.Generator(cfg.device).manual_seed(seed + 1_000_003 * RANK)
    per_call = max(1, cfg.sample_rows // n)
    out = []
    for i in progress(range(lo, hi, per_call), desc=desc):
        with autocast(cfg):
            tokens, lengths = generate(policy, prompts[i:min(i + per_call, hi)], n, cfg.max_new_tokens,
                                       eos_id, cfg.temperature if temperature is None else temperature,
                                       cfg.top_k or None, gen)
        out += [row[:k] for row, k in zip(tokens.tolist(), lengths.tolist())]
    return gather_rows(out)


def score(scorer, prompts, responses, cfg, eos_id, batch=256):
    """Reward of each (prompt, response) pair: (B,) float tensor on the CPU, by model.score_pairs:
    equal pairs scored once, each prompt run once for a group of its responses, batches of similar
    lengths. The same scores as on data.make_batch's full sequences, to float tolerance."""
    lo, hi = shard(len(prompts))
    with autocast(cfg):
        return gather_tensor(score_pairs(scorer, prompts[lo:hi], responses[lo:hi], eos_id, cfg.device, batch))


def score_kinds(scorer, prompts, responses, cfg, eos_id):
    """score of several kinds of response to the same prompts ({kind: one response per prompt}) in
    one call: a prompt runs once for all its kinds, and equal responses (a demonstration that an
    SFT sample repeats) get equal scores, a tie. Returns {kind: (P,)}."""
    flat_prompts = [p for p in prompts for _ in responses]  # prompt-major
    flat_responses = [r for row in zip(*responses.values()) for r in row]
    scores = score(scorer, flat_prompts, flat_responses, cfg, eos_id).view(len(prompts), len(responses))
    return {kind: scores[:, k] for k, kind in enumerate(responses)}

