"""
The pipeline's plumbing: its stages, checkpoints and resuming, data parallelism, the command
line, and the results. The methods themselves are in afd.py, the reward models in reward.py.

    python train.py                         # preset `cpu` (or `gpu` when CUDA is there)
    python train.py --preset=smoke          # the whole pipeline in seconds (the tests use it)
    python train.py --seed=1 --bon_n=16     # any Config field: --field=value or --field value
    python train.py --help                  # every field, its default and what it does
    python train.py --task=hh --data_dir=DIR --init_from=gpt2   # HH-RLHF from pre-trained GPT-2
    torchrun --standalone --nproc_per_node=2 train.py   # data-parallel on 2 GPUs (or CPU processes)

Stages, in main(): task (the built-in task or HH-RLHF, and its vocabulary), pretrain (pi_init),
sft (pi_sft), sample (pi_init's and pi_sft's responses for the reward models), rm (the gold
reward model on real data, then those of reward.py), policy (the trained methods of afd.py),
evaluate (golden reward, win rate and KL of every policy; Best-of-n with every reward model).
Outputs in --out_dir: a <name>.pt and <name>.curve.jsonl per trained model, samples.pt,
results.json, report.md and golden_vs_kl.png (report.py).

A rerun with the same --out_dir loads every result made with the same config (STAGE_FIELDS)
and redoes the rest; an interrupted training run restarts from its <name>.resume.pt. Batches
are a function of (seed, label, step, rank), so a resumed run equals an uninterrupted one.
"""
import argparse
import ast
import difflib
import hashlib
import itertools
import json
import math
import os
import random
import sys
import time
import zlib
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import asdict, dataclass, field, fields, replace
from functools import lru_cache
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import afd
import data
from report import curve_summary, markdown_tables, write_report, write_text
from model import (GPT, GPTConfig, WriteError, atomic_write, configure_optimizer, frozen_copy, generate, memory_bytes,
                   num_params, score_pairs, trainable_copy)
from reward import (AVA, RM_NAMES, AVARewardModel, ExpectedReturn, LogRatioReward, RewardModel, ava_d_loss,
                    ava_p_loss, heldout_accuracies, pairwise_accuracy, pairwise_loss)


def opt(default, help):
    """A Config field and the line `python train.py --help` prints for it."""
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    preset: str = opt("cpu", "named defaults: smoke | cpu | gpu | gpu-hh (default: gpu with CUDA, else cpu)")
    out_dir: str = opt("out", "folder of the checkpoints and results; a rerun there resumes")
    seed: int = opt(0, "seed of the task, the batches and the samples")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N | mps")
    ckpt_every: int = opt(100, "training steps between resumable checkpoints")
    task: str = opt("synthetic", "synthetic (the built-in task) | hh (Anthropic HH-RLHF from --data_dir)")
    demos: str = opt("", "a JSON-lines file of {\"prompt\", \"response\"}: replaces the demonstrations")
    data_dir: str = opt("", "--task=hh: the folder holding harmless-base/ and helpful-base/")
    subset: str = opt("harmless", "--task=hh: harmless | helpful | both")
    skip_bad_lines: bool = opt(False, "--task=hh: skip and count malformed lines instead of stopping")
    drop_leaks: bool = opt(False, "drop (and count) training prompts that are also held-out or evaluation "
                                  "prompts, instead of stopping")
    init_from: str = opt("", "pi_init: '' = pre-train from scratch; gpt2 | gpt2-medium | ... | PATH/model.safetensors")
    n_pretrain: int = opt(6000, "pre-training dialogues")
    n_demo: int = opt(1500, "demonstrations (prompts of the SFT data and of the policy methods)")
    n_rm: int = opt(600, "preference pairs (pref, ava_p); also the demonstration prompts the tailored RMs sample")
    n_heldout: int = opt(200, "held-out prompts of the reward-model accuracies")
    n_eval: int = opt(300, "evaluation prompts")
    n_gold: int = opt(2000, "--task=hh: preference pairs of the gold reward model (no other model sees them)")
    multi_turn_prob: float = opt(0.3, "probability that a built-in prompt has an earlier turn")
    pref_noise_temp: float = opt(1.0, "Bradley-Terry temperature of the built-in preference labels (> 0)")
    n_layer: int = opt(4, "transformer blocks (the policy and every reward model share the model)")
    n_head: int = opt(4, "attention heads")
    n_embd: int = opt(128, "width of the residual stream")
    block_size: int = opt(128, "context length in tokens")
    dropout: float = opt(0.0, "dropout probability, in [0, 1)")
    batch_size: int = opt(32, "the global batch: split across processes under torchrun")
    weight_decay: float = opt(0.1, "AdamW weight decay of the matrices and embeddings")
    grad_clip: float = opt(1.0, "gradient-norm clipping")
    warmup_steps: int = opt(20, "steps of linear learning-rate warm-up")
    pretrain_steps: int = opt(900, "pre-training steps of pi_init")
    pretrain_lr: float = opt(2e-3, "pre-training learning rate")
    bf16: bool = opt(True, "bf16 autocast (CUDA only)")
    sft_steps: int = opt(40, "SFT steps")
    sft_lr: float = opt(5e-4, "SFT learning rate")
    temperature: float = opt(1.0, "sampling temperature (0 = greedy)")
    top_k: int = opt(0, "sample among the top k tokens only (0 = all), except in policy steps")
    max_new_tokens: int = opt(48, "longest sampled response")
    n_rm_samples: int = opt(2, "samples of pi_init and of pi_sft per tailored reward-model prompt")
    sample_rows: int = opt(1024, "rows decoded at once")
    rm_steps: int = opt(100, "training steps of each reward model")
    rm_lr: float = opt(3e-4, "reward-model learning rate (also the iterated-IRL reward steps)")
    ava_lambda: float = opt(1.0, "AVA: weight of the Bellman-consistency term (AVRIL: 1)")
    ava_gamma: float = opt(1.0, "AVA: discount in the TD difference, in [0, 1] (AVRIL's code: 1)")
    ava_alpha: float = opt(1.0, "AVA: temperature alpha of the Q-values, Q = log softmax(alpha * logits) (Eq. 12)")
    ava_beta: float = opt(1.0, "AVA: weight beta of the policy likelihood (Eq. 13); ava_d_direct needs alpha*beta = 1")
    pg_steps: int = opt(60, "optimiser steps of each trained method (irl, irft: over all rounds)")
    pg_lr: float = opt(2e-4, "policy learning rate of the trained methods")
    pg_prompts: int = opt(8, "prompts per policy-gradient step")
    pg_group: int = opt(8, "K samples per prompt, the RLOO group (at least 2)")
    pg_shared_prompts: bool = opt(False, "policy steps run each prompt once for its K samples: faster, "
                                         "equal to float tolerance, not bit for bit (README: Performance)")
    beta_kl: float = opt(0.2, "per-token KL penalty to the reference policy")
    disc_lr: float = opt(3e-4, "afd_adversarial: the discriminator's learning rate")
    irl_rounds: int = opt(3, "irl_iterated: rounds of {sample, reward steps, policy steps}")
    irl_rm_steps: int = opt(40, "irl_iterated: Bradley-Terry steps per round (a fresh reward model each round)")
    irl_temperature: float = opt(0.01, "irl_iterated: temperature of the round's own samples (released code: 0.01)")
    irft_stages: int = opt(2, "irft: stages, each against the frozen model it starts from")
    irft_beta: float = opt(0.5, "irft: beta of the implicit reward beta log(pi / pi_t)")
    n_round_samples: int = opt(256, "demonstration prompts sampled per IRL round / IRFT stage")
    bon_n: int = opt(32, "N: Best-of-N candidates per evaluation prompt")
    methods: str = opt("bon,afd_adversarial,irl_iterated,irft,rl_init_sft,rl_ava_d,ava_d_direct",
                       "what to run, comma-separated: bon (Best-of-N) and the trained methods")
    gold_rm_steps: int = opt(600, "--task=hh: Bradley-Terry steps of the gold reward model")
    gold_init_from: str = opt("", "--task=hh: the gold RM's trunk ('' = pi_init; e.g. gpt2-medium)")


