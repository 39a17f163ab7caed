"""
The end-to-end Alignment-from-Demonstrations pipeline and its command line.

    python train.py                         # preset `cpu` (or `gpu` when CUDA is there)
    python train.py --preset=smoke          # the whole pipeline in under a minute (tests)
    python train.py --seed=1 --bon_n=16     # any Config field: --field=value
    python train.py --task=hh --data_dir=DIR --init_from=gpt2   # HH-RLHF from pre-trained GPT-2
    python train.py --preset=gpu-hh --data_dir=DIR              # the paper's setting, one GPU
    torchrun --standalone --nproc_per_node=2 train.py   # data-parallel on 2 GPUs (or CPU processes)

Stages (each prints a one-line summary; long ones show a tqdm bar):
 1. task      build the built-in task from the seed (or read HH-RLHF) and its vocabulary
 2. pretrain  pi_init: language modelling on mixed-quality dialogues (the unaligned base),
              or pre-trained GPT-2 weights (--init_from)
 3. sft       pi_sft: forward KL to the demonstrator = SFT on the demonstrations
 4. sample    pi_init and pi_sft on the reward-model prompts (negatives and positives)
 5. rm        on real data first the gold reward model (the proxy golden reward); then the
              reward models of reward.py (AfD's, pref, logratio, AVA-d and AVA-p), and
              their held-out accuracies
 6. policy    the trained methods of --methods, each from pi_sft: afd_adversarial,
              irl_iterated, irft, rl_init_sft, rl_ava_d (one RLOO step, afd.rloo_loss, for
              all but IRFT)
 7. evaluate  golden reward, win rate vs SFT (and KL to pi_sft) of every policy; Best-of-n of
              pi_sft with every reward model for every n <= N (one draw of N), with the KL bound;
              AVA-d's per-token rewards (mean, std) on two evaluation responses
Outputs in --out_dir: pi_init.pt, pi_sft.pt, samples.pt, rm_<name>.pt, policy_*.pt and their
*.curve.jsonl, results.json, report.md (and golden_vs_kl.png with matplotlib).

Re-running with the same --out_dir resumes: a stage whose saved result was made with the
same config (the fields in STAGE_FIELDS, of it and of every stage before it) is loaded, not
redone; a training stage that was interrupted restarts from its last `<name>.resume.pt`
(every --ckpt_every steps). Batches are a function of (seed, stage, step, rank), so a
resumed run gives the same results as an uninterrupted one.
"""
import json
import math
import os
import random
import sys
import time
import zlib
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from functools import lru_cache

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import data
from afd import (best_of_n, best_of_n_estimate, discriminator_loss, irft_loss, kl_bound, kl_estimate,
                 mean_stderr, rloo_loss, sequence_logprob, sft_loss, win_rate_indicator)
from model import GPT, GPTConfig, configure_optimizer, generate, num_params
from reward import (AVA, POINTWISE, RM_NAMES, AVARewardModel, LogRatioReward, RewardModel, ava_d_loss,
                    ava_p_loss, bradley_terry_loss, frozen_copy, pairwise_accuracy)


@dataclass
class Config:
    preset: str = "cpu"
    out_dir: str = "out"
    seed: int = 0
    device: str = "auto"          # auto | cpu | cuda | cuda:N | mps
    task: str = "synthetic"       # synthetic (the built-in task) | hh (Anthropic HH-RLHF from --data_dir)
    demos: str = ""               # a JSON-lines file of {"prompt", "response"}: replaces the built-in demonstrations
    data_dir: str = ""            # --task=hh: the folder holding harmless-base/ and helpful-base/
    subset: str = "harmless"      # --task=hh: harmless | helpful | both
    skip_bad_lines: bool = False  # --task=hh: skip and count malformed lines instead of stopping
    init_from: str = ""           # pi_init: "" = pre-train from scratch; gpt2 | gpt2-medium | ... | PATH/model.safetensors
    # the task: how many prompts in each (disjoint) split
    n_pretrain: int = 6000
    n_demo: int = 1500
    n_rm: int = 600
    n_heldout: int = 200
    n_eval: int = 300
    n_gold: int = 2000            # --task=hh: preference pairs of the gold reward model (no other RM sees them)
    multi_turn_prob: float = 0.3
    pref_noise_temp: float = 1.0  # Bradley-Terry temperature of the preference labels
    # the model (policy and reward models share it)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128
    dropout: float = 0.0
    # optimisation
    batch_size: int = 32          # the global batch: split across processes under torchrun
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    warmup_steps: int = 20
    pretrain_steps: int = 900
    pretrain_lr: float = 2e-3
    sft_steps: int = 40
    sft_lr: float = 5e-4
    rm_steps: int = 100
    rm_lr: float = 3e-4
    gold_rm_steps: int = 600      # --task=hh: Bradley-Terry steps of the gold reward model
    gold_init_from: str = ""      # --task=hh: the gold RM's trunk ("" = pi_init; e.g. gpt2-medium, bigger than the rest)
    ava_lambda: float = 1.0       # AVA: weight of the Bellman-consistency term (AVRIL: 1)
    ava_gamma: float = 1.0        # AVA: discount in the TD difference (AVRIL's code: 1, no discount)
    ckpt_every: int = 100         # training steps between resumable checkpoints
    # sampling and Best-of-N
    temperature: float = 1.0
    top_k: int = 0                # 0 = no top-k filter
    max_new_tokens: int = 48
    n_rm_samples: int = 2         # samples of pi_init and of pi_sft per reward-model prompt
    bon_n: int = 32               # N: candidates per evaluation prompt
    sample_rows: int = 1024       # rows decoded at once
    bf16: bool = True             # bf16 autocast (CUDA only)
    # policy optimisation (METHOD.md sections 1-2); `bon` is the Best-of-N evaluation
    methods: str = "bon,adversarial,irl,irft,rl_init_sft,rl_ava_d"
    pg_steps: int = 60            # optimiser steps of each trained method (irl, irft: over all rounds)
    pg_lr: float = 2e-4
    pg_prompts: int = 8           # prompts per policy-gradient step
    pg_group: int = 8             # K samples per prompt (the RLOO group)
    beta_kl: float = 0.2          # per-token KL penalty to the reference
    disc_lr: float = 3e-4         # the adversarial discriminator
    irl_rounds: int = 3           # iterated IRL: rounds of {sample, reward step, policy steps}
    irl_rm_steps: int = 40        # Bradley-Terry steps per round
    irft_stages: int = 2          # IRFT: stages, each against the frozen model it starts from
    irft_beta: float = 0.5
    n_round_samples: int = 256    # demonstration prompts sampled per IRL round / IRFT stage


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
# changed field redoes its stage and everything downstream (fields not listed, such as
# out_dir, device or ckpt_every, do not change results).
STAGE_FIELDS = {
    "task": ["seed", "task", "demos", "data_dir", "subset", "skip_bad_lines", "init_from", "n_pretrain",
             "n_demo", "n_rm", "n_heldout", "n_eval", "n_gold", "multi_turn_prob", "pref_noise_temp"],
    "pretrain": ["n_layer", "n_head", "n_embd", "block_size", "dropout", "batch_size",
                 "weight_decay", "grad_clip", "warmup_steps", "pretrain_steps", "pretrain_lr", "bf16"],
    "sft": ["sft_steps", "sft_lr"],
    "sample": ["temperature", "top_k", "max_new_tokens", "n_rm_samples", "sample_rows"],
    "rm": ["rm_steps", "rm_lr", "ava_lambda", "ava_gamma"],
    "policy": ["pg_steps", "pg_lr", "pg_prompts", "pg_group", "beta_kl", "disc_lr", "irl_rounds",
               "irl_rm_steps", "irft_stages", "irft_beta", "n_round_samples"],
    "evaluate": ["bon_n", "methods", "gold_rm_steps", "gold_init_from"],
}
METHODS = ["bon", "adversarial", "irl", "irft", "rl_init_sft", "rl_ava_d"]
POLICY_NAMES = {"adversarial": "afd_adversarial", "irl": "irl_iterated", "irft": "irft",
                "rl_init_sft": "rl_init_sft", "rl_ava_d": "rl_ava_d"}
