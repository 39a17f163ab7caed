"""
The end-to-end Alignment-from-Demonstrations pipeline and its command line.

    python train.py                         # preset `cpu` (or `gpu` when CUDA is there)
    python train.py --preset=smoke          # the whole pipeline in under a minute (tests)
    python train.py --seed=1 --bon_n=16     # any Config field: --field=value

Stages (each prints a one-line summary; long ones show a tqdm bar):
 1. task      build the built-in task from the seed and its compact vocabulary
 2. pretrain  pi_init: language modelling on mixed-quality dialogues (the unaligned base)
 3. sft       pi_sft: forward KL to the demonstrator = SFT on the demonstrations
 4. sample    pi_init and pi_sft on the reward-model prompts (negatives and positives)
 5. rm        the reward models of reward.py, and their held-out accuracies
 6. bon       N samples of pi_sft per evaluation prompt, scored by every reward model
 7. evaluate  golden reward, win rate vs SFT, Best-of-n for every n <= N, KL bound
Outputs in --out_dir: pi_init.pt, pi_sft.pt, rm_<name>.pt, results.json, report.md.
"""
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import torch
from tqdm import tqdm

import data
from afd import (best_of_n, best_of_n_estimate, discriminator_loss, kl_bound, mean_stderr, sft_loss,
                 win_rate_indicator)
from model import GPT, GPTConfig, configure_optimizer, generate, num_params
from reward import (POINTWISE, RM_NAMES, LogRatioReward, RewardModel, bradley_terry_loss,
                    pairwise_accuracy)


@dataclass
class Config:
    preset: str = "cpu"
    out_dir: str = "out"
    seed: int = 0
    device: str = "auto"          # auto | cpu | cuda | cuda:N | mps
    task: str = "synthetic"
    # the task: how many prompts in each (disjoint) split
    n_pretrain: int = 6000
    n_demo: int = 1500
    n_rm: int = 600
    n_heldout: int = 200
    n_eval: int = 300
    multi_turn_prob: float = 0.3
    pref_noise_temp: float = 1.0  # Bradley-Terry temperature of the preference labels
    # the model (policy and reward models share it)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128
    dropout: float = 0.0
    # optimisation
    batch_size: int = 32
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    warmup_steps: int = 20
    pretrain_steps: int = 900
    pretrain_lr: float = 2e-3
    sft_steps: int = 40
    sft_lr: float = 5e-4
    rm_steps: int = 100
    rm_lr: float = 3e-4
    # sampling and Best-of-N
    temperature: float = 1.0
    top_k: int = 0                # 0 = no top-k filter
    max_new_tokens: int = 48
    n_rm_samples: int = 2         # samples of pi_init and of pi_sft per reward-model prompt
    bon_n: int = 32               # N: candidates per evaluation prompt
    sample_rows: int = 1024       # rows decoded at once
    bf16: bool = True             # bf16 autocast (CUDA only)


PRESETS = {
    "smoke": dict(n_pretrain=300, n_demo=100, n_rm=40, n_heldout=20, n_eval=24, n_layer=2,
                  n_head=2, n_embd=32, batch_size=16, pretrain_steps=30, sft_steps=15,
                  rm_steps=10, bon_n=8, max_new_tokens=32, warmup_steps=5),
    "cpu": dict(),
    "gpu": dict(n_pretrain=20000, n_demo=4000, n_rm=2000, n_heldout=500, n_eval=1000,
                n_layer=6, n_head=6, n_embd=384, batch_size=64, pretrain_steps=3000,
                pretrain_lr=1e-3, sft_steps=600, sft_lr=3e-4, rm_steps=400, rm_lr=1e-4,
                sample_rows=8192),
}
BON_SIZES = [1, 2, 4, 8, 16, 32, 64, 128]


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
    return cfg


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
# Small tools shared by the stages

def save_checkpoint(path, model, vocab, cfg):
    """Write then rename, so an interrupted save never leaves a broken file."""
    state = {"model": model.state_dict(), "model_config": asdict(model_config(cfg, vocab)),
             "vocab": vocab.ids}
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def model_config(cfg, vocab):
    return GPTConfig(block_size=cfg.block_size, vocab_size=len(vocab), n_layer=cfg.n_layer,
                     n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout)