PRESETS = {
    "smoke": dict(n_pretrain=300, n_demo=100, n_rm=40, n_heldout=20, n_eval=24, n_layer=2,
                  n_head=2, n_embd=32, batch_size=16, pretrain_steps=30, sft_steps=15,
                  rm_steps=10, bon_n=8, max_new_tokens=32, warmup_steps=5, ckpt_every=10,
                  pg_steps=6, pg_prompts=4, pg_group=4, irl_rounds=2, irl_rm_steps=4, n_round_samples=16,
                  n_gold=40, gold_rm_steps=10),
    "cpu": dict(),
    "gpu": dict(n_pretrain=20000, n_demo=4000, n_rm=2000, n_heldout=500, n_eval=1000,
                n_layer=6, n_head=6, n_embd=384, batch_size=64, pretrain_steps=3000,
                pretrain_lr=1e-3, sft_steps=600, sft_lr=3e-4, rm_steps=400, rm_lr=1e-4,
                sample_rows=8192, ckpt_every=500),
    # the paper's setting at GPT-2 scale on one GPU: HH-RLHF (--data_dir=DIR), pi_init = GPT-2
    # small, a GPT-2 medium gold reward model; see the README for the time budget
    "gpu-hh": dict(task="hh", subset="both", init_from="gpt2", gold_init_from="gpt2-medium",
                   n_layer=12, n_head=12, n_embd=768, block_size=512, n_pretrain=20000, n_gold=20000,
                   n_demo=20000, n_rm=10000, n_heldout=500, n_eval=1000, batch_size=32,
                   warmup_steps=50, sft_steps=2000, sft_lr=5e-5, rm_steps=600, rm_lr=1e-5,
                   gold_rm_steps=1500, max_new_tokens=64, bon_n=16, sample_rows=2048,
                   pg_steps=200, pg_lr=5e-6, n_round_samples=2048, ckpt_every=200),
}
BON_SIZES = [1, 2, 4, 8, 16, 32, 64, 128]

# What each stage's result depends on. A stage also depends on every stage before it, so a
# changed field redoes its stage and everything downstream. The fields of no stage (preset,
# out_dir, device, ckpt_every) do not change results. `--help` lists the fields by stage.
STAGE_FIELDS = {
    "task": ["seed", "task", "demos", "data_dir", "subset", "skip_bad_lines", "drop_leaks", "init_from", "n_pretrain",
             "n_demo", "n_rm", "n_heldout", "n_eval", "n_gold", "multi_turn_prob", "pref_noise_temp"],
    "pretrain": ["n_layer", "n_head", "n_embd", "block_size", "dropout", "batch_size",
                 "weight_decay", "grad_clip", "warmup_steps", "pretrain_steps", "pretrain_lr", "bf16"],
    "sft": ["sft_steps", "sft_lr"],
    "sample": ["temperature", "top_k", "max_new_tokens", "n_rm_samples", "sample_rows"],
    "rm": ["rm_steps", "rm_lr", "ava_lambda", "ava_gamma", "ava_alpha", "ava_beta"],
    "policy": ["pg_steps", "pg_lr", "pg_prompts", "pg_group", "pg_shared_prompts", "beta_kl", "disc_lr", "irl_rounds",
               "irl_rm_steps", "irl_temperature", "irft_stages", "irft_beta", "n_round_samples"],
    "evaluate": ["bon_n", "methods", "gold_rm_steps", "gold_init_from"],
}
STAGE_HELP = {"run": "the run (no effect on results)", "task": "1. the task", "pretrain": "2. pi_init: the model and its optimiser",
              "sft": "3. SFT", "sample": "4. sampling", "rm": "5. the reward models",
              "policy": "6. the trained methods (afd.py)", "evaluate": "7. evaluation"}
# The one name of each method: the --methods value, the results row, the checkpoint stem
# (policy_<name>*.pt); `bon` is the Best-of-N evaluation. rl_<rm>: RL on reward model <rm>.
METHODS = ["bon", "afd_adversarial", "irl_iterated", "irft", "rl_init_sft", "rl_ava_d", "ava_d_direct"]


def die(msg, status=2):
    """Stop with one line: status 2 for a bad input (as argparse), 1 for a failure of the machine."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(status)


# ----------------------------------------------------------------------------------------
# The command line: one option per Config field, grouped by the stage that uses it

def build_parser():
    parser = argparse.ArgumentParser(
        prog="train.py", usage="python train.py [--field=value ...]   (torchrun ... train.py ...)", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Alignment from demonstrations, end to end: pre-training, SFT, reward models,\n"
                    "the trained methods of afd.py, Best-of-N and the evaluation. Set any field\n"
                    "as --field=value or --field value; a preset sets several at once, and\n"
                    "explicit options override it.")
    parser.error = die  # one line and exit status 2, like every other input error
    groups = {stage: parser.add_argument_group(title) for stage, title in STAGE_HELP.items()}
    for f in fields(Config):
        changed = [f"{p} {d[f.name]}" for p, d in PRESETS.items() if f.name in d]
        default = "" if f.name == "preset" else f" (default {f.default!r}" + (
            f"; preset {', '.join(changed)}" if changed else "") + ")"
        stage = next((s for s, names in STAGE_FIELDS.items() if f.name in names), "run")
        groups[stage].add_argument(
            f"--{f.name}", default=argparse.SUPPRESS, metavar=f.type.__name__.upper(),
            **(dict(nargs="?", const="true") if f.type is bool else {}),
            help=f"{f.metadata['help']}{default}".replace("%", "%%"))
    return parser


def parse_args(argv):
    """Config from --preset, then the explicit --field=value options, every value validated."""
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        arg = unknown[0]
        if not arg.startswith("--"):
            die(f"unexpected argument {arg!r}: options are --field=value (python train.py --help)")
        key = arg[2:].split("=", 1)[0]
        close = difflib.get_close_matches(key, [f.name for f in fields(Config)], n=1)
        die(f"unknown option --{key}" + (f"; did you mean --{close[0]}?" if close else "")
            + " (python train.py --help lists them)")
    given = vars(args)
    preset = given.get("preset", "gpu" if torch.cuda.is_available() else "cpu")
    if preset not in PRESETS:
        die(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = Config(preset=preset, **PRESETS[preset])
    types = {f.name: f.type for f in fields(Config)}
    for key, value in given.items():
        setattr(cfg, key, convert(key, value, types[key]))
    validate(cfg)
    return cfg


def convert(key, value, typ):
    try:
        if typ is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return value.lower() in ("true", "1")
        return typ(value)
    except ValueError:
        die(f"--{key}={value!r} is not a valid {typ.__name__}")


# the value each float field must have: (test, what to say)
FLOAT_RANGES = {
    "multi_turn_prob": (lambda v: 0 <= v <= 1, "a probability, in [0, 1]"),
    "pref_noise_temp": (lambda v: v > 0, "positive"),
    "dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "weight_decay": (lambda v: v >= 0, "at least 0"),
    "grad_clip": (lambda v: v > 0, "positive"),
    "temperature": (lambda v: v >= 0, "at least 0 (0 = greedy)"),
    "irl_temperature": (lambda v: v >= 0, "at least 0 (0 = greedy)"),
    "ava_lambda": (lambda v: v >= 0, "at least 0"),
    "ava_gamma": (lambda v: 0 <= v <= 1, "a discount, in [0, 1]"),
    "ava_alpha": (lambda v: v > 0, "positive"),
    "ava_beta": (lambda v: v > 0, "positive"),
    "beta_kl": (lambda v: v >= 0, "at least 0"),
    "irft_beta": (lambda v: v > 0, "positive"),
    **{lr: (lambda v: v > 0, "a positive learning rate")
       for lr in ("pretrain_lr", "sft_lr", "rm_lr", "pg_lr", "disc_lr")},
}
CHOICES = {"task": ("synthetic", "hh"), "subset": ("harmless", "helpful", "both")}


def validate(cfg):
    """Every value checked before any work starts; a bad one stops with one line."""
    for f in fields(Config):
        value = getattr(cfg, f.name)
        if f.type is int and f.name not in ("seed", "top_k") and value < 1:
            die(f"--{f.name}={value} must be at least 1")
        if f.type is float and not (math.isfinite(value) and FLOAT_RANGES[f.name][0](value)):
            die(f"--{f.name}={value} must be {FLOAT_RANGES[f.name][1]}")
        if f.name in CHOICES and value not in CHOICES[f.name]:
            die(f"--{f.name}={value!r}: choose one of {', '.join(CHOICES[f.name])}")
    if abs(cfg.seed) >= 2**62:
        die(f"--seed={cfg.seed} is too large: pick one below 2**62")
    if cfg.batch_size < 2:
        die(f"--batch_size={cfg.batch_size} must be at least 2 (a reward model's batch is half positives, "
            f"half negatives)")
    if cfg.top_k < 0:
        die(f"--top_k={cfg.top_k} must be at least 0 (0 = no top-k filter)")
    if cfg.n_embd % cfg.n_head:
        die(f"--n_embd={cfg.n_embd} must be a multiple of --n_head={cfg.n_head}")
    if cfg.max_new_tokens >= cfg.block_size:
        die(f"--max_new_tokens={cfg.max_new_tokens} leaves no room for a prompt in --block_size={cfg.block_size}; "
            f"lower max_new_tokens or raise block_size")
    if cfg.pg_group < 2:
        die(f"--pg_group={cfg.pg_group} must be at least 2 (RLOO needs a group)")
    unknown = [m for m in methods_of(cfg) if m not in METHODS]
    if unknown:
        close = difflib.get_close_matches(unknown[0], METHODS, n=1)
        die(f"--methods: unknown {unknown[0]!r}" + (f" (did you mean {close[0]}?)" if close else "")
            + f"; choose from {','.join(METHODS)}")
    if "ava_d_direct" in methods_of(cfg) and abs(cfg.ava_alpha * cfg.ava_beta - 1) > 1e-9:
        die(f"--methods=ava_d_direct samples its Boltzmann policy softmax(beta * Q) as the GPT itself, which needs "
            f"--ava_alpha x --ava_beta = 1 (here {cfg.ava_alpha} x {cfg.ava_beta}); change one, or drop ava_d_direct")
    if cfg.task == "hh" and not cfg.data_dir:
        die("--task=hh needs --data_dir=DIR, the folder holding harmless-base/ and helpful-base/ "
            "(see the README: getting HH-RLHF)")
    if cfg.gold_init_from and not cfg.init_from:
        die("--gold_init_from loads GPT-2 weights, which need GPT-2's vocabulary: set --init_from too")
    cfg.device = checked_device(cfg.device)


def checked_device(device):
    """auto -> cuda or cpu; any other device must exist here."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and (kind != "cuda" or not index.isdigit())):
        die(f"--device={device!r}: choose auto, cpu, cuda, cuda:N or mps")
    if kind == "cuda" and not torch.cuda.is_available():
        die(f"--device={device} but no CUDA GPU is visible; use --device=cpu")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        die(f"--device={device}: there are {torch.cuda.device_count()} CUDA devices; use cuda:0..")
    if kind == "mps" and not torch.backends.mps.is_available():
        die("--device=mps but the Apple-silicon GPU is not available here; use --device=cpu")
    return device