RL_ON_FIXED_RM = {"rl_init_sft": "init_sft", "rl_ava_d": "ava_d"}  # method -> its reward model


def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv):
    """--preset=NAME then --field=value overrides, type-checked against Config."""
    types = {f.name: f.type for f in fields(Config)}
    pairs = []
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            die(f"bad argument {arg!r}: use --field=value (fields: {', '.join(types)})")
        key, value = arg[2:].split("=", 1)
        if key not in types:
            die(f"unknown option --{key}; known: {', '.join(types)}")
        pairs.append((key, value))
    preset = dict(pairs).get("preset", "gpu" if torch.cuda.is_available() else "cpu")
    if preset not in PRESETS:
        die(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = Config(preset=preset, **PRESETS[preset])
    for key, value in pairs:
        setattr(cfg, key, convert(key, value, types[key]))
    positive = [f.name for f in fields(Config) if f.type in (int, "int") and f.name not in ("seed", "top_k")]
    for key in positive:
        if getattr(cfg, key) < 1:
            die(f"--{key}={getattr(cfg, key)} must be at least 1")
    if cfg.n_embd % cfg.n_head:
        die(f"--n_embd={cfg.n_embd} must be a multiple of --n_head={cfg.n_head}")
    if cfg.temperature < 0 or cfg.top_k < 0:
        die("--temperature and --top_k must not be negative")
    unknown = set(methods_of(cfg)) - set(METHODS)
    if unknown:
        die(f"--methods: unknown {', '.join(sorted(unknown))}; choose from {','.join(METHODS)}")
    if cfg.pg_group < 2:
        die(f"--pg_group={cfg.pg_group} must be at least 2 (RLOO needs a group)")
    return cfg


def methods_of(cfg):
    return [m for m in cfg.methods.split(",") if m]


def convert(key, value, typ):
    try:
        if typ in (bool, "bool"):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return value.lower() in ("true", "1")
        return {"int": int, "float": float, "str": str}.get(typ, typ)(value)
    except ValueError:
        die(f"--{key}={value!r} is not a valid {getattr(typ, '__name__', typ)}")


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
    if cfg.batch_size % WORLD:
        die(f"--batch_size={cfg.batch_size} must be a multiple of the {WORLD} processes")


def is_main():
    return RANK == 0


def log(msg):
    if is_main():
        print(msg, flush=True)


def progress(iterable, **kw):
    return tqdm(iterable, leave=False, disable=not is_main(), **kw)


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
    lengths = gather_tensor(torch.tensor([len(r) for r in rows], dtype=torch.long))
    flat = gather_tensor(torch.tensor([t for r in rows for t in r], dtype=torch.long)).tolist()
    out, i = [], 0
    for n in lengths.tolist():
        out.append(flat[i:i + n])
        i += n
    return out


def all_finite(loss):
    """Whether the loss is finite on every rank (so that all ranks stop together)."""
    ok = torch.isfinite(loss.detach()).float().reshape(1)
    if WORLD > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


# ----------------------------------------------------------------------------------------
# Checkpoints: written atomically by rank 0, loaded with weights_only=True, each holding the
# stage config it was made with.

def save_atomic(obj, path):
    """Write then rename, so an interrupted save never leaves a broken file."""
    if is_main():
        tmp = path + ".tmp"
        torch.save(obj, tmp)
        os.replace(tmp, path)
    if WORLD > 1:
        dist.barrier()


def load_checkpoint(path):
    """A checkpoint's dict, unpickled safely (tensors and plain data only, never code)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything else with an UnpicklingError
        die(f"{path} is not a safe checkpoint of this project ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:120]}); delete it, or use another --out_dir")


def stage_config(cfg, stage):
    """The config a stage's result depends on: its fields and those of every stage before it."""
    names = list(STAGE_FIELDS)
    out = {"processes": WORLD}
    for s in names[:names.index(stage) + 1]:
        out.update({k: getattr(cfg, k) for k in STAGE_FIELDS[s]})
    if cfg.demos:
        out["demos_crc32"] = file_crc32(cfg.demos)
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
        log(f"[{what}] {path} was made with another config: redoing it")
        return None
    log(f"[{what}] up to date: {path}")
    return state


def model_config(cfg, vocab):
    return GPTConfig(block_size=cfg.block_size, vocab_size=len(vocab), n_layer=cfg.n_layer,
                     n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout)


def save_model(path, model, vocab, stage_cfg, **extra):
    save_atomic({"model": model.state_dict(), "model_config": asdict(model_config_of(model)),
                 "vocab": vocab.ids, "stage_config": stage_cfg, **extra}, path)


def model_config_of(model):
    return model.config if isinstance(model, GPT) else model.trunk.config


def load_weights(model, state, path, vocab):
    """Load a checkpoint into model, with a clear error if it was made for another model."""
    if state.get("model_config") != asdict(model_config_of(model)) or state.get("vocab") != vocab.ids:
        die(f"{path} was made for another model config or vocabulary "
            f"({state.get('model_config')} vs {asdict(model_config_of(model))}); "
            f"delete it, or use another --out_dir")
    model.load_state_dict(state["model"])


def policy_copy(model):
    """A trainable copy of a policy (a fresh GPT with the same weights)."""
    copy = GPT(model.config).to(next(model.parameters()).device)
    copy.load_state_dict(model.state_dict())
    return copy


def restore(model, path, stage_cfg, vocab, what):
    """Load model from path if that result is up to date; returns whether it was."""
    state = saved_result(path, stage_cfg, what)
    if state is not None:
        load_weights(model, state, path, vocab)
        model.eval()
    return state is not None


# ----------------------------------------------------------------------------------------
# Training

def autocast(cfg):
    if cfg.device.startswith("cuda") and cfg.bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def stable_seed(*parts):
    return zlib.crc32("/".join(map(str, parts)).encode())


def fit(model, loss_of_batch, batch_at, steps, lr, cfg, vocab, name, stage_cfg, aux=None):
    """AdamW with linear warm-up and cosine decay; returns the curve: one record per step,
    {"step", "loss", ...} with whatever stats loss_of_batch returns beside its loss.

    loss_of_batch(model, batch) -> loss or (loss, stats). aux is an optional (module,
    optimizer) that loss_of_batch trains itself (the adversarial discriminator).
    Resumable: every cfg.ckpt_every steps the model, optimizer, step, curve and RNG state (and
    aux) go to <out_dir>/<name>.resume.pt, and a later call with the same stage config
    continues from there. batch_at(step) is a function of the step, so a resumed run equals
    an uninterrupted one. A non-finite loss stops the run; the last good checkpoint is kept.
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
            log(f"[{name}] {path} was made with another config: starting over")
    train_model = DistributedDataParallel(model) if WORLD > 1 else model
    model.train()
    for step in (bar := progress(range(start, steps), initial=start, total=steps, desc=name)):
        warm = min(1.0, (step + 1) / cfg.warmup_steps)
        for group in opt.param_groups:
            group["lr"] = lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        with autocast(cfg):
            out = loss_of_batch(train_model, batch_at(step))
        loss, stats = out if isinstance(out, tuple) else (out, {})
        if not all_finite(loss):
            kept = f"; the last good checkpoint is {path}" if os.path.exists(path) else ""
            die(f"{name}: the loss became {loss.item()} at step {step}; lower its learning rate{kept}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        curve.append({"step": step, "loss": loss.item(), **stats})
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % cfg.ckpt_every == 0 and step + 1 < steps:
            extra = {} if aux is None else {"aux_model": aux[0].state_dict(), "aux_optimizer": aux[1].state_dict()}
            save_model(path, model, vocab, stage_cfg, optimizer=opt.state_dict(), step=step + 1,
                       curve=curve, rng=torch.get_rng_state(), **extra)
    model.eval()
    return curve


def train_and_save(model, name, loss_of_batch, batch_at, steps, lr, cfg, vocab, stage_cfg, aux=None):
    """fit, then save <name>.pt (with its stage config) and <name>.curve.jsonl, and drop the
    resume checkpoint. Returns the curve."""
    curve = fit(model, loss_of_batch, batch_at, steps, lr, cfg, vocab, name, stage_cfg, aux)
    save_model(os.path.join(cfg.out_dir, f"{name}.pt"), model, vocab, stage_cfg, curve=curve)
    if is_main():
        write_text_atomic("".join(json.dumps(r) + "\n" for r in curve),
                          os.path.join(cfg.out_dir, f"{name}.curve.jsonl"))
        resume = os.path.join(cfg.out_dir, f"{name}.resume.pt")
        if os.path.exists(resume):
            os.remove(resume)
    return curve


def mean_of(curve, key, last=20):
    """Mean of a curve's key over its last records."""
    values = [r[key] for r in curve[-last:]]
    return sum(values) / len(values)


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
    """batch_at(step): this rank's rows at a step, `size` drawn at random (with replacement)
    from each list of `sources` in turn; a function of (seed, name, step, rank)."""
    def batch_at(step):
        rng = random.Random(f"{cfg.seed}/{name}/{step}/{RANK}")
        return [rows[rng.randrange(len(rows))] for rows in sources for _ in range(size)]
    return batch_at


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


@torch.no_grad()
def score(scorer, prompts, responses, cfg, vocab, batch=256):
    """Reward of each (prompt, response) pair: (B,) float tensor on the CPU."""
    lo, hi = shard(len(prompts))
    out = [torch.zeros(0)]
    for i in range(lo, hi, batch):
        j = min(i + batch, hi)
        idx, targets, last = data.make_batch(prompts[i:j], responses[i:j], vocab.eot_id, cfg.device)
        with autocast(cfg):
            out.append(scorer(idx, targets, last).float().cpu())
    return gather_tensor(torch.cat(out))


def program_golden(vocab):
    """The built-in task's golden reward (data.golden_reward) as golden(prompts, responses)."""
    return lambda prompts, responses: torch.tensor(
        [data.golden_reward(vocab.decode(p), vocab.decode(r)) for p, r in zip(prompts, responses)])


# ----------------------------------------------------------------------------------------
# The stages

def hh_task(cfg):
    """--task=hh: HH-RLHF pairs from --data_dir split into the task's disjoint splits."""
    pairs = {}
    for split in ("train", "test"):
        pairs[split], counts = data.read_hh(cfg.data_dir, cfg.subset, split, cfg.skip_bad_lines)
        log(f"[task] {split}: " + data.hh_summary(counts))
    task, sizes = data.build_hh_task(pairs["train"], pairs["test"], cfg.seed, cfg.n_pretrain, cfg.n_demo,
                                     cfg.n_rm, cfg.n_heldout, cfg.n_eval, cfg.n_gold)
    short = [f"{k} {sizes[k]} of {want}" for k, want in
             [("gold", cfg.n_gold), ("demo", cfg.n_demo), ("rm", cfg.n_rm), ("heldout", cfg.n_heldout),
              ("eval", cfg.n_eval)] if sizes[k] < want]
    if short:
        log(f"[task] the data ran short, these splits are smaller than asked: {', '.join(short)}")
    empty = [k for k in ("gold", "demo", "rm", "heldout", "eval") if sizes[k] == 0]
    if empty:
        die(f"--data_dir={cfg.data_dir}: not enough distinct prompts for the {', '.join(empty)} split(s) "
            f"({sizes}); lower --n_gold/--n_demo/--n_rm or give more data")
    return task


def stage_task(cfg):
    if cfg.task == "hh":
        try:
            task = hh_task(cfg)
        except data.DataError as e:
            die(str(e))
    else:
        task = data.build_task(cfg.seed, cfg.n_pretrain, cfg.n_demo, cfg.n_rm, cfg.n_heldout,
                               cfg.n_eval, cfg.multi_turn_prob, cfg.pref_noise_temp)
    demo_source = [f"demonstration {i + 1}" for i in range(len(task.demos))]
    if cfg.demos:
        try:
            task.demos, lines = data.read_demos(cfg.demos)
        except data.DataError as e:
            die(str(e))
        demo_source = [f"{cfg.demos} line {k}" for k in lines]
    if cfg.task == "hh":  # real dialogues are long: shorten them to the context, and count
        counts = data.fit_to_context(task, cfg.block_size, cfg.max_new_tokens)
        log(f"[task] to fit --block_size={cfg.block_size}: {counts['prompts_truncated']} prompts lost "
            f"their earliest turns, {counts['responses_truncated']} responses were cut at the end")
    # a GPT-2 initialisation needs GPT-2's whole vocabulary; from scratch, the task's tokens do
    vocab = data.Vocab(range(50257)) if cfg.init_from else data.Vocab.from_texts(task.texts())
    enc = vocab.encode
    tok = {
        "pretrain": [(enc(p), enc(r)) for p, r in task.pretrain],
        "demos": [(enc(p), enc(r)) for p, r in task.demos],
        "rm_prompts": [enc(p) for p in task.rm_prompts],
        "pref": [(enc(p), enc(c), enc(r)) for p, c, r in task.pref_pairs],
        "heldout": [tuple(enc(t) for t in row) for row in task.heldout],
        "eval_prompts": [enc(p) for p in task.eval_prompts],
        "eval_demos": [enc(r) for r in task.eval_demos],
        "gold": [(enc(p), enc(c), enc(r)) for p, c, r in task.gold_pairs],
    }
    rows = [(f"pre-training dialogue {i + 1}", p, r) for i, (p, r) in enumerate(tok["pretrain"])]
    for where, p, r in rows + list(zip(demo_source, *zip(*tok["demos"]))):
        if len(p) + len(r) > cfg.block_size:
            die(f"{where} has {len(p) + len(r)} tokens, more than the context --block_size="
                f"{cfg.block_size}; shorten it or raise block_size")
    longest_prompt = max(map(len, tok["rm_prompts"] + tok["eval_prompts"]))
    if longest_prompt + cfg.max_new_tokens > cfg.block_size:
        die(f"a prompt of {longest_prompt} tokens + --max_new_tokens={cfg.max_new_tokens} exceeds "
            f"--block_size={cfg.block_size}; lower max_new_tokens or raise block_size")
    log(f"[task] {cfg.task}: {len(task.pretrain)} pre-training dialogues, {len(task.demos)} demonstrations"
        f"{' from ' + cfg.demos if cfg.demos else ''}, {len(task.rm_prompts)} RM / "
        f"{len(task.heldout)} held-out / {len(task.eval_prompts)} evaluation prompts; "
        f"vocabulary {len(vocab)} of 50257 GPT-2 tokens")
    return task, vocab, tok


def check_memory(cfg, vocab):
    """Stop with a clear message if the run cannot fit the device's free memory (a rough,
    generous estimate: AdamW training of one model, and the KV cache of one sampling call)."""
    C, L, T, V = cfg.n_embd, cfg.n_layer, cfg.block_size, len(vocab)
    params = 12 * L * C * C + (V + T) * C
    B = cfg.batch_size // WORLD
    train = 16 * params + 4 * B * T * (L * (34 * C + 5 * cfg.n_head * T) + 3 * V)
    rows = min(cfg.sample_rows, max(cfg.n_eval, cfg.n_rm, cfg.n_heldout) * max(cfg.bon_n, cfg.n_rm_samples, 2))
    sampling = 4 * params + 4 * rows * (2 * L * T * C + 4 * V)
    need = 1.2 * max(train, sampling) + 2**28
    if cfg.device.startswith("cuda"):
        free = torch.cuda.mem_get_info(torch.device(cfg.device))[0]
    else:
        need *= int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # the processes share the host
        free = available_host_memory()
    if free is not None and need > free:
        die(f"preset {cfg.preset!r} with this config needs about {need / 2**30:.1f} GiB on "
            f"{cfg.device} but {free / 2**30:.1f} GiB is free; lower --batch_size or "
            f"--sample_rows, or use a smaller preset (--preset=cpu or smoke)")


def available_host_memory():
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None  # not Linux: no check


def load_gpt2(name_or_path, cfg):
    """A GPT with pre-trained GPT-2 weights (model.GPT.from_gpt2), or a clear error."""
    try:
        model = GPT.from_gpt2(name_or_path).to(cfg.device)
    except (OSError, ValueError, RuntimeError) as e:
        die(f"--init_from={name_or_path}: {e}")
    if model.config.block_size < cfg.block_size:
        die(f"--block_size={cfg.block_size} is longer than {name_or_path}'s context "
            f"({model.config.block_size}); lower --block_size")
    return model


def stage_pretrain(cfg, vocab, tok):
    if cfg.init_from:  # a pre-trained GPT-2 replaces pre-training
        pi_init = load_gpt2(cfg.init_from, cfg)
        log(f"[pretrain] pi_init = {cfg.init_from}: {num_params(pi_init) / 1e6:.1f}M params, no pre-training")
        return pi_init
    stage_cfg = stage_config(cfg, "pretrain")
    torch.manual_seed(cfg.seed)
    pi_init = GPT(model_config(cfg, vocab)).to(cfg.device)
    if restore(pi_init, os.path.join(cfg.out_dir, "pi_init.pt"), stage_cfg, vocab, "pretrain"):
        return pi_init
    batch_at = batch_sampler(tok["pretrain"], cfg, vocab, "pretrain", loss_on_prompt=True)
    curve = train_and_save(pi_init, "pi_init", lambda m, b: m(b[0], b[1])[1], batch_at,
                           cfg.pretrain_steps, cfg.pretrain_lr, cfg, vocab, stage_cfg)
    log(f"[pretrain] pi_init: {num_params(pi_init) / 1e6:.2f}M params, "
        f"loss {curve[0]['loss']:.3f} -> {mean_of(curve, 'loss'):.3f}")
    return pi_init


def stage_sft(cfg, vocab, tok, pi_init):
    stage_cfg = stage_config(cfg, "sft")
    pi_sft = policy_copy(pi_init)
    if restore(pi_sft, os.path.join(cfg.out_dir, "pi_sft.pt"), stage_cfg, vocab, "sft"):
        return pi_sft
    batch_at = batch_sampler(tok["demos"], cfg, vocab, "sft")
    curve = train_and_save(pi_sft, "pi_sft", lambda m, b: sft_loss(m, b[0], b[1]), batch_at,
                           cfg.sft_steps, cfg.sft_lr, cfg, vocab, stage_cfg)
    log(f"[sft] response NLL {curve[0]['loss']:.3f} -> {mean_of(curve, 'loss'):.3f}")
    return pi_sft


def stage_sample(cfg, vocab, tok, pi_init, pi_sft):
    """pi_init and pi_sft samples on the RM prompts (training) and held-out prompts."""
    stage_cfg = stage_config(cfg, "sample")
    path = os.path.join(cfg.out_dir, "samples.pt")
    state = saved_result(path, stage_cfg, "sample")
    if state is not None:
        return state["samples"]
    k = cfg.n_rm_samples
    heldout_prompts = [row[0] for row in tok["heldout"]]
    s = {"rm_prompts": [p for p in tok["rm_prompts"] for _ in range(k)],
         "init": sample(pi_init, tok["rm_prompts"], k, cfg, vocab, cfg.seed + 1, "sample pi_init"),
         "sft": sample(pi_sft, tok["rm_prompts"], k, cfg, vocab, cfg.seed + 2, "sample pi_sft"),
         "heldout_init": sample(pi_init, heldout_prompts, 1, cfg, vocab, cfg.seed + 3, "sample pi_init"),
         "heldout_sft": sample(pi_sft, heldout_prompts, 2, cfg, vocab, cfg.seed + 4, "sample pi_sft")}
    save_atomic({"samples": s, "stage_config": stage_cfg}, path)
    log(f"[sample] {len(s['init'])} pi_init and {len(s['sft'])} pi_sft samples on RM prompts, "
        f"{len(s['heldout_sft'])} pi_sft on held-out prompts")
    return s


def train_reward_model(name, cfg, vocab, tok, samples, pi_init):
    """One reward model of reward.RM_NAMES trained on its data (see the table in reward.py)."""
    stage_cfg = {**stage_config(cfg, "rm"), "reward_model": name}
    rm = (AVARewardModel if name in AVA else RewardModel).from_policy(pi_init).to(cfg.device)
    if restore(rm, os.path.join(cfg.out_dir, f"rm_{name}.pt"), stage_cfg, vocab, f"rm {name}"):
        return rm
    half = cfg.batch_size // WORLD // 2
    if name == "ava_d":
        loss_of_batch = lambda model, b: ava_d_loss(model, b[0], b[1], cfg.ava_lambda, cfg.ava_gamma)
        batch_at = batch_sampler(tok["demos"], cfg, vocab, f"rm_{name}")
    elif name == "ava_p":
        def loss_of_batch(model, picked):
            idx, targets, _ = triples_batch(picked, cfg, vocab)
            return ava_p_loss(model, idx, targets, cfg.ava_lambda, cfg.ava_gamma)
        batch_at = row_sampler([tok["pref"]], half, cfg, f"rm_{name}")
    elif name == "pref":
        loss_of_batch = bradley_terry_loss_of(cfg, vocab)
        batch_at = row_sampler([tok["pref"]], half, cfg, f"rm_{name}")
    else:
        neg_src, pos_src = POINTWISE[name]
        source = {"init": list(zip(samples["rm_prompts"], samples["init"])),
                  "sft": list(zip(samples["rm_prompts"], samples["sft"])),
                  "demo": tok["demos"]}
        pos, neg = source[pos_src], source[neg_src]

        def loss_of_batch(model, picked):
            r = model(*pairs_batch(picked, cfg, vocab))
            return discriminator_loss(r[:half], r[half:])
        batch_at = row_sampler([pos, neg], half, cfg, f"rm_{name}")
    train_and_save(rm, f"rm_{name}", loss_of_batch, batch_at, cfg.rm_steps, cfg.rm_lr, cfg, vocab, stage_cfg)
    return rm


def bradley_terry_loss_of(cfg, vocab):
    """loss_of_batch on (prompt, chosen, rejected) triples: reward.bradley_terry_loss."""
    def loss_of_batch(model, picked):
        r = model(*triples_batch(picked, cfg, vocab))
        return bradley_terry_loss(r[:len(picked)], r[len(picked):])
    return loss_of_batch


def stage_gold(cfg, vocab, tok, pi_init):
    """The golden reward, golden(prompts, responses) -> (B,): the built-in task's program, or on
    real data a "gold" Bradley-Terry reward model trained on pairs that no evaluated reward
    model sees (a proxy for human judgement, as in reward over-optimisation studies).
    Returns (golden, what it is: a dict for results.json)."""
    if cfg.task == "synthetic":
        return program_golden(vocab), {"kind": "program", "function": "data.golden_reward"}
    stage_cfg = {**stage_config(cfg, "pretrain"), "gold_rm_steps": cfg.gold_rm_steps,
                 "gold_init_from": cfg.gold_init_from, "rm_lr": cfg.rm_lr}
    trunk = load_gpt2(cfg.gold_init_from, cfg) if cfg.gold_init_from else pi_init
    gold = RewardModel.from_policy(trunk).to(cfg.device)
    if not restore(gold, os.path.join(cfg.out_dir, "rm_gold.pt"), stage_cfg, vocab, "gold rm"):
        batch_at = row_sampler([tok["gold"]], cfg.batch_size // WORLD // 2, cfg, "rm_gold")
        train_and_save(gold, "rm_gold", bradley_terry_loss_of(cfg, vocab), batch_at, cfg.gold_rm_steps,
                       cfg.rm_lr, cfg, vocab, stage_cfg)
    prompts, _, chosen, rejected = map(list, zip(*tok["heldout"]))
    accuracy = pairwise_accuracy(score(gold, prompts, chosen, cfg, vocab), score(gold, prompts, rejected, cfg, vocab))
    info = {"kind": "gold reward model (a proxy)", "pairs": len(tok["gold"]), "steps": cfg.gold_rm_steps,
            "init_from": cfg.gold_init_from or "pi_init", "heldout_accuracy": accuracy}
    log(f"[gold] the golden reward is a proxy: a reward model trained on {len(tok['gold'])} pairs no "
        f"other model sees; held-out chosen > rejected accuracy {accuracy:.3f}")
    gold = frozen_copy(gold)
    return (lambda prompts, responses: score(gold, prompts, responses, cfg, vocab)), info


# each reward model's own kind of held-out pair: (should score higher, should score lower)
OWN_PAIRS = {"init_sft": ("sft_a", "init"), "init_demo": ("demo", "init"), "sft_demo": ("demo", "sft_a"),
             "pref": ("chosen", "rejected"), "logratio": ("sft_a", "init"),
             "ava_d": ("demo", "init"), "ava_p": ("chosen", "rejected")}


def stage_reward_models(cfg, vocab, tok, samples, pi_init, pi_sft, golden):
    scorers = {}
    for name in RM_NAMES:
        scorers[name] = (LogRatioReward(pi_sft, pi_init) if name == "logratio" else
                         train_reward_model(name, cfg, vocab, tok, samples, pi_init))
    # held-out pairs, one per held-out prompt: demo vs sft, chosen vs rejected, own data
    prompts, demos, chosen, rejected = map(list, zip(*tok["heldout"]))
    sft_a, sft_b = samples["heldout_sft"][0::2], samples["heldout_sft"][1::2]
    init = samples["heldout_init"]
    g_a, g_b = golden(prompts, sft_a), golden(prompts, sft_b)
    rows = []
    for name, scorer in scorers.items():
        s = {k: score(scorer, prompts, v, cfg, vocab) for k, v in
             [("demo", demos), ("chosen", chosen), ("rejected", rejected), ("init", init),
              ("sft_a", sft_a), ("sft_b", sft_b)]}
        differ = g_a != g_b  # pairs of SFT samples the golden reward tells apart
        better_is_a = g_a > g_b
        s_better = torch.where(better_is_a, s["sft_a"], s["sft_b"])[differ]
        s_worse = torch.where(better_is_a, s["sft_b"], s["sft_a"])[differ]
        better, worse = OWN_PAIRS[name]
        own = pairwise_accuracy(s[better], s[worse])
        rows.append({"name": name, "heldout_accuracy": own,
                     "acc_demo_vs_sft": pairwise_accuracy(s["demo"], s["sft_a"]),
                     "acc_chosen_vs_rejected": pairwise_accuracy(s["chosen"], s["rejected"]),
                     "acc_golden_sft_pairs": pairwise_accuracy(s_better, s_worse),
                     "n_golden_sft_pairs": int(differ.sum())})
    log("[rm] held-out accuracy (own data / demo>sft / chosen>rejected / golden order of sft pairs): "
        + "; ".join(f"{r['name']} {r['heldout_accuracy']:.2f}/{r['acc_demo_vs_sft']:.2f}/"
                    f"{r['acc_chosen_vs_rejected']:.2f}/{r['acc_golden_sft_pairs']:.2f}" for r in rows))
    return scorers, rows


# ----------------------------------------------------------------------------------------
# Policy optimisation (METHOD.md sections 1 and 2): every method starts from pi_sft and
# trains on the demonstration prompts; they differ in the reward and the reference of the
# one policy-gradient step (afd.rloo_loss), except IRFT, which has no explicit reward.

def prompt_sampler(cfg, tok, name):
    """batch_at(step): this rank's indices of demonstration prompts for a policy step."""
    return row_sampler([range(len(tok["demos"]))], max(1, cfg.pg_prompts // WORLD), cfg, name)


def rloo_loss_of(cfg, vocab, tok, name, ref, reward_of, policy):
    """loss_of_batch for fit: one RLOO step on the prompts of the batch (see afd.rloo_loss)."""
    def loss_of_batch(train_policy, picked):
        step_seed = stable_seed(cfg.seed, name, picked, RANK)
        gen = torch.Generator(cfg.device).manual_seed(step_seed)
        return rloo_loss(policy, ref, lambda *b: reward_of(picked, *b), [tok["demos"][i][0] for i in picked],
                         cfg.pg_group, cfg.beta_kl, cfg.max_new_tokens, vocab.eot_id, gen,
                         cfg.temperature, train_policy)
    return loss_of_batch


def method_rl_fixed(method, cfg, vocab, tok, pi_sft, scorers, stage_cfg):
    """RL on a fixed, already trained reward model (RL_ON_FIXED_RM: init_sft, the paper's RM
    used for training rather than reranking, or AVA-d's sum_t mu_t), KL to pi_sft."""
    policy, ref, rm = policy_copy(pi_sft), frozen_copy(pi_sft), scorers[RL_ON_FIXED_RM[method]]
    loss_of_batch = rloo_loss_of(cfg, vocab, tok, method, ref, lambda picked, *b: rm(*b), policy)
    train_and_save(policy, f"policy_{method}", loss_of_batch, prompt_sampler(cfg, tok, method),
                   cfg.pg_steps, cfg.pg_lr, cfg, vocab, stage_cfg)
    return policy


def method_adversarial(cfg, vocab, tok, pi_init, pi_sft, stage_cfg):
    """AfD reverse KL (mode-seeking): alternate a discriminator step (demonstrations against
    the policy's fresh samples, afd.discriminator_loss) and a policy step on r = logit(D)."""
    policy, ref = policy_copy(pi_sft), frozen_copy(pi_sft)
    disc = RewardModel.from_policy(pi_init).to(cfg.device)
    disc_opt = configure_optimizer(disc, cfg.disc_lr, cfg.weight_decay)
    disc_train = DistributedDataParallel(disc) if WORLD > 1 else disc
    stats = {}

    def reward_of(picked, idx, targets, last):
        with torch.enable_grad():  # a discriminator step first, then the reward of the samples
            disc.train()
            r_demo = disc_train(*pairs_batch([tok["demos"][i] for i in picked], cfg, vocab))
            r_pi = disc_train(idx, targets, last)
            loss = discriminator_loss(r_demo, r_pi)
            disc_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(disc.parameters(), cfg.grad_clip)
            disc_opt.step()
            disc.eval()
        stats["disc_acc"] = 0.5 * float((r_demo > 0).float().mean() + (r_pi < 0).float().mean())
        return disc(idx, targets, last)

    rloo = rloo_loss_of(cfg, vocab, tok, "adversarial", ref, reward_of, policy)

    def loss_of_batch(train_policy, picked):
        loss, step_stats = rloo(train_policy, picked)
        return loss, {**step_stats, **stats}
    train_and_save(policy, "policy_adversarial", loss_of_batch, prompt_sampler(cfg, tok, "adversarial"),
                   cfg.pg_steps, cfg.pg_lr, cfg, vocab, stage_cfg, aux=(disc, disc_opt))
    return policy


def own_samples(policy, cfg, vocab, tok, name):
    """One sample of the policy on n_round_samples demonstration prompts: (prompt, demo, sample)."""
    rng = random.Random(f"{cfg.seed}/{name}/prompts")
    picked = rng.sample(range(len(tok["demos"])), min(cfg.n_round_samples, len(tok["demos"])))
    prompts = [tok["demos"][i][0] for i in picked]
    samples = sample(policy, prompts, 1, cfg, vocab, stable_seed(cfg.seed, name), f"sample {name}")
    return [(p, tok["demos"][i][1], y) for p, i, y in zip(prompts, picked, samples)]



def triple_sampler(triples, cfg, name):
    """batch_at(step): (prompt, demonstration, sample) triples, half a batch of them."""
    return row_sampler([triples], max(1, cfg.batch_size // WORLD // 2), cfg, name)


def method_irl(cfg, vocab, tok, pi_init, pi_sft, stage_cfg):
    """Iterated IRL with an explicit reward (arXiv 2503.13538), rounds k = 0..K-1: sample pi_k,
    aggregate (demonstration, sample) pairs, Bradley-Terry reward steps with the
    demonstration as winner, then policy steps on that reward with KL to pi_k."""
    policy, rm, pairs = policy_copy(pi_sft), RewardModel.from_policy(pi_init).to(cfg.device), []
    steps = max(1, cfg.pg_steps // cfg.irl_rounds)
    for k in range(cfg.irl_rounds):
        round_cfg = {**stage_cfg, "round": k}
        pairs += own_samples(policy, cfg, vocab, tok, f"irl_round{k}")

        def rm_loss(model, triples):
            r = model(*triples_batch(triples, cfg, vocab))
            return bradley_terry_loss(r[:len(triples)], r[len(triples):])
        if not restore(rm, os.path.join(cfg.out_dir, f"irl_rm{k}.pt"), round_cfg, vocab, f"irl rm {k}"):
            train_and_save(rm, f"irl_rm{k}", rm_loss, triple_sampler(pairs, cfg, f"irl_rm{k}"),
                           cfg.irl_rm_steps, cfg.rm_lr, cfg, vocab, round_cfg)
        ref, scorer = frozen_copy(policy), frozen_copy(rm)
        if not restore(policy, os.path.join(cfg.out_dir, f"policy_irl{k}.pt"), round_cfg, vocab, f"irl policy {k}"):
            loss_of_batch = rloo_loss_of(cfg, vocab, tok, f"irl{k}", ref, lambda picked, *b: scorer(*b), policy)
            train_and_save(policy, f"policy_irl{k}", loss_of_batch, prompt_sampler(cfg, tok, f"irl{k}"),
                           steps, cfg.pg_lr, cfg, vocab, round_cfg)
    return policy


def method_irft(cfg, vocab, tok, pi_sft, stage_cfg):
    """IRFT (implicit reward; one stage = SPIN): in stage t, sample pi_t on demonstration
    prompts, then train on afd.irft_loss against the frozen pi_t."""
    policy = policy_copy(pi_sft)
    steps = max(1, cfg.pg_steps // cfg.irft_stages)
    for t in range(cfg.irft_stages):
        stage_t = {**stage_cfg, "stage": t}
        if restore(policy, os.path.join(cfg.out_dir, f"policy_irft{t}.pt"), stage_t, vocab, f"irft {t}"):
            continue
        triples, ref = own_samples(policy, cfg, vocab, tok, f"irft{t}"), frozen_copy(policy)

        def loss_of_batch(model, picked):
            idx, targets, _ = triples_batch(picked, cfg, vocab)
            logp = sequence_logprob(model, idx, targets)
            with torch.no_grad():
                logp_ref = sequence_logprob(ref, idx, targets)
            B = len(picked)
            return irft_loss(logp[:B], logp_ref[:B], logp[B:], logp_ref[B:], cfg.irft_beta)
        train_and_save(policy, f"policy_irft{t}", loss_of_batch, triple_sampler(triples, cfg, f"irft{t}"),
                       steps, cfg.pg_lr, cfg, vocab, stage_t)
    return policy


def stage_policies(cfg, vocab, tok, pi_init, pi_sft, scorers):
    """Every trained method of --methods: {policy name: policy}."""
    policies = {}
    for method in [m for m in methods_of(cfg) if m != "bon"]:
        name = POLICY_NAMES[method]
        stage_cfg = {**stage_config(cfg, "policy"), "method": method}
        path = os.path.join(cfg.out_dir, f"policy_{method}.pt")
        if method == "adversarial" or method in RL_ON_FIXED_RM:
            policy = policy_copy(pi_sft)
            if not restore(policy, path, stage_cfg, vocab, method):
                policy = (method_adversarial(cfg, vocab, tok, pi_init, pi_sft, stage_cfg) if method == "adversarial"
                          else method_rl_fixed(method, cfg, vocab, tok, pi_sft, scorers, stage_cfg))
        elif method == "irl":
            policy = method_irl(cfg, vocab, tok, pi_init, pi_sft, stage_cfg)
        else:
            policy = method_irft(cfg, vocab, tok, pi_sft, stage_cfg)
        policies[name] = policy
        log(f"[{method}] trained {name}")
    return policies


def stage_evaluate(cfg, task, vocab, tok, pi_init, pi_sft, scorers, trained, golden):
    prompts, P, N = tok["eval_prompts"], len(tok["eval_prompts"]), cfg.bon_n
    texts = task.eval_prompts
    responses = {"init": sample(pi_init, prompts, 1, cfg, vocab, cfg.seed + 5, "eval pi_init"),
                 "sft": sample(pi_sft, prompts, 1, cfg, vocab, cfg.seed + 6, "eval pi_sft"),
                 "demonstrations": tok["eval_demos"]}
    for name, policy in trained.items():  # the same sampling seed as SFT's
        responses[name] = sample(policy, prompts, 1, cfg, vocab, cfg.seed + 6, f"eval {name}")
    g = {name: golden(prompts, r) for name, r in responses.items()}
    policies = []
    for name in responses:
        m, se = mean_stderr(g[name])
        policies.append({"name": name, "golden_reward": m, "golden_reward_stderr": se,
                         "win_rate_vs_sft": mean_stderr(win_rate_indicator(g[name], g["sft"]))[0]})
        if name in trained:  # Monte-Carlo KL(pi || pi_sft) on the policy's own samples
            log_ratio = score(LogRatioReward(trained[name], pi_sft), prompts, responses[name], cfg, vocab)
            policies[-1]["kl_to_sft"], policies[-1]["kl_to_sft_stderr"] = kl_estimate(log_ratio, 0.0)
    tokens = token_rewards(scorers["ava_d"], prompts, texts, responses["sft"], g["sft"], cfg, vocab)
    if "bon" not in methods_of(cfg):
        log("[evaluate] golden reward " + ", ".join(f"{p['name']} {p['golden_reward']:.3f}" for p in policies))
        return policies, [], {name: [(texts[i], vocab.decode(responses[name][i])) for i in range(3)]
                              for name in responses}, tokens
    # Best-of-N: N candidates of pi_sft per prompt, every reward model, every n <= N
    candidates = sample(pi_sft, prompts, N, cfg, vocab, cfg.seed + 7, "bon pi_sft")
    flat_prompts = [p for p in prompts for _ in range(N)]
    g_cand = golden(flat_prompts, candidates).view(P, N)
    wins = win_rate_indicator(g_cand, g["sft"][:, None])  # (P, N) vs the SFT response
    bon_rows = []
    for name, scorer in progress(scorers.items(), desc="score candidates"):
        s = score(scorer, flat_prompts, candidates, cfg, vocab).view(P, N)
        if name == "init_sft":
            best_init_sft = best_of_n(s)  # (P,) shown in the report
        for n in [n for n in BON_SIZES if n <= N]:
            m, se = mean_stderr(best_of_n_estimate(s, g_cand, n))
            bon_rows.append({"rm": name, "n": n, "golden_reward": m, "golden_reward_stderr": se,
                             "win_rate_vs_sft": float(best_of_n_estimate(s, wins, n).mean()),
                             "kl_bound": kl_bound(n)})
    log("[evaluate] golden reward " + ", ".join(f"{p['name']} {p['golden_reward']:.3f}" for p in policies)
        + f"; best-of-{N} " + ", ".join(f"{b['rm']} {b['golden_reward']:.3f}" for b in bon_rows if b["n"] == N))
    examples = {name: [(texts[i], vocab.decode(responses[name][i])) for i in range(3)] for name in responses}
    examples[f"best-of-{N} init_sft"] = [(texts[i], vocab.decode(candidates[i * N + int(best_init_sft[i])]))
                                         for i in range(3)]
    return policies, bon_rows, examples, tokens


@torch.no_grad()
def token_rewards(ava, prompts, texts, responses, golden_rewards, cfg, vocab):
    """AVA's intermediate rewards on two evaluation responses, those with the highest and the
    lowest golden reward (the first of each): per response token, (text, mu, sigma)."""
    rows = []
    for i in dict.fromkeys([int(golden_rewards.argmax()), int(golden_rewards.argmin())]):  # first of ties
        idx, targets, _ = data.make_batch([prompts[i]], [responses[i]], vocab.eot_id, cfg.device)
        mu, sigma = ava.token_rewards(idx, targets)                  # (1, T) each
        at = (targets[0] != -100).nonzero().squeeze(1)
        rows.append({"prompt": texts[i], "response": vocab.decode(responses[i]),
                     "golden_reward": float(golden_rewards[i]), "sequence_reward": float(mu.sum()),
                     "tokens": [(vocab.decode([int(targets[0, t])]), float(mu[0, t]), float(sigma[0, t]))
                                for t in at]})
    return rows


# ----------------------------------------------------------------------------------------
# Results

def markdown_tables(results):
    lines = ["| policy | golden reward | win rate vs SFT | KL to SFT |", "|---|---|---|---|"]
    for p in results["policies"]:
        kl = (f"{p['kl_to_sft']:.2f} ± {p['kl_to_sft_stderr']:.2f}" if "kl_to_sft" in p
              else "0" if p["name"] == "sft" else "-")
        lines.append(f"| {p['name']} | {p['golden_reward']:.3f} ± {p['golden_reward_stderr']:.3f} | "
                     f"{p['win_rate_vs_sft']:.3f} | {kl} |")
    lines += ["", "| reward model | held-out acc. (own data) | demo > SFT | chosen > rejected | "
              "golden order of SFT pairs |", "|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['heldout_accuracy']:.3f} | {r['acc_demo_vs_sft']:.3f} | "
              f"{r['acc_chosen_vs_rejected']:.3f} | {r['acc_golden_sft_pairs']:.3f} |"
              for r in results["reward_models"]]
    ns = sorted({b["n"] for b in results["best_of_n"]})
    if not ns:
        return "\n".join(lines)
    lines += ["", "Best-of-n golden reward (± standard error) by reward model:", "",
              "| reward model | " + " | ".join(f"n={n}" for n in ns) + " |",
              "|---|" + "---|" * len(ns)]
    for rm in dict.fromkeys(b["rm"] for b in results["best_of_n"]):
        cells = [f"{b['golden_reward']:.3f} ± {b['golden_reward_stderr']:.3f}"
                 for b in results["best_of_n"] if b["rm"] == rm]
        lines.append(f"| {rm} | " + " | ".join(cells) + " |")
    lines.append("| KL bound | " + " | ".join(f"{kl_bound(n):.2f}" for n in ns) + " |")
    return "\n".join(lines)


def write_text_atomic(text, path):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def curve_names(cfg):
    """The training runs of each trained method, in order (their <name>.curve.jsonl files)."""
    runs = {"adversarial": ["policy_adversarial"], "rl_init_sft": ["policy_rl_init_sft"],
            "rl_ava_d": ["policy_rl_ava_d"],
            "irl": [f"policy_irl{k}" for k in range(cfg.irl_rounds)],
            "irft": [f"policy_irft{t}" for t in range(cfg.irft_stages)]}
    return {m: runs[m] for m in methods_of(cfg) if m in runs}


def curves_table(cfg):
    """Markdown: each policy-training run's loss, reward, KL and discriminator accuracy, the
    mean of its first and of its last 10 steps."""
    lines = ["| method | run | steps | loss | reward | KL to reference | discriminator accuracy |",
             "|---|---|---|---|---|---|---|"]
    for method, names in curve_names(cfg).items():
        for name in names:
            with open(os.path.join(cfg.out_dir, f"{name}.curve.jsonl")) as f:
                curve = [json.loads(line) for line in f]
            cell = lambda key: (f"{sum(r[key] for r in curve[:10]) / len(curve[:10]):.3f} -> "
                                f"{mean_of(curve, key, 10):.3f}" if key in curve[0] else "-")
            lines.append(f"| {method} | {name} | {len(curve)} | {cell('loss')} | {cell('reward')} | "
                         f"{cell('kl')} | {cell('disc_acc')} |")
    return "\n".join(lines)


def plot_golden_vs_kl(results, path):
    """Golden reward against KL to pi_sft: a Best-of-n curve per reward model (the KL bound)
    and a point per trained policy (Monte-Carlo KL). Needs matplotlib (optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("[plot] matplotlib is not installed: skipping golden_vs_kl.png (pip install matplotlib)")
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for rm in dict.fromkeys(b["rm"] for b in results["best_of_n"]):
        rows = [b for b in results["best_of_n"] if b["rm"] == rm]
        ax.errorbar([b["kl_bound"] for b in rows], [b["golden_reward"] for b in rows],
                    yerr=[b["golden_reward_stderr"] for b in rows], marker=".", capsize=2, label=f"BoN {rm}")
    points = [p for p in results["policies"] if "kl_to_sft" in p or p["name"] == "sft"]
    for p, marker in zip(points, "s^vD<>ph*"):  # black markers: policies; colours: BoN curves
        ax.errorbar([p.get("kl_to_sft", 0.0)], [p["golden_reward"]], yerr=[p["golden_reward_stderr"]],
                    xerr=[p.get("kl_to_sft_stderr", 0.0)], marker=marker, color="k", linestyle="none",
                    capsize=2, label=p["name"])
    ax.set_xscale("symlog", linthresh=0.1)  # a hacked reward can drive the KL far past BoN's
    ax.set_xlabel("KL to pi_sft (nats, symlog axis; BoN: the bound log n - (n-1)/n)")
    ax.set_ylabel("golden reward")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=120)
    os.replace(path + ".tmp.png", path)
    plt.close(fig)
    return True


def write_results(cfg, results, examples):
    write_text_atomic(json.dumps(results, indent=2), os.path.join(cfg.out_dir, "results.json"))
    report = [f"# Results: preset `{cfg.preset}`, seed {cfg.seed}, device {results['device']}, "
              f"{results['wall_time_s']:.0f} s", ""]
    gold = results["golden_reward"]
    if gold["kind"] != "program":
        report += [f"The golden reward here is a **proxy**: a reward model trained on {gold['pairs']} preference "
                   f"pairs that no evaluated model saw (from {gold['init_from']}, held-out chosen > rejected "
                   f"accuracy {gold['heldout_accuracy']:.3f}), not human judgement.", ""]
    report += [markdown_tables(results), ""]
    if curve_names(cfg):
        report += ["## Policy training (first 10 steps -> last 10 steps)", "", curves_table(cfg), ""]
    if plot_golden_vs_kl(results, os.path.join(cfg.out_dir, "golden_vs_kl.png")):
        report += ["![golden reward against KL](golden_vs_kl.png)", ""]
    report += ["## AVA-d per-token rewards (posterior mean and std of each response token's reward)", ""]
    for row in results["ava_token_rewards"]:
        report += [f"`{row['prompt']!r}` -> golden reward {row['golden_reward']:+.1f}, "
                   f"sum of means {row['sequence_reward']:+.2f}", "", "| token | mean | std |", "|---|---|---|"]
        report += [f"| `{text!r}` | {mu:+.2f} | {sigma:.2f} |" for text, mu, sigma in row["tokens"]] + [""]
    report += ["## Samples", ""]
    for name, rows in examples.items():
        report += [f"### {name}", ""] + [f"- `{p!r}` -> `{r!r}`" for p, r in rows] + [""]
    write_text_atomic("\n".join(report), os.path.join(cfg.out_dir, "report.md"))


def check_device_and_out_dir(cfg):
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        die(f"--device={cfg.device} but no CUDA GPU is visible; use --device=cpu")
    if cfg.task not in ("synthetic", "hh"):
        die(f"unknown --task={cfg.task!r}; choose synthetic (the built-in task) or hh (HH-RLHF)")
    if cfg.task == "hh" and not cfg.data_dir:
        die("--task=hh needs --data_dir=DIR, the folder holding harmless-base/ and helpful-base/ "
            "(see the README: getting HH-RLHF)")
    if cfg.gold_init_from and not cfg.init_from:
        die("--gold_init_from loads GPT-2 weights, which need GPT-2's vocabulary: set --init_from too")
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
    except OSError as e:
        die(f"cannot create --out_dir={cfg.out_dir!r}: {e.strerror}; pick a writable folder")
    if not os.access(cfg.out_dir, os.W_OK):
        die(f"--out_dir={cfg.out_dir!r} is not writable; pick a writable folder")


def saved_results(cfg):
    """results.json of an earlier run with the same config, or None."""
    try:
        with open(os.path.join(cfg.out_dir, "results.json")) as f:
            results = json.load(f)
    except (OSError, ValueError):
        return None
    return results if results.get("stage_config") == stage_config(cfg, "evaluate") else None


def main(argv):
    cfg = parse_args(argv)
    check_device_and_out_dir(cfg)
    setup_distributed(cfg)
    t0 = time.time()
    task, vocab, tok = stage_task(cfg)
    if (results := saved_results(cfg)) is not None:
        log(f"[evaluate] up to date: {cfg.out_dir}/results.json\n" + markdown_tables(results))
        return
    check_memory(cfg, vocab)
    pi_init = stage_pretrain(cfg, vocab, tok)
    pi_sft = stage_sft(cfg, vocab, tok, pi_init)
    samples = stage_sample(cfg, vocab, tok, pi_init, pi_sft)
    golden, golden_info = stage_gold(cfg, vocab, tok, pi_init)
    scorers, rm_rows = stage_reward_models(cfg, vocab, tok, samples, pi_init, pi_sft, golden)
    trained = stage_policies(cfg, vocab, tok, pi_init, pi_sft, scorers)
    policies, bon_rows, examples, tokens = stage_evaluate(cfg, task, vocab, tok, pi_init, pi_sft, scorers, trained,
                                                          golden)
    results = {"preset": cfg.preset, "seed": cfg.seed, "device": cfg.device, "task": cfg.task,
               "processes": WORLD, "config": asdict(cfg), "stage_config": stage_config(cfg, "evaluate"),
               "golden_reward": golden_info,
               "policies": policies,
               "reward_models": rm_rows, "best_of_n": bon_rows, "ava_token_rewards": tokens,
               "wall_time_s": time.time() - t0}
    if is_main():
        write_results(cfg, results, examples)
    log(markdown_tables(results))
    log(f"[done] {time.time() - t0:.0f} s; wrote {cfg.out_dir}/results.json and report.md")
    if WORLD > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