def autocast(cfg):
    if cfg.device.startswith("cuda") and cfg.bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def fit(model, loss_of_batch, next_batch, steps, lr, cfg, desc):
    """AdamW with linear warm-up and cosine decay; returns the loss of each step."""
    opt = configure_optimizer(model, lr, cfg.weight_decay)
    model.train()
    losses = []
    for step in (bar := tqdm(range(steps), desc=desc, leave=False)):
        warm = min(1.0, (step + 1) / cfg.warmup_steps)
        for group in opt.param_groups:
            group["lr"] = lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        with autocast(cfg):
            loss = loss_of_batch(model, next_batch())
        if not torch.isfinite(loss):
            die(f"{desc}: the loss became {loss.item()} at step {step}; lower its learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


def pairs_batch(pairs, cfg, vocab, **kw):
    """data.make_batch on a list of (prompt, response) token-list pairs."""
    return data.make_batch([p for p, _ in pairs], [r for _, r in pairs], vocab.eot_id, cfg.device, **kw)


def batch_sampler(rows, rng, cfg, vocab, **kw):
    """A function drawing random batches of (prompt, response) token lists. Rows are drawn
    8 batches at a time and grouped by length, so that a batch holds little padding."""
    queue = []

    def next_batch():
        if not queue:
            pool = sorted((rows[rng.randrange(len(rows))] for _ in range(8 * cfg.batch_size)),
                          key=lambda row: len(row[0]) + len(row[1]))
            queue.extend(pool[i:i + cfg.batch_size] for i in range(0, len(pool), cfg.batch_size))
            rng.shuffle(queue)
        return pairs_batch(queue.pop(), cfg, vocab, **kw)
    return next_batch


def sample(policy, prompts, n, cfg, vocab, seed, desc):
    """n responses (token lists, ending with EOT if they ended) per prompt, prompt-major."""
    gen = torch.Generator(cfg.device).manual_seed(seed)
    per_call = max(1, cfg.sample_rows // n)
    out = []
    for i in tqdm(range(0, len(prompts), per_call), desc=desc, leave=False):
        with autocast(cfg):
            tokens, lengths = generate(policy, prompts[i:i + per_call], n, cfg.max_new_tokens,
                                       vocab.eot_id, cfg.temperature, cfg.top_k or None, gen)
        out += [row[:k] for row, k in zip(tokens.tolist(), lengths.tolist())]
    return out


@torch.no_grad()
def score(scorer, prompts, responses, cfg, vocab, batch=256):
    """Reward of each (prompt, response) pair: (B,) float tensor on the CPU."""
    out = []
    for i in range(0, len(prompts), batch):
        idx, targets, last = data.make_batch(prompts[i:i + batch], responses[i:i + batch],
                                             vocab.eot_id, cfg.device)
        with autocast(cfg):
            out.append(scorer(idx, targets, last).float().cpu())
    return torch.cat(out)


def golden(prompt_texts, responses, vocab):
    return torch.tensor([data.golden_reward(p, vocab.decode(r)) for p, r in zip(prompt_texts, responses)])


# ----------------------------------------------------------------------------------------
# The stages

def stage_task(cfg):
    task = data.build_task(cfg.seed, cfg.n_pretrain, cfg.n_demo, cfg.n_rm, cfg.n_heldout,
                           cfg.n_eval, cfg.multi_turn_prob, cfg.pref_noise_temp)
    vocab = data.Vocab.from_texts(task.texts())
    enc = vocab.encode
    tok = {
        "pretrain": [(enc(p), enc(r)) for p, r in task.pretrain],
        "demos": [(enc(p), enc(r)) for p, r in task.demos],
        "rm_prompts": [enc(p) for p in task.rm_prompts],
        "pref": [(enc(p), enc(c), enc(r)) for p, c, r in task.pref_pairs],
        "heldout": [tuple(enc(t) for t in row) for row in task.heldout],
        "eval_prompts": [enc(p) for p in task.eval_prompts],
        "eval_demos": [enc(r) for r in task.eval_demos],
    }
    too_long = max(len(p) + len(r) for p, r in tok["pretrain"] + tok["demos"])
    if too_long > cfg.block_size:
        die(f"a dialogue has {too_long} tokens > --block_size={cfg.block_size}; raise block_size")
    longest_prompt = max(map(len, tok["rm_prompts"] + tok["eval_prompts"]))
    if longest_prompt + cfg.max_new_tokens > cfg.block_size:
        die(f"a prompt of {longest_prompt} tokens + --max_new_tokens={cfg.max_new_tokens} exceeds "
            f"--block_size={cfg.block_size}; lower max_new_tokens or raise block_size")
    print(f"[task] {len(task.pretrain)} pre-training dialogues, {len(task.demos)} demonstrations, "
          f"{len(task.rm_prompts)} RM / {len(task.heldout)} held-out / {len(task.eval_prompts)} "
          f"evaluation prompts; vocabulary {len(vocab)} of 50257 GPT-2 tokens")
    return task, vocab, tok


def stage_pretrain(cfg, vocab, tok, rng):
    pi_init = GPT(model_config(cfg, vocab)).to(cfg.device)
    next_batch = batch_sampler(tok["pretrain"], rng, cfg, vocab, loss_on_prompt=True)
    losses = fit(pi_init, lambda m, b: m(b[0], b[1])[1], next_batch, cfg.pretrain_steps,
                 cfg.pretrain_lr, cfg, "pretrain pi_init")
    save_checkpoint(os.path.join(cfg.out_dir, "pi_init.pt"), pi_init, vocab, cfg)
    print(f"[pretrain] pi_init: {num_params(pi_init) / 1e6:.2f}M params, "
          f"loss {losses[0]:.3f} -> {sum(losses[-20:]) / len(losses[-20:]):.3f}")
    return pi_init


def stage_sft(cfg, vocab, tok, rng, pi_init):
    pi_sft = GPT(pi_init.config).to(cfg.device)
    pi_sft.load_state_dict(pi_init.state_dict())
    next_batch = batch_sampler(tok["demos"], rng, cfg, vocab)
    losses = fit(pi_sft, lambda m, b: sft_loss(m, b[0], b[1]), next_batch, cfg.sft_steps,
                 cfg.sft_lr, cfg, "sft pi_sft")
    save_checkpoint(os.path.join(cfg.out_dir, "pi_sft.pt"), pi_sft, vocab, cfg)
    print(f"[sft] response NLL {losses[0]:.3f} -> {sum(losses[-20:]) / len(losses[-20:]):.3f}")
    return pi_sft


def stage_sample(cfg, vocab, tok, pi_init, pi_sft):
    """pi_init and pi_sft samples on the RM prompts (training) and held-out prompts."""
    k = cfg.n_rm_samples
    heldout_prompts = [row[0] for row in tok["heldout"]]
    s = {"rm_prompts": [p for p in tok["rm_prompts"] for _ in range(k)],
         "init": sample(pi_init, tok["rm_prompts"], k, cfg, vocab, cfg.seed + 1, "sample pi_init"),
         "sft": sample(pi_sft, tok["rm_prompts"], k, cfg, vocab, cfg.seed + 2, "sample pi_sft"),
         "heldout_init": sample(pi_init, heldout_prompts, 1, cfg, vocab, cfg.seed + 3, "sample pi_init"),
         "heldout_sft": sample(pi_sft, heldout_prompts, 2, cfg, vocab, cfg.seed + 4, "sample pi_sft")}
    print(f"[sample] {len(s['init'])} pi_init and {len(s['sft'])} pi_sft samples on RM prompts, "
          f"{len(s['heldout_sft'])} pi_sft on held-out prompts")
    return s


def train_reward_model(name, cfg, vocab, tok, samples, rng, pi_init):
    """One reward model of reward.RM_NAMES trained on its data (see the table in reward.py)."""
    rm = RewardModel.from_policy(pi_init).to(cfg.device)
    half = cfg.batch_size // 2
    if name == "pref":
        pairs = tok["pref"]

        def loss_of_batch(model, picked):
            r = model(*pairs_batch([(p, c) for p, c, _ in picked] + [(p, r) for p, _, r in picked], cfg, vocab))
            return bradley_terry_loss(r[:len(picked)], r[len(picked):])
        next_batch = lambda: [pairs[rng.randrange(len(pairs))] for _ in range(half)]
    else:
        neg_src, pos_src = POINTWISE[name]
        demos = tok["demos"]
        source = {"init": list(zip(samples["rm_prompts"], samples["init"])),
                  "sft": list(zip(samples["rm_prompts"], samples["sft"])),
                  "demo": demos}
        pos, neg = source[pos_src], source[neg_src]

        def loss_of_batch(model, picked):
            r = model(*pairs_batch(picked, cfg, vocab))
            return discriminator_loss(r[:half], r[half:])
        next_batch = lambda: ([pos[rng.randrange(len(pos))] for _ in range(half)] +
                              [neg[rng.randrange(len(neg))] for _ in range(half)])
    fit(rm, loss_of_batch, next_batch, cfg.rm_steps, cfg.rm_lr, cfg, f"rm {name}")
    save_checkpoint(os.path.join(cfg.out_dir, f"rm_{name}.pt"), rm, vocab, cfg)
    return rm


# each reward model's own kind of held-out pair: (should score higher, should score lower)
OWN_PAIRS = {"init_sft": ("sft_a", "init"), "init_demo": ("demo", "init"), "sft_demo": ("demo", "sft_a"),
             "pref": ("chosen", "rejected"), "logratio": ("sft_a", "init")}


def stage_reward_models(cfg, vocab, tok, samples, rng, pi_init, pi_sft):
    scorers = {}
    for name in RM_NAMES:
        scorers[name] = (LogRatioReward(pi_sft, pi_init) if name == "logratio" else
                         train_reward_model(name, cfg, vocab, tok, samples, rng, pi_init))
    # held-out pairs, one per held-out prompt: demo vs sft, chosen vs rejected, own data
    prompts, demos, chosen, rejected = map(list, zip(*tok["heldout"]))
    sft_a, sft_b = samples["heldout_sft"][0::2], samples["heldout_sft"][1::2]
    init = samples["heldout_init"]
    prompt_text = [vocab.decode(p) for p in prompts]
    g_a, g_b = golden(prompt_text, sft_a, vocab), golden(prompt_text, sft_b, vocab)
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
    print("[rm] held-out accuracy (own data / demo>sft / chosen>rejected / golden order of sft pairs): "
          + "; ".join(f"{r['name']} {r['heldout_accuracy']:.2f}/{r['acc_demo_vs_sft']:.2f}/"
                      f"{r['acc_chosen_vs_rejected']:.2f}/{r['acc_golden_sft_pairs']:.2f}" for r in rows))
    return scorers, rows


def stage_evaluate(cfg, task, vocab, tok, pi_init, pi_sft, scorers):
    prompts, P, N = tok["eval_prompts"], len(tok["eval_prompts"]), cfg.bon_n
    texts = task.eval_prompts
    responses = {"init": sample(pi_init, prompts, 1, cfg, vocab, cfg.seed + 5, "eval pi_init"),
                 "sft": sample(pi_sft, prompts, 1, cfg, vocab, cfg.seed + 6, "eval pi_sft"),
                 "demonstrations": tok["eval_demos"]}
    g = {name: golden(texts, r, vocab) for name, r in responses.items()}
    policies = []
    for name in responses:
        m, se = mean_stderr(g[name])
        policies.append({"name": name, "golden_reward": m, "golden_reward_stderr": se,
                         "win_rate_vs_sft": mean_stderr(win_rate_indicator(g[name], g["sft"]))[0]})
    # Best-of-N: N candidates of pi_sft per prompt, every reward model, every n <= N
    candidates = sample(pi_sft, prompts, N, cfg, vocab, cfg.seed + 7, "bon pi_sft")
    flat_prompts = [p for p in prompts for _ in range(N)]
    g_cand = golden([t for t in texts for _ in range(N)], candidates, vocab).view(P, N)
    wins = win_rate_indicator(g_cand, g["sft"][:, None])  # (P, N) vs the SFT response
    bon_rows = []
    for name, scorer in tqdm(scorers.items(), desc="score candidates", leave=False):
        s = score(scorer, flat_prompts, candidates, cfg, vocab).view(P, N)
        if name == "init_sft":
            best_init_sft = best_of_n(s)  # (P,) shown in the report
        for n in [n for n in BON_SIZES if n <= N]:
            m, se = mean_stderr(best_of_n_estimate(s, g_cand, n))
            bon_rows.append({"rm": name, "n": n, "golden_reward": m, "golden_reward_stderr": se,
                              "win_rate_vs_sft": float(best_of_n_estimate(s, wins, n).mean()),
                              "kl_bound": kl_bound(n)})
    print("[evaluate] golden reward " + ", ".join(f"{p['name']} {p['golden_reward']:.3f}" for p in policies)
          + f"; best-of-{N} " + ", ".join(f"{b['rm']} {b['golden_reward']:.3f}" for b in bon_rows if b["n"] == N))
    examples = {name: [(texts[i], vocab.decode(responses[name][i])) for i in range(3)] for name in responses}
    examples[f"best-of-{N} init_sft"] = [(texts[i], vocab.decode(candidates[i * N + int(best_init_sft[i])]))
                                         for i in range(3)]
    return policies, bon_rows, examples


# ----------------------------------------------------------------------------------------
# Results

def markdown_tables(results):
    lines = ["| policy | golden reward | win rate vs SFT |", "|---|---|---|"]
    lines += [f"| {p['name']} | {p['golden_reward']:.3f} ± {p['golden_reward_stderr']:.3f} | "
              f"{p['win_rate_vs_sft']:.3f} |" for p in results["policies"]]
    lines += ["", "| reward model | held-out acc. (own data) | demo > SFT | chosen > rejected | "
              "golden order of SFT pairs |", "|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['heldout_accuracy']:.3f} | {r['acc_demo_vs_sft']:.3f} | "
              f"{r['acc_chosen_vs_rejected']:.3f} | {r['acc_golden_sft_pairs']:.3f} |"
              for r in results["reward_models"]]
    ns = sorted({b["n"] for b in results["best_of_n"]})
    lines += ["", "Best-of-n golden reward (± standard error) by reward model:", "",
              "| reward model | " + " | ".join(f"n={n}" for n in ns) + " |",
              "|---|" + "---|" * len(ns)]
    for rm in dict.fromkeys(b["rm"] for b in results["best_of_n"]):
        cells = [f"{b['golden_reward']:.3f} ± {b['golden_reward_stderr']:.3f}"
                 for b in results["best_of_n"] if b["rm"] == rm]
        lines.append(f"| {rm} | " + " | ".join(cells) + " |")
    lines.append("| KL bound | " + " | ".join(f"{kl_bound(n):.2f}" for n in ns) + " |")
    return "\n".join(lines)


def write_results(cfg, results, examples):
    with open(os.path.join(cfg.out_dir, "results.json.tmp"), "w") as f:
        json.dump(results, f, indent=2)
    os.replace(os.path.join(cfg.out_dir, "results.json.tmp"), os.path.join(cfg.out_dir, "results.json"))
    report = [f"# Results: preset `{cfg.preset}`, seed {cfg.seed}, device {results['device']}, "
              f"{results['wall_time_s']:.0f} s", "", markdown_tables(results), "", "## Samples", ""]
    for name, rows in examples.items():
        report += [f"### {name}", ""] + [f"- `{p!r}` -> `{r!r}`" for p, r in rows] + [""]
    with open(os.path.join(cfg.out_dir, "report.md"), "w") as f:
        f.write("\n".join(report))


def main(argv):
    cfg = parse_args(argv)
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        die("--device=cuda but no CUDA GPU is visible; use --device=cpu")
    if cfg.task != "synthetic":
        die(f"unknown --task={cfg.task!r}; only 'synthetic' (the built-in task) exists")
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
    except OSError as e:
        die(f"cannot create --out_dir={cfg.out_dir!r}: {e.strerror}; pick a writable folder")
    if not os.access(cfg.out_dir, os.W_OK):
        die(f"--out_dir={cfg.out_dir!r} is not writable; pick a writable folder")
    t0 = time.time()
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    task, vocab, tok = stage_task(cfg)
    pi_init = stage_pretrain(cfg, vocab, tok, rng)
    pi_sft = stage_sft(cfg, vocab, tok, rng, pi_init)
    samples = stage_sample(cfg, vocab, tok, pi_init, pi_sft)
    scorers, rm_rows = stage_reward_models(cfg, vocab, tok, samples, rng, pi_init, pi_sft)
    policies, bon_rows, examples = stage_evaluate(cfg, task, vocab, tok, pi_init, pi_sft, scorers)
    results = {"preset": cfg.preset, "seed": cfg.seed, "device": cfg.device, "task": cfg.task,
               "config": asdict(cfg), "policies": policies, "reward_models": rm_rows,
               "best_of_n": bon_rows, "wall_time_s": time.time() - t0}
    write_results(cfg, results, examples)
    print(markdown_tables(results))
    print(f"[done] {time.time() - t0:.0f} s; wrote {cfg.out_dir}/results.json and report.md")


if __name__ == "__main__":
    main(sys.argv[1:])