def methods_of(cfg):
    return [m for m in cfg.methods.split(",") if m]


# ----------------------------------------------------------------------------------------
# Processes: one by default; under torchrun, WORLD data-parallel ranks. Training runs
# DistributedDataParallel; sampling and scoring split the rows and gather them in order,
# so every rank holds the same results and rank 0 alone writes files.

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


def data_parallel(model):
    """The model wrapped for data-parallel training when there are several processes."""
    return DistributedDataParallel(model) if WORLD > 1 else model


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


# ----------------------------------------------------------------------------------------
# Code is part of a stage's stamp: a hash of the source of every function, class and
# module-level constant of the project that the stage's function reaches by name, however
# indirectly (its closure in the call graph, read from the source with `ast`). Edit a loss
# and the stages that call it are redone, with everything downstream; the others are loaded.

CODE_FILES = ("model", "data", "reward", "afd", "train")   # the project's modules (report.py never changes a result)
STAGE_CODE = {"task": ["train.stage_task"], "pretrain": ["train.stage_pretrain"], "sft": ["train.stage_sft"],
              "sample": ["train.stage_sample"], "rm": ["train.stage_gold", "train.stage_reward_models"],
              "policy": ["train.stage_policies"], "evaluate": ["train.stage_evaluate"]}
# they print or time; no result depends on them
OUTPUT_ONLY = {"train.log", "train.die", "train.progress", "train.not_finite", "train.timed"}
# Within a stage, each reward model and each method is stamped with its own code only (the
# others' entry points are left out), so that an edited IRFT loss retrains IRFT, not the rest.
UNIT_CODE = {"rm": {"init_sft": "afd.discriminator_batch_loss", "init_demo": "afd.discriminator_batch_loss",
                    "sft_demo": "afd.discriminator_batch_loss", "pref": "reward.pairwise_loss",
                    "ava_d": "reward.ava_d_loss", "ava_p": "reward.ava_p_loss"},
             "policy": {"afd_adversarial": "afd.afd_adversarial", "irl_iterated": "afd.irl_iterated",
                        "irft": "afd.irft", "rl_init_sft": "afd.rl_on_reward", "rl_ava_d": "afd.rl_on_reward",
                        "ava_d_direct": "afd.ava_d_direct"}}


@lru_cache(maxsize=None)
def module_names(folder, module):
    """A module's top-level names: {name: (its source, the names it refers to)}, with what its
    imports bind: {alias: (module, name)} (name None for `import module`)."""
    source = Path(folder, f"{module}.py").read_text()
    names, imports = {}, {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Import):
            imports.update({a.asname or a.name: (a.name, None) for a in node.names if a.name in CODE_FILES})
        elif isinstance(node, ast.ImportFrom) and node.module in CODE_FILES:
            imports.update({a.asname or a.name: (node.module, a.name) for a in node.names})
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign)):
            assigned = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            targets = ([node.name] if hasattr(node, "name") else
                       [t.id for a in assigned for t in ast.walk(a) if isinstance(t, ast.Name)])
            refs = [(n.value.id, n.attr) if isinstance(n, ast.Attribute) else (n.id, None)
                    for n in ast.walk(node) if isinstance(n, ast.Name) or
                    (isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name))]
            names.update({t: (ast.get_source_segment(source, node), refs) for t in targets})
    return names, imports


@lru_cache(maxsize=None)
def code_versions(roots, skip=frozenset(), folder=os.path.dirname(os.path.abspath(__file__))):
    """{"module.name": hash of its source} for roots ("module.name", ...) and every top-level
    name of the project they refer to, transitively, except the names in skip."""
    out, todo = {}, list(roots)
    while todo:
        module, name = todo.pop().split(".", 1)
        key = f"{module}.{name}"
        names, imports = module_names(folder, module)
        if key in out or key in OUTPUT_ONLY or key in skip or name not in names:
            continue
        source, refs = names[name]
        out[key] = hashlib.sha256(source.encode()).hexdigest()[:12]
        for ref, attr in refs:
            if ref in names:
                todo.append(f"{module}.{ref}")
            elif ref in imports:
                target_module, target = imports[ref]
                if target or attr:
                    todo.append(f"{target_module}.{target or attr}")
    return dict(sorted(out.items()))


def changes(saved, current):
    """In a few words, why a saved stage config is not the current one."""
    if "code" not in saved:
        return "the code changed"
    code = [k for k in current.get("code", {}) if saved["code"].get(k) != current["code"][k]]
    fields = [f"{k} {saved.get(k)!r} -> {current.get(k)!r}" for k in dict.fromkeys([*current, *saved])
              if k != "code" and saved.get(k) != current.get(k)]
    said = fields + ([", ".join(code[:3]) + (f" and {len(code) - 3} more" if len(code) > 3 else "") + " changed"]
                     if code else [])
    return "; ".join(said) or "the code changed"


# ----------------------------------------------------------------------------------------
# Checkpoints: written atomically by rank 0 (model.atomic_write), loaded with
# weights_only=True, each holding the stage config it was made with.

def save_atomic(obj, path):
    if is_main():
        atomic_write(path, lambda tmp: torch.save(obj, tmp))
    if WORLD > 1:
        dist.barrier()


def load_checkpoint(path):
    """A checkpoint's dict, unpickled safely (tensors and plain data only, never code)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything else with an UnpicklingError
        die(f"{path} is not a safe checkpoint of this project ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:120]}); delete it, or use another --out_dir")
    if not isinstance(state, dict):
        die(f"{path} holds a {type(state).__name__}, not a checkpoint of this project; delete it, or use another --out_dir")
    return state


def stage_config(cfg, stage, unit=None):
    """The config a stage's result depends on: its fields and those of every stage before it,
    and the source of the code they run (code_versions); of one unit of the stage (a reward
    model, a method: UNIT_CODE) if given."""
    names = list(STAGE_FIELDS)
    out = {"processes": WORLD}
    for s in names[:names.index(stage) + 1]:
        out.update({k: getattr(cfg, k) for k in STAGE_FIELDS[s]})
    if cfg.demos:
        out["demos_crc32"] = file_crc32(cfg.demos)
    others = frozenset(UNIT_CODE[stage].values()) - {UNIT_CODE[stage][unit]} if unit else frozenset()
    out["code"] = code_versions(tuple(root for s in names[:names.index(stage) + 1] for root in STAGE_CODE[s]), others)
    if unit:
        out["unit"] = unit
    return out


@lru_cache(maxsize=None)
def file_crc32(path):
    """A file's CRC-32, read once per run (it stamps every stage made from the file)."""
    with open(path, "rb") as f:
        return zlib.crc32(f.read())


def saved_result(path, stage_cfg, what):
    """The checkpoint at path if it was made with stage_cfg (then the stage is skipped), else None."""
    if not os.path.exists(path):
        return None
    state = load_checkpoint(path)
    if state.get("stage_config") != stage_cfg:
        log(f"[{what}] {changes(state.get('stage_config', {}), stage_cfg)} since {path}: redoing it")
        return None
    return state


def model_config(cfg, vocab):
    return GPTConfig(block_size=cfg.block_size, vocab_size=len(vocab), n_layer=cfg.n_layer,
                     n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout)


def save_model(path, model, vocab, stage_cfg, **extra):
    save_atomic({"model": model.state_dict(), "model_config": asdict(model.config),
                 "vocab": vocab.ids, "stage_config": stage_cfg, **extra}, path)


