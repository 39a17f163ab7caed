"""
The command line: the `Config` dataclass (one field per option, its help line beside it), the
presets, which stage each field belongs to, and the validation of every value before any work
starts, including whether the run fits in free memory. A bad input stops with one line (`die`).

    cfg = parse_args(["--preset=smoke", "--seed=1"])   # what `python train.py ...` runs on
"""
import argparse
import difflib
import math
import os
import sys
from dataclasses import dataclass, field, fields

import torch

from model import GPTConfig


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
    demo_error: float = opt(0.0, "built-in task: the share of the demonstrator's responses that carry a mistake the "
                                 "golden reward sees (a wrong answer, an over-refusal, harmful compliance, rambling)")
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
             "n_demo", "n_rm", "n_heldout", "n_eval", "n_gold", "multi_turn_prob", "pref_noise_temp", "demo_error"],
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
    "demo_error": (lambda v: 0 <= v < 1, "a share, in [0, 1)"),
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
    if cfg.demo_error > 0 and (cfg.task != "synthetic" or cfg.demos):
        die(f"--demo_error={cfg.demo_error} flaws the built-in task's demonstrator: it needs --task=synthetic and "
            f"no --demos file")
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



def model_config(cfg, vocab):
    return GPTConfig(block_size=cfg.block_size, vocab_size=len(vocab), n_layer=cfg.n_layer,
                     n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout)



def check_memory(cfg, vocab, world=1, host_fix=None):
    """Stop with one line, before any work, if the run cannot fit in free memory: on the device,
    memory_bytes of the largest training batch (--batch_size, or --pg_prompts x --pg_group)
    and of the largest sampling call; on the host, the samples and Best-of-N candidates kept as
    token lists (--n_eval x --bon_n, --n_rm x --n_rm_samples). Every allocation that grows with an
    option is in one of these. host_fix: what to lower for the host's share, if the caller knows better
    (budget.py: its --factors multiply --n_rm_samples)."""
    per_rank = lambda n: max(1, n // world)  # world: the torchrun processes
    train_rows = max(cfg.batch_size // world, per_rank(cfg.pg_prompts) * cfg.pg_group)
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