def load_weights(model, state, path, vocab):
    """Load a checkpoint into model, with a clear error if it was made for another model."""
    if state.get("model_config") != asdict(model.config) or state.get("vocab") != vocab.ids:
        die(f"{path} was made for another model config or vocabulary "
            f"({state.get('model_config')} vs {asdict(model.config)}); "
            f"delete it, or use another --out_dir")
    broken = [k for k, t in state["model"].items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if broken:
        die(f"{path} holds NaN or infinite weights ({broken[0]}); delete it and run again")
    model.load_state_dict(state["model"])


def restore(model, path, stage_cfg, vocab, what):
    """Load model from path if that result is up to date; returns its saved state, or None."""
    state = saved_result(path, stage_cfg, what)
    if state is not None:
        load_weights(model, state, path, vocab)
        model.eval()
    return state


STAGE_LINES = []  # what this run did, one line per result: trained / sampled / loaded, and its end figures


def said(what, line):
    """Log a stage line ("[pi_sft] trained 400 steps ...") and keep it for report.md."""
    STAGE_LINES.append(f"{what}: {line}")
    log(f"[{what}] {line}")


STAGE_TIMES = {}  # wall time (s) of each stage ("rm") and of its parts ("rm/pref"), in the order they started


@contextmanager
def timed(name):
    """Adds the wall time of a `with timed(name):` block (or of each call of a function decorated
    with @timed(name)) to STAGE_TIMES[name]; results.json keeps them, report.md tabulates them."""
    STAGE_TIMES.setdefault(name, 0.0)
    start = time.perf_counter()
    try:
        yield
    finally:
        STAGE_TIMES[name] += time.perf_counter() - start


# ----------------------------------------------------------------------------------------
# Training

def autocast(cfg):
    if cfg.device.startswith("cuda") and cfg.bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def stable_seed(*parts):
    return zlib.crc32("/".join(map(str, parts)).encode())


def fit(model, loss_of_batch, batch_at, steps, lr, cfg, vocab, name, stage_cfg, aux=None):
    """AdamW on loss_of_batch(model, batch_at(step)) for `steps` steps; returns the curve: one
    record per step, {"step", "loss", ...} with whatever stats loss_of_batch returns beside its
    loss (it returns a loss, or (loss, stats)). aux is an optional (module, optimizer) that
    loss_of_batch steps itself (the adversarial discriminator): it is checkpointed too.
    Resumable: every cfg.ckpt_every steps the model, optimizer, step, curve and RNG state go
    to <out_dir>/<name>.resume.pt, and a later call with the same stage config continues from
    there; batch_at is a function of the step, so a resumed run equals an uninterrupted one.
    A non-finite loss stops the run; the last good checkpoint is kept.
    """
    path = os.path.join(cfg.out_dir, f"{name}.resume.pt")
    opt = configure_optimizer(model, lr, cfg.weight_decay)
    torch.manual_seed(stable_seed(cfg.seed, name, RANK))  # dropout
    start, curve = 0, []
    if os.path.exists(path):
        state = load_checkpoint(path)
        if state.get("stage_config") == stage_cfg:
            load_weights(model, state, path, vocab)
            opt.load_state_dict(state["optimizer"])
            if aux is not None:
                aux[0].load_state_dict(state["aux_model"])
                aux[1].load_state_dict(state["aux_optimizer"])
            start, curve = state["step"], state["curve"]
            torch.set_rng_state(state["rng"])
            log(f"[{name}] resuming from step {start} of {steps} ({path})")
        else:
            log(f"[{name}] {changes(state.get('stage_config', {}), stage_cfg)} since {path}: starting over")
    train_model = data_parallel(model)
    model.train()
    for step in (bar := progress(range(start, steps), initial=start, total=steps, desc=name)):
        # learning rate: a linear warm-up over the first warmup_steps steps, times a cosine
        # decay from lr to lr / 10 over the whole run (nanoGPT's schedule, floor at a tenth)
        warm = min(1.0, (step + 1) / cfg.warmup_steps)
        for group in opt.param_groups:
            group["lr"] = lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        with autocast(cfg):
            out = loss_of_batch(train_model, batch_at(step))
        loss, stats = out if isinstance(out, tuple) else (out, {})
        if not all_finite(loss):
            die(not_finite(name, "loss", loss, step, start, model, path))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if not all_finite(grad_norm):  # stop before the step would write NaN into the weights
            die(not_finite(name, "gradient norm", grad_norm, step, start, model, path))
        opt.step()
        curve.append({"step": step, "loss": loss.item(), **stats})
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % cfg.ckpt_every == 0 and step + 1 < steps:
            extra = {} if aux is None else {"aux_model": aux[0].state_dict(), "aux_optimizer": aux[1].state_dict()}
            save_model(path, model, vocab, stage_cfg, optimizer=opt.state_dict(), step=step + 1,
                       curve=curve, rng=torch.get_rng_state(), **extra)
    model.eval()
    return curve


LR_OPTION = {"pi_init": "--pretrain_lr", "pi_sft": "--sft_lr", "rm": "--rm_lr", "policy": "--pg_lr"}


def not_finite(name, what, value, step, start, model, path):
    """The one line that says why training `name` stopped on a NaN or infinite value, and what to
    change: the weights it started from, or its learning rate (a loss that diverged)."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    kept = f"; the last good checkpoint is {path}" if os.path.exists(path) else ""
    if bad:  # only the weights it was loaded with can be (the step stops before an update makes them)
        return (f"{name}: the weights it starts from hold NaN or infinite values ({bad[0]}); "
                f"they come from --init_from or a checkpoint in --out_dir: use other weights{kept}")
    if step == start == 0:
        return (f"{name}: the {what} is {value.item()} on the first batch, before any update: the data "
                f"or the starting weights give it, not the learning rate")
    option = LR_OPTION.get(name.split("_")[0], LR_OPTION.get(name))
    return (f"{name}: the {what} became {value.item()} at step {step}; training diverged: lower "
            f"{option or 'the learning rate'} (or --grad_clip){kept}")


def train_and_save(model, name, loss_of_batch, batch_at, steps, lr, cfg, vocab, stage_cfg, aux=None):
    """fit, then save <name>.curve.jsonl and <name>.pt (with its stage config), in that order:
    <name>.pt is the result, and whatever sits beside an up-to-date one is whole (tidy_result).
    Returns the curve."""
    curve = fit(model, loss_of_batch, batch_at, steps, lr, cfg, vocab, name, stage_cfg, aux)
    write_curve(curve, cfg, name)
    save_model(os.path.join(cfg.out_dir, f"{name}.pt"), model, vocab, stage_cfg, curve=curve)
    tidy_result(curve, cfg, name)
    return curve


def write_curve(curve, cfg, name):
    """<name>.curve.jsonl, one JSON record a step, unless it already holds exactly that."""
    path, text = os.path.join(cfg.out_dir, f"{name}.curve.jsonl"), "".join(json.dumps(r) + "\n" for r in curve)
    if is_main() and not (os.path.isfile(path) and Path(path).read_text() == text):
        write_text(text, path)


def tidy_result(curve, cfg, name):
    """What sits beside an up-to-date <name>.pt, made whole whether or not an earlier run was
    stopped half-way: its curve file rewritten if missing or not its own, the resume checkpoint
    it no longer needs removed."""
    write_curve(curve, cfg, name)
    resume = os.path.join(cfg.out_dir, f"{name}.resume.pt")
    if is_main() and os.path.exists(resume):
        os.remove(resume)


class Run:
    """The plumbing a method of afd.py is handed (afd.py lists what it calls): checkpointed,
    resumable training runs, sampling split across processes, and step-indexed batches. A
    `label` names a random stream, seeded by --seed and the label."""

    def __init__(self, cfg, vocab, splits, stage_cfg):
        self.cfg, self.vocab, self.demos, self.stage_cfg = cfg, vocab, splits["demos"], stage_cfg

    def train(self, model, name, loss_of_batch, batch_at, steps, lr, aux=None):
        """train_and_save as <name>.pt, or load <name>.pt if it is up to date; says which, with
        the run's first and last figures (report.curve_summary). Returns the curve."""
        stage_cfg = {**self.stage_cfg, "run": name}
        path = os.path.join(self.cfg.out_dir, f"{name}.pt")
        if (state := restore(model, path, stage_cfg, self.vocab, name)) is not None:
            curve, did = state["curve"], f"loaded {path} (up to date)"
            tidy_result(curve, self.cfg, name)
        else:
            curve = train_and_save(model, name, loss_of_batch, batch_at, steps, lr, self.cfg, self.vocab, stage_cfg, aux)
            did = f"trained {len(curve)} steps"
        said(name, f"{did}: {curve_summary(curve)}")
        return curve

    def demonstrations(self, label, part=0, parts=1):
        """n_round_samples demonstration prompts drawn without replacement, and their responses.
        With parts > 1, the part-th of `parts` disjoint slices of one random order of the
        demonstrations (each of min(n_round_samples, n_demo // parts) prompts)."""
        rng = random.Random(f"{self.cfg.seed}/{label}/prompts")
        size = min(self.cfg.n_round_samples, len(self.demos) // parts)
        indices = rng.sample(range(len(self.demos)), size * parts)[part * size:(part + 1) * size]
        return [self.demos[i][0] for i in indices], [self.demos[i][1] for i in indices]

    def sample(self, policy, prompts, label, temperature=None):
        """One response per prompt, at --temperature unless another is given."""
        cfg = self.cfg if temperature is None else replace(self.cfg, temperature=temperature)
        return sample(policy, prompts, 1, cfg, self.vocab, stable_seed(self.cfg.seed, label), f"sample {label}")

    def demonstration_batches(self, label):
        """batch_at(step) -> a batch of demonstrations (data.make_batch), grouped by length."""
        return batch_sampler(self.demos, self.cfg, self.vocab, label)

    def policy_batches(self, label):
        """batch_at(step) -> afd.PolicyBatch: pg_prompts demonstration prompts (this rank's share)."""
        cfg, demos = self.cfg, self.demos
        indices_at = row_sampler([range(len(demos))], max(1, cfg.pg_prompts // WORLD), cfg, label)

        def batch_at(step):
            indices = indices_at(step)  # of demonstrations; they also seed the step's samples
            generator = torch.Generator(cfg.device).manual_seed(stable_seed(cfg.seed, label, indices, RANK))
            return afd.PolicyBatch([demos[i][0] for i in indices], [demos[i][1] for i in indices],
                                   self.vocab.eot_id, generator)
        return batch_at

    def triple_batches(self, triples, label):
        """batch_at(step) -> triples_batch of half a batch of (prompt, better, worse) triples."""
        triples_at = row_sampler([triples], max(1, self.cfg.batch_size // WORLD // 2), self.cfg, label)
        return lambda step: triples_batch(triples_at(step), self.cfg, self.vocab)

    data_parallel = staticmethod(data_parallel)


# ----------------------------------------------------------------------------------------
# Batches: functions of (seed, label, step, rank)

def pairs_batch(pairs, cfg, vocab, **kw):
    """data.make_batch on a list of (prompt, response) token-list pairs."""
    return data.make_batch([p for p, _ in pairs], [r for _, r in pairs], vocab.eot_id, cfg.device, **kw)


def triples_batch(triples, cfg, vocab):
    """One batch of (prompt, better, worse) triples: the B better responses, then the B worse
    ones (chosen/rejected, demonstration/sample)."""
    return pairs_batch([(p, a) for p, a, _ in triples] + [(p, b) for p, _, b in triples], cfg, vocab)


def batch_sampler(rows, cfg, vocab, name, **kw):
    """batch_at(step): this rank's batch of (prompt, response) token lists at a step. Rows are
    drawn 8 batches at a time and grouped by length, so that a batch holds little padding."""
    size = cfg.batch_size // WORLD

    @lru_cache(maxsize=1)
    def group(g):
        rng = random.Random(f"{cfg.seed}/{name}/{g}/{RANK}")
        pool = sorted((rows[rng.randrange(len(rows))] for _ in range(8 * size)),
                      key=lambda row: len(row[0]) + len(row[1]))
        batches = [pool[i:i + size] for i in range(0, len(pool), size)]
        rng.shuffle(batches)
        return batches

    return lambda step: pairs_batch(group(step // 8)[step % 8], cfg, vocab, **kw)


def row_sampler(sources, size, cfg, name):
    """rows_at(step): this rank's rows at a step, `size` drawn at random (with replacement)
    from each list of `sources` in turn."""
    def rows_at(step):
        rng = random.Random(f"{cfg.seed}/{name}/{step}/{RANK}")
        return [rows[rng.randrange(len(rows))] for rows in sources for _ in range(size)]
    return rows_at


# ----------------------------------------------------------------------------------------
# Sampling and scoring (rows split across ranks, gathered in order)

def sample(policy, prompts, n, cfg, vocab, seed, desc):
    """n responses (token lists, ending with EOT if they ended) per prompt, prompt-major."""
    lo, hi = shard(len(prompts))
    gen = torch.Generator(cfg.device).manual_seed(seed + 1_000_003 * RANK)
    per_call = max(1, cfg.sample_rows // n)
    out = []
    for i in progress(range(lo, hi, per_call), desc=desc):
        with autocast(cfg):
            tokens, lengths = generate(policy, prompts[i:min(i + per_call, hi)], n, cfg.max_new_tokens,
                                       vocab.eot_id, cfg.temperature, cfg.top_k or None, gen)
        out += [row[:k] for row, k in zip(tokens.tolist(), lengths.tolist())]
    return gather_rows(out)


def score(scorer, prompts, responses, cfg, vocab, batch=256):
    """Reward of each (prompt, response) pair: (B,) float tensor on the CPU, by model.score_pairs:
    equal pairs scored once, each prompt run once for a group of its responses, batches of similar
    lengths. The same scores as on data.make_batch's full sequences, to float tolerance."""
    lo, hi = shard(len(prompts))
    with autocast(cfg):
        return gather_tensor(score_pairs(scorer, prompts[lo:hi], responses[lo:hi], vocab.eot_id, cfg.device, batch))


def score_kinds(scorer, prompts, responses, cfg, vocab):
    """score of several kinds of response to the same prompts ({kind: one response per prompt}) in
    one call: a prompt runs once for all its kinds, and equal responses (a demonstration that an
    SFT sample repeats) get equal scores, a tie. Returns {kind: (P,)}."""
    flat_prompts = [p for p in prompts for _ in responses]  # prompt-major
    flat_responses = [r for row in zip(*responses.values()) for r in row]
    scores = score(scorer, flat_prompts, flat_responses, cfg, vocab).view(len(prompts), len(responses))
    return {kind: scores[:, k] for k, kind in enumerate(responses)}


# ----------------------------------------------------------------------------------------
# The stages

@timed("task")
def stage_task(cfg):
    """The task's text, its vocabulary, and its splits as token lists."""
    sizes = (cfg.n_pretrain, cfg.n_demo, cfg.n_rm, cfg.n_heldout, cfg.n_eval)
    try:
        if cfg.task == "hh":
            task, notes = data.read_hh_task(cfg.data_dir, cfg.subset, cfg.skip_bad_lines, cfg.seed, *sizes, cfg.n_gold)
            log("\n".join(f"[task] {note}" for note in notes))
        else:
            task = data.build_task(cfg.seed, *sizes, cfg.multi_turn_prob, cfg.pref_noise_temp)
        demo_source = [f"demonstration {i + 1}" for i in range(len(task.demos))]
        if cfg.demos:
            task.demos, lines = data.read_demos(cfg.demos)
            demo_source = [f"{cfg.demos} line {k}" for k in lines]
        if cfg.task == "hh":  # real dialogues are long: shorten them to the context, and count
            counts = data.fit_to_context(task, cfg.block_size, cfg.max_new_tokens)
            log(f"[task] to fit --block_size={cfg.block_size}: {counts['prompts_truncated']} prompts lost "
                f"their earliest turns, {counts['responses_truncated']} responses were cut at the end")
        if leaks := data.leaked_prompts(task):  # no model may train on what it is graded on
            check_leaks(task, leaks, cfg)
        # a GPT-2 initialisation needs GPT-2's whole vocabulary; from scratch, the task's tokens do
        vocab = data.Vocab(range(50257)) if cfg.init_from else data.Vocab.from_texts(task.texts())
        splits = task.encoded(vocab.encode)
        data.check_context(splits, demo_source, cfg.block_size, cfg.max_new_tokens)
    except data.DataError as e:
        die(str(e))
    log(f"[task] {cfg.task}: {len(task.pretrain)} pre-training dialogues, {len(task.demos)} demonstrations"
        f"{' from ' + cfg.demos if cfg.demos else ''}, {len(task.rm_prompts)} RM / "
        f"{len(task.heldout)} held-out / {len(task.eval_prompts)} evaluation prompts; "
        f"vocabulary {len(vocab)} of 50257 GPT-2 tokens")
    return task, vocab, splits


def check_leaks(task, leaks, cfg):
    """Training prompts that are also held-out or evaluation prompts: stop with one line naming how
    many, where and an example, or with --drop_leaks drop them and say how many."""
    where = ", ".join(f"{len(prompts)} in the {split} split" for split, prompts in leaks.items())
    if not cfg.drop_leaks:
        example = next(iter(leaks.values()))[0]
        source = f" (--demos={cfg.demos})" if cfg.demos and "demonstrations" in leaks else ""
        die(f"{sum(map(len, leaks.values()))} training prompts are also held-out or evaluation prompts: {where}"
            f"{source}, e.g. {example[-60:]!r}; remove them from the training data, or rerun with "
            f"--drop_leaks=true to drop them")
    dropped = data.drop_leaked(task, leaks)
    log(f"[task] --drop_leaks: dropped " + ", ".join(f"{n} {split} rows" for split, n in dropped.items())
        + f" whose prompts are also held-out or evaluation prompts ({where})")


def check_memory(cfg, vocab, host_fix=None):
    """Stop with one line, before any work, if the run cannot fit in free memory: on the device,
    model.memory_bytes of the largest training batch (--batch_size, or --pg_prompts x --pg_group)
    and of the largest sampling call; on the host, the samples and Best-of-N candidates kept as
    token lists (--n_eval x --bon_n, --n_rm x --n_rm_samples). Every allocation that grows with an
    option is in one of these. host_fix: what to lower for the host's share, if the caller knows better
    (budget.py: its --factors multiply --n_rm_samples)."""
    per_rank = lambda n: max(1, n // WORLD)
    train_rows = max(cfg.batch_size // WORLD, per_rank(cfg.pg_prompts) * cfg.pg_group)
    calls = [(cfg.n_rm, cfg.n_rm_samples), (cfg.n_heldout, 2), (cfg.n_eval, cfg.bon_n), (cfg.n_eval, 1),
             (cfg.n_round_samples, 1), (per_rank(cfg.pg_prompts), cfg.pg_group)]  # (prompts, samples of each)
    sample_rows = max(min(prompts, max(1, cfg.sample_rows // n)) * n for prompts, n in calls)  # sample()'s calls
    model_need = 1.2 * max(memory_bytes(model_config(cfg, vocab), train_rows, sample_rows)) + 2**28  # margin
    kept = 2 * (cfg.n_eval * cfg.bon_n + 2 * cfg.n_rm * cfg.n_rm_samples)  # token lists, gathered: 2 copies
    host_need = kept * (40 * cfg.max_new_tokens + 1000)  # ~40 bytes a token in a list, ~1 kB a text beside
    model_fix = "lower --batch_size, --pg_prompts x --pg_group or --sample_rows"
    host_fix = host_fix or "lower --bon_n or --n_eval (Best-of-N candidates), or --n_rm_samples"
    if cfg.device.startswith("cuda"):
        needs = [(model_need, torch.cuda.mem_get_info(torch.device(cfg.device))[0], cfg.device, model_fix),
                 (host_need, available_host_memory(), "the host", host_fix)]
    else:  # the processes share the host
        needs = [((model_need + host_need) * int(os.environ.get("LOCAL_WORLD_SIZE", 1)), available_host_memory(),
                  cfg.device, host_fix if host_need > model_need else model_fix)]
    for need, free, where, fix in needs:
        if free is not None and need > free:
            die(f"preset {cfg.preset!r} with this config needs about {need / 2**30:.1f} GiB on {where} but "
                f"{free / 2**30:.1f} GiB is free; {fix}" + ("" if cfg.preset == "smoke" else
                                                    ", or use a smaller preset (--preset=cpu or smoke)"))


def available_host_memory():
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None  # not Linux: no check


def load_gpt2(name_or_path, cfg):
    """A GPT with pre-trained GPT-2 weights (model.GPT.from_gpt2), or a clear error."""
    if WORLD > 1 and not is_main():
        dist.barrier()  # rank 0 downloads first; the others then find the files in the cache
    try:
        model = GPT.from_gpt2(name_or_path).to(cfg.device)
    except (OSError, ValueError, RuntimeError) as e:
        die(f"--init_from={name_or_path}: {e}")
    if WORLD > 1 and is_main():
        dist.barrier()
    if model.config.block_size < cfg.block_size:
        die(f"--block_size={cfg.block_size} is longer than {name_or_path}'s context "
            f"({model.config.block_size}); lower --block_size")
    return model


@timed("pretrain")
def stage_pretrain(cfg, vocab, splits):
    if cfg.init_from:  # a pre-trained GPT-2 replaces pre-training
        pi_init = load_gpt2(cfg.init_from, cfg)
        log(f"[pretrain] pi_init = {cfg.init_from}: {num_params(pi_init) / 1e6:.1f}M params, no pre-training")
        return pi_init
    torch.manual_seed(cfg.seed)
    pi_init = GPT(model_config(cfg, vocab)).to(cfg.device)
    batch_at = batch_sampler(splits["pretrain"], cfg, vocab, "pretrain", loss_on_prompt=True)
    log(f"[pretrain] pi_init: {num_params(pi_init) / 1e6:.2f}M params")
    Run(cfg, vocab, splits, stage_config(cfg, "pretrain")).train(
        pi_init, "pi_init", lambda m, b: m(b[0], b[1])[1], batch_at, cfg.pretrain_steps, cfg.pretrain_lr)
    return pi_init


@timed("sft")
def stage_sft(cfg, vocab, splits, pi_init):
    pi_sft = trainable_copy(pi_init)
    Run(cfg, vocab, splits, stage_config(cfg, "sft")).train(
        pi_sft, "pi_sft", lambda m, b: afd.sft_loss(m, b[0], b[1]), batch_sampler(splits["demos"], cfg, vocab, "sft"),
        cfg.sft_steps, cfg.sft_lr)
    return pi_sft


@timed("sample")
def stage_sample(cfg, vocab, splits, pi_init, pi_sft):
    """pi_init and pi_sft samples on n_rm demonstration prompts (the tailored reward models'
    training data, beside those prompts' demonstrations) and on the held-out prompts."""
    stage_cfg = stage_config(cfg, "sample")
    path = os.path.join(cfg.out_dir, "samples.pt")
    state = saved_result(path, stage_cfg, "sample")
    if state is not None:
        said("sample", f"loaded {path} (up to date)")
        return state["samples"]
    k, demos = cfg.n_rm_samples, splits["demos"]
    picked = random.Random(f"{cfg.seed}/tailored_rm_prompts").sample(range(len(demos)), min(cfg.n_rm, len(demos)))
    prompts = [demos[i][0] for i in picked]
    heldout_prompts = [row[0] for row in splits["heldout"]]
    samples = {"prompts": prompts, "demos": [demos[i][1] for i in picked],
               "init": sample(pi_init, prompts, k, cfg, vocab, cfg.seed + 1, "sample pi_init"),
               "sft": sample(pi_sft, prompts, k, cfg, vocab, cfg.seed + 2, "sample pi_sft"),
               "heldout_init": sample(pi_init, heldout_prompts, 1, cfg, vocab, cfg.seed + 3, "sample pi_init"),
               "heldout_sft": sample(pi_sft, heldout_prompts, 2, cfg, vocab, cfg.seed + 4, "sample pi_sft")}
    save_atomic({"samples": samples, "stage_config": stage_cfg}, path)
    said("sample", f"sampled {len(samples['init'])} pi_init and {len(samples['sft'])} pi_sft responses on "
                   f"{len(prompts)} demonstration prompts, {len(samples['heldout_sft'])} pi_sft on held-out prompts")
    return samples


def train_reward_model(name, cfg, vocab, splits, samples, pi_init):
    """One reward model of reward.RM_NAMES, its trunk from pi_init, trained on its own data
    (the table in reward.py, METHOD.md section 6)."""
    rm = (AVARewardModel if name in AVA else RewardModel).from_policy(pi_init).to(cfg.device)
    run = Run(cfg, vocab, splits, stage_config(cfg, "rm", unit=name))
    if name == "ava_d":  # demonstrations only
        loss_of_batch = lambda model, b: ava_d_loss(model, b[0], b[1], cfg.ava_lambda, cfg.ava_gamma, cfg.ava_alpha,
                                                    cfg.ava_beta)
        batch_at = batch_sampler(splits["demos"], cfg, vocab, f"rm_{name}")
    elif name == "ava_p":  # chosen, then rejected
        loss_of_batch = lambda model, b: ava_p_loss(model, b[0], b[1], cfg.ava_lambda, cfg.ava_gamma, cfg.ava_alpha,
                                                    cfg.ava_beta)
        batch_at = run.triple_batches(splits["pref"], f"rm_{name}")
    elif name == "pref":
        loss_of_batch, batch_at = pairwise_loss, run.triple_batches(splits["pref"], f"rm_{name}")
    else:  # a tailored classifier: positives, then negatives, on the same prompts
        triples = afd.tailored_triples(name, samples["prompts"], samples["demos"], samples["init"], samples["sft"])
        loss_of_batch, batch_at = afd.discriminator_batch_loss, run.triple_batches(triples, f"rm_{name}")
    run.train(rm, f"rm_{name}", loss_of_batch, batch_at, cfg.rm_steps, cfg.rm_lr)
    return rm


@timed("gold")
def stage_gold(cfg, vocab, splits, pi_init):
    """The golden reward, golden(prompts, responses) -> (B,): the built-in task's program, or on
    real data a "gold" Bradley-Terry reward model trained on pairs that no evaluated reward
    model sees (a proxy for human judgement, as in reward over-optimisation studies).
    Returns (golden, what it is: a dict for results.json)."""
    if cfg.task == "synthetic":
        return (lambda prompts, responses: torch.tensor(
            [data.golden_reward(vocab.decode(p), vocab.decode(r)) for p, r in zip(prompts, responses)]),
            {"kind": "program", "function": "data.golden_reward", "max": data.GOLDEN_MAX})
    stage_cfg = {**stage_config(cfg, "pretrain"), "gold_rm_steps": cfg.gold_rm_steps,
                 "gold_init_from": cfg.gold_init_from, "rm_lr": cfg.rm_lr,
                 "code": code_versions((*STAGE_CODE["task"], *STAGE_CODE["pretrain"], "train.stage_gold"))}
    trunk = load_gpt2(cfg.gold_init_from, cfg) if cfg.gold_init_from else pi_init
    gold = RewardModel.from_policy(trunk).to(cfg.device)
    run = Run(cfg, vocab, splits, stage_cfg)
    run.train(gold, "rm_gold", pairwise_loss, run.triple_batches(splits["gold"], "rm_gold"), cfg.gold_rm_steps,
              cfg.rm_lr)
    prompts, _, chosen, rejected = map(list, zip(*splits["heldout"]))
    accuracy = pairwise_accuracy(score(gold, prompts, chosen, cfg, vocab), score(gold, prompts, rejected, cfg, vocab))
    info = {"kind": "gold reward model (a proxy)", "pairs": len(splits["gold"]), "steps": cfg.gold_rm_steps,
            "init_from": cfg.gold_init_from or "pi_init", "heldout_accuracy": accuracy}
    log(f"[gold] the golden reward is a proxy: a reward model trained on {len(splits['gold'])} pairs no "
        f"other model sees; held-out chosen > rejected accuracy {accuracy:.3f}")
    gold = frozen_copy(gold)
    return (lambda prompts, responses: score(gold, prompts, responses, cfg, vocab)), info


@timed("rm")
def stage_reward_models(cfg, vocab, splits, samples, pi_init, pi_sft, golden):
    reward_models = {}
    for name in RM_NAMES:
        with timed(f"rm/{name}"):
            reward_models[name] = (LogRatioReward(pi_sft, pi_init) if name == "logratio" else
                                   train_reward_model(name, cfg, vocab, splits, samples, pi_init))
    # held-out pairs, one per held-out prompt: demo vs sft, chosen vs rejected, own data
    prompts, demos, chosen, rejected = map(list, zip(*splits["heldout"]))
    sft_a, sft_b = samples["heldout_sft"][0::2], samples["heldout_sft"][1::2]
    golden_a, golden_b = golden(prompts, sft_a), golden(prompts, sft_b)
    kinds = {"demo": demos, "chosen": chosen, "rejected": rejected, "init": samples["heldout_init"],
             "sft_a": sft_a, "sft_b": sft_b}
    rows = []
    for name, rm in reward_models.items():
        with timed(f"rm/{name}"):
            scores = score_kinds(rm, prompts, kinds, cfg, vocab)
        rows.append({"name": name, **heldout_accuracies(name, scores, golden_a, golden_b)})
    log("[rm] held-out accuracy (own data / demo>sft / chosen>rejected / golden order of sft pairs): "
        + "; ".join(f"{r['name']} {r['heldout_accuracy']:.2f}/{r['acc_demo_vs_sft']:.2f}/"
                    f"{r['acc_chosen_vs_rejected']:.2f}/{r['acc_golden_sft_pairs']:.2f}" for r in rows))
    return reward_models, rows


@timed("policy")
def stage_policies(cfg, vocab, splits, pi_init, pi_sft, reward_models):
    """Each trained method of --methods (afd.py), from pi_sft: {method: policy}."""
    policies = {}
    for method in [m for m in methods_of(cfg) if m != "bon"]:
        with timed(f"policy/{method}"):
            policies[method] = train_method(method, cfg, vocab, splits, pi_init, pi_sft, reward_models)
        log(f"[{method}] done")
    return policies


def train_method(method, cfg, vocab, splits, pi_init, pi_sft, reward_models):
    """One trained method of afd.py (a --methods name other than bon), from pi_sft: its policy."""
    run = Run(cfg, vocab, splits, stage_config(cfg, "policy", unit=method))
    if method == "afd_adversarial":
        return afd.afd_adversarial(pi_init, pi_sft, run, cfg)
    if method == "irl_iterated":
        return afd.irl_iterated(pi_sft, run, cfg)
    if method == "irft":
        return afd.irft(pi_sft, run, cfg)
    if method == "ava_d_direct":
        return afd.ava_d_direct(pi_sft, run, cfg)
    reward_model = reward_models[method[3:]]  # rl_<rm>: RL on reward model <rm>
    if isinstance(reward_model, AVARewardModel):  # AVA's RL reward: the expected return sum_t E[R_t] (Eq. 19)
        reward_model = ExpectedReturn(reward_model)
    return afd.rl_on_reward(method, pi_sft, reward_model, run, cfg)


def golden_parts(prompts, responses, cfg, P, N):
    """{part: (P, N)} of data.golden_parts on the built-in task (None on real data, whose
    golden reward is a model): prompts (P,) texts, responses (P * N,) texts, prompt-major."""
    if cfg.task != "synthetic":
        return None
    rows = [data.golden_parts(prompts[i // N], r) for i, r in enumerate(responses)]
    return {part: torch.tensor([row[part] for row in rows], dtype=torch.float64).view(P, N) for part in rows[0]}


def best_of_n_rows(name, estimate, golden_cand, wins, parts, task, cfg, kl_bound=afd.kl_bound):
    """The results rows of one way of picking 1 of n candidates, for every n <= N: estimate(values
    (P, N), n) -> (P,) the expected value of the pick. With each part of the golden reward and
    the golden reward by kind of prompt on the built-in task."""
    rows = []
    for n in [n for n in BON_SIZES if n <= cfg.bon_n]:
        reward = estimate(golden_cand, n)                                    # (P,)
        m, se = afd.mean_stderr(reward)
        rows.append({"rm": name, "n": n, "golden_reward": m, "golden_reward_stderr": se,
                     "win_rate_vs_sft": float(estimate(wins, n).mean()), "kl_bound": kl_bound(n)})
        if parts is not None:
            rows[-1]["parts"] = {part: float(estimate(v, n).mean()) for part, v in parts.items()}
            rows[-1]["kinds"] = by_kind(reward, task)
    return rows


def by_kind(values, task):
    """The mean of values (P,) over the evaluation prompts of each kind (data.prompt_kind)."""
    kinds = [data.prompt_kind(p) for p in task.eval_prompts]
    return {kind: float(values[[k == kind for k in kinds]].double().mean())
            for kind in data.KIND_NAMES.values() if kind in kinds}


def text_ids(candidates, P, N):
    """(P, N) ids of the candidates' texts, equal for equal token lists within a prompt."""
    ids = []
    for i in range(P):
        seen = {}
        ids.append([seen.setdefault(tuple(c), len(seen)) for c in candidates[i * N:(i + 1) * N]])
    return torch.tensor(ids)


def add_share_of_ceiling(bon_rows):
    """share_of_ceiling of each row: (its golden reward - n = 1's) / (the oracle's at n - n = 1's),
    the part of the best possible gain over a random candidate that it gets (negative: a loss)."""
    base = next(b["golden_reward"] for b in bon_rows if b["rm"] == "oracle" and b["n"] == 1)
    oracle = {b["n"]: b["golden_reward"] for b in bon_rows if b["rm"] == "oracle"}
    for b in bon_rows:
        if b["rm"] != "oracle" and b["n"] > 1:
            b["share_of_ceiling"] = (b["golden_reward"] - base) / max(oracle[b["n"]] - base, 1e-12)


@timed("evaluate")
def stage_evaluate(cfg, task, vocab, splits, pi_init, pi_sft, reward_models, trained, golden):
    prompts, P, N = splits["eval_prompts"], len(splits["eval_prompts"]), cfg.bon_n
    with timed("evaluate/sample policies"):
        responses = {"init": sample(pi_init, prompts, 1, cfg, vocab, cfg.seed + 5, "eval pi_init"),
                     "sft": sample(pi_sft, prompts, 1, cfg, vocab, cfg.seed + 6, "eval pi_sft"),
                     "demonstrations": splits["eval_demos"]}
        for name, policy in trained.items():  # the same sampling seed as SFT's
            responses[name] = sample(policy, prompts, 1, cfg, vocab, cfg.seed + 6, f"eval {name}")
    golden_of = {name: golden(prompts, r) for name, r in responses.items()}
    policies = []
    for name in responses:
        m, se = afd.mean_stderr(golden_of[name])
        policies.append({"name": name, "golden_reward": m, "golden_reward_stderr": se,
                         "win_rate_vs_sft": afd.mean_stderr(afd.win_rate_indicator(golden_of[name],
                                                                                  golden_of["sft"]))[0]})
        parts = golden_parts(task.eval_prompts, [vocab.decode(r) for r in responses[name]], cfg, P, 1)
        if parts is not None:  # the built-in task: each part of the golden reward, and by kind of prompt
            policies[-1]["parts"] = {part: float(v.mean()) for part, v in parts.items()}
            policies[-1]["kinds"] = by_kind(golden_of[name], task)
        if name in trained:  # Monte-Carlo KL(pi || pi_sft) on the policy's own samples
            with timed("evaluate/kl to sft"):
                log_ratio = score(LogRatioReward(trained[name], pi_sft), prompts, responses[name], cfg, vocab)
            policies[-1]["kl_to_sft"], policies[-1]["kl_to_sft_stderr"] = afd.kl_estimate(log_ratio, 0.0)
    # AVA-d's per-token rewards on the SFT responses with the highest and the lowest golden reward
    tokens = [{"prompt": task.eval_prompts[i], "response": vocab.decode(responses["sft"][i]),
               "golden_reward": float(golden_of["sft"][i]),
               **reward_models["ava_d"].token_table(prompts[i], responses["sft"][i], vocab.eot_id, vocab.decode)}
              for i in dict.fromkeys([int(golden_of["sft"].argmax()), int(golden_of["sft"].argmin())])]
    shown = range(min(3, P))  # the report's example prompts
    examples = {name: [(task.eval_prompts[i], vocab.decode(responses[name][i])) for i in shown]
                for name in responses}
    bon_rows = []
    if "bon" in methods_of(cfg):  # Best-of-N: N candidates of pi_sft per prompt, every RM, every n <= N
        with timed("evaluate/sample candidates"):
            candidates = sample(pi_sft, prompts, N, cfg, vocab, cfg.seed + 7, "bon pi_sft")
        flat_prompts = [p for p in prompts for _ in range(N)]
        golden_cand = golden(flat_prompts, candidates).view(P, N)
        wins = afd.win_rate_indicator(golden_cand, golden_of["sft"][:, None])  # (P, N) vs the SFT response
        parts = golden_parts(task.eval_prompts, [vocab.decode(c) for c in candidates], cfg, P, N)
        for name, rm in progress(reward_models.items(), desc="score candidates"):
            with timed(f"evaluate/score {name}"):
                scores = score(rm, flat_prompts, candidates, cfg, vocab).view(P, N)
            bon_rows += best_of_n_rows(name, lambda values, n: afd.best_of_n_estimate(scores, values, n),
                                       golden_cand, wins, parts, task, cfg)
            if name == "init_sft":
                best = afd.best_of_n(scores)  # (P,) shown in the report
                examples[f"best-of-{N} init_sft"] = [(task.eval_prompts[i],
                                                      vocab.decode(candidates[i * N + int(best[i])])) for i in shown]
        # the ceiling: the golden reward itself as the scorer; the label-free baseline: majority voting
        bon_rows += best_of_n_rows("oracle", lambda values, n: afd.best_of_n_estimate(golden_cand, values, n),
                                   golden_cand, wins, parts, task, cfg)
        same_text = text_ids(candidates, P, N)
        kept = {n: afd.majority_vote(same_text, n, torch.Generator().manual_seed(stable_seed(cfg.seed, "majority", n)))
                for n in BON_SIZES if 1 < n <= N}  # (P, draws) each; at n = 1 every sample is its own majority
        majority = lambda values, n: (values.double().mean(dim=1) if n == 1 else
                                      torch.gather(values.double(), 1, kept[n]).mean(dim=1))
        bon_rows += best_of_n_rows("majority", majority, golden_cand, wins, parts, task, cfg, kl_bound=math.log)
        add_share_of_ceiling(bon_rows)
    log("[evaluate] golden reward " + ", ".join(f"{p['name']} {p['golden_reward']:.3f}" for p in policies)
        + (f"; best-of-{N} " + ", ".join(f"{b['rm']} {b['golden_reward']:.3f}" for b in bon_rows if b["n"] == N)
           if bon_rows else ""))
    said("evaluate", f"golden reward of {', '.join(responses)} on {P} evaluation prompts"
                     + (f", and {N} pi_sft candidates per prompt scored by {len(reward_models)} reward models"
                        if bon_rows else ""))
    return policies, bon_rows, examples, tokens


# ----------------------------------------------------------------------------------------
# The run

def check_out_dir(cfg):
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
    except OSError as e:
        die(f"cannot create --out_dir={cfg.out_dir!r}: {e.strerror}; pick a writable folder")
    if not os.access(cfg.out_dir, os.W_OK):
        die(f"--out_dir={cfg.out_dir!r} is not writable; pick a writable folder")


@contextmanager
def out_dir_lock(out_dir):
    """One run per out dir: <out_dir>/run.lock holds the running process's id while it runs. A second
    run meets it with one line naming that process; a lock whose process is gone (a run that was
    killed) is stale and taken over; the lock is removed when the run ends, also on Ctrl-C or an error."""
    path = os.path.join(out_dir, "run.lock")
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            holder = lock_holder(path)
            if holder is not None and holder != os.getpid() and process_alive(holder):
                die(f"another run (process {holder}) is using --out_dir={out_dir}; wait for it to end or give "
                    f"another --out_dir (if no such run is going, delete {path})")
            with suppress(FileNotFoundError):
                os.remove(path)  # stale: its process is gone
        except OSError as e:
            die(f"cannot create {path}: {e.strerror}; pick a writable --out_dir")
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()}\n")
    try:
        yield
    finally:
        if lock_holder(path) == os.getpid():
            with suppress(OSError):
                os.remove(path)


def lock_holder(path):
    """The process id written in a lock file, or None if there is none or it cannot be read."""
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def process_alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, run by another user
    return True


def saved_results(cfg):
    """results.json of an earlier run with the same config and code, or None."""
    path = os.path.join(cfg.out_dir, "results.json")
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(results, dict):
        return None
    if results.get("stage_config") != (current := stage_config(cfg, "evaluate")):
        log(f"[evaluate] {changes(results.get('stage_config', {}), current)} since {path}: redoing it")
        return None
    return results


def main(argv, host_fix=None):
    """The whole pipeline for a command line; returns the results (results.json). host_fix: see
    check_memory."""
    cfg = parse_args(argv)
    STAGE_LINES.clear()
    STAGE_TIMES.clear()
    check_out_dir(cfg)
    setup_distributed(cfg)
    with out_dir_lock(cfg.out_dir) if is_main() else nullcontext():  # one run per out dir
        return run_pipeline(cfg, host_fix)


def run_pipeline(cfg, host_fix=None):
    """The stages in order, then the results (results.json, report.md)."""
    t0 = time.time()
    task, vocab, splits = stage_task(cfg)
    if (results := saved_results(cfg)) is not None:  # nothing to redo; the report is redrawn from it
        if is_main():
            write_report(results, cfg.out_dir)
        log(f"[evaluate] up to date: {cfg.out_dir}/results.json; report.md rewritten\n" + markdown_tables(results))
        return results
    check_memory(cfg, vocab, host_fix)
    pi_init = stage_pretrain(cfg, vocab, splits)
    pi_sft = stage_sft(cfg, vocab, splits, pi_init)
    samples = stage_sample(cfg, vocab, splits, pi_init, pi_sft)
    golden, golden_info = stage_gold(cfg, vocab, splits, pi_init)
    reward_models, rm_rows = stage_reward_models(cfg, vocab, splits, samples, pi_init, pi_sft, golden)
    trained = stage_policies(cfg, vocab, splits, pi_init, pi_sft, reward_models)
    policies, bon_rows, examples, tokens = stage_evaluate(cfg, task, vocab, splits, pi_init, pi_sft,
                                                          reward_models, trained, golden)
    results = {"preset": cfg.preset, "seed": cfg.seed, "device": cfg.device, "task": cfg.task,
               "processes": WORLD, "config": asdict(cfg), "golden_reward": golden_info, "policies": policies,
               "reward_models": rm_rows, "best_of_n": bon_rows, "ava_token_rewards": tokens,
               "examples": examples, "stages": STAGE_LINES, "wall_time_s": time.time() - t0,
               "stage_times": STAGE_TIMES, "stage_config": stage_config(cfg, "evaluate")}
    if is_main():
        write_text(json.dumps(results, indent=2), os.path.join(cfg.out_dir, "results.json"))
        write_report(results, cfg.out_dir)
    log(markdown_tables(results))
    log(f"[done] {time.time() - t0:.0f} s; wrote {cfg.out_dir}/results.json and report.md")
    if WORLD > 1:
        dist.destroy_process_group()
    return results


def cli(argv, entry=None):
    """entry (main) for the command line: an interruption or a file that cannot be written ends
    the run with one line saying what to do, not a traceback; what was finished stays in --out_dir."""
    try:
        (entry or main)(argv)
    except KeyboardInterrupt:
        print("\ninterrupted: finished stages and the last checkpoint are kept in --out_dir; run the same "
              "command again to go on from there", file=sys.stderr)
        sys.exit(130)  # the shell's status for a run stopped by Ctrl-C (128 + SIGINT)
    except WriteError as e:
        die(f"{e}; free some space (or pick a writable --out_dir) and run the same command again: finished "
            f"stages are kept", status=1)


if __name__ == "__main__":
    cli(sys.argv[1:])
