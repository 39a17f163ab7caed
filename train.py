"""
The pipeline: its stages in order, and the results. The methods, their training loops and their
reward models' recipe are in afd.py; the command line in cli.py; checkpoints and the stage cache
in checkpoint.py and training.py; processes under torchrun in parallel.py.

    python train.py                         # preset `cpu` (or `gpu` when CUDA is there)
    python train.py --preset=smoke          # the whole pipeline in seconds (the tests use it)
    python train.py --seed=1 --bon_n=16     # any Config field: --field=value or --field value
    python train.py --help                  # every field, its default and what it does
    python train.py --task=hh --data_dir=DIR --init_from=gpt2   # HH-RLHF from pre-trained GPT-2
    torchrun --standalone --nproc_per_node=2 train.py   # data-parallel on 2 GPUs (or CPU processes)

Stages, in run_pipeline(): task (the built-in task or HH-RLHF, and its vocabulary), pretrain
(pi_init), sft (pi_sft), sample (pi_init's and pi_sft's responses for the reward models), rm (the
gold reward model on real data, then those of reward.py), policy (the trained methods of afd.py),
evaluate (golden reward, win rate and KL of every policy; Best-of-n with every reward model).
Outputs in --out_dir: a <name>.pt and <name>.curve.jsonl per trained model, samples.pt,
results.json, report.md and golden_vs_kl.png (report.py).

A rerun with the same --out_dir loads every result made with the same config and code
(checkpoint.stage_config) and redoes the rest; an interrupted training run restarts from its
<name>.resume.pt. Batches are a function of (seed, label, step, rank), so a resumed run equals an
uninterrupted one.
"""
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist

import afd
import data
import gpt2
import parallel
import realdata
from checkpoint import (STAGE_CODE, STAGE_LINES, STAGE_TIMES, WriteError, changes, check_code_tables, check_out_dir,
                        code_versions,
                        out_dir_lock, said, save_atomic, saved_result, stage_config, timed)
from cli import BON_SIZES, METHODS, check_memory, die, methods_of, model_config, parse_args
from model import GPT, configure_optimizer, frozen_copy, num_params
from parallel import autocast, is_main, log, progress, sample, score, score_kinds
from report import markdown_tables, read_results, results_digest, write_report, write_text
from reward import RM_NAMES, ExpectedReturn, LogRatioReward, RewardModel, heldout_accuracies, pairwise_accuracy, \
    pairwise_loss
from training import Batches, Checkpoint, Stage


# ----------------------------------------------------------------------------------------
# The stages

@timed("task")
def stage_task(cfg):
    """The task's text, its vocabulary, and its splits as token lists."""
    sizes = (cfg.n_pretrain, cfg.n_demo, cfg.n_rm, cfg.n_heldout, cfg.n_eval)
    try:
        if cfg.task == "hh":
            task, notes = realdata.read_hh_task(cfg.data_dir, cfg.subset, cfg.skip_bad_lines, cfg.seed, *sizes,
                                                cfg.n_gold)
            log("\n".join(f"[task] {note}" for note in notes))
        else:
            task = data.build_task(cfg.seed, *sizes, cfg.multi_turn_prob, cfg.pref_noise_temp)
            if cfg.demo_error > 0:  # an imperfect demonstrator
                flaws = data.flaw_demonstrations(task, cfg.demo_error, cfg.seed)["demonstrations"]
                counts = {kind: flaws.count(kind) for kind in data.DEMO_ERRORS}
                log(f"[task] --demo_error={cfg.demo_error}: {sum(counts.values())} of {len(flaws)} demonstrations "
                    f"carry a mistake (" + ", ".join(f"{kind} {n}" for kind, n in counts.items()) + ")")
        demo_source = [f"demonstration {i + 1}" for i in range(len(task.demos))]
        if cfg.demos:
            task.demos, lines = realdata.read_demos(cfg.demos)
            demo_source = [f"{cfg.demos} line {k}" for k in lines]
        if cfg.task == "hh":  # real dialogues are long: shorten them to the context, and count
            counts = realdata.fit_to_context(task, cfg.block_size, cfg.max_new_tokens)
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
    log("[task] --drop_leaks: dropped " + ", ".join(f"{n} {split} rows" for split, n in dropped.items())
        + f" whose prompts are also held-out or evaluation prompts ({where})")


def load_gpt2(name_or_path, cfg):
    """A GPT with pre-trained GPT-2 weights (gpt2.from_gpt2), or a clear error."""
    if parallel.WORLD > 1 and not is_main():
        dist.barrier()  # rank 0 downloads first; the others then find the files in the cache
    try:
        model = gpt2.from_gpt2(name_or_path).to(cfg.device)
    except (OSError, ValueError, RuntimeError) as e:
        die(f"--init_from={name_or_path}: {e}")
    if parallel.WORLD > 1 and is_main():
        dist.barrier()
    if model.config.block_size < cfg.block_size:
        die(f"--block_size={cfg.block_size} is longer than {name_or_path}'s context "
            f"({model.config.block_size}); lower --block_size")
    return model


@timed("pretrain")
def stage_pretrain(cfg, vocab, splits, batches):
    """pi_init: a GPT pre-trained on the mixed-quality corpus (next-token loss on whole dialogues),
    or pre-trained GPT-2 with --init_from."""
    if cfg.init_from:  # a pre-trained GPT-2 replaces pre-training
        pi_init = load_gpt2(cfg.init_from, cfg)
        log(f"[pretrain] pi_init = {cfg.init_from}: {num_params(pi_init) / 1e6:.1f}M params, no pre-training")
        return pi_init
    torch.manual_seed(cfg.seed)
    pi_init = GPT(model_config(cfg, vocab)).to(cfg.device)
    log(f"[pretrain] pi_init: {num_params(pi_init) / 1e6:.2f}M params")
    opt = configure_optimizer(pi_init, cfg.pretrain_lr, cfg.weight_decay)
    ckpt = Checkpoint(Stage(cfg, vocab, stage_config(cfg, "pretrain")), "pi_init", model=pi_init, opt=opt)
    for step in ckpt.steps(cfg.pretrain_steps):
        idx, targets, _ = batches.pairs(splits["pretrain"], "pretrain", step, loss_on_prompt=True)
        with autocast(cfg):
            _, loss = pi_init(idx, targets)
        afd.optimizer_step(pi_init, opt, loss, afd.lr_at(step, cfg.pretrain_steps, cfg.pretrain_lr, cfg), cfg.grad_clip)
        ckpt.log(step, loss)
    return pi_init


@timed("sft")
def stage_sft(cfg, vocab, batches, pi_init):
    return afd.sft(pi_init, batches, Stage(cfg, vocab, stage_config(cfg, "sft")), cfg)


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
    k, demos, eos = cfg.n_rm_samples, splits["demos"], vocab.eot_id
    picked = random.Random(f"{cfg.seed}/tailored_rm_prompts").sample(range(len(demos)), min(cfg.n_rm, len(demos)))
    prompts = [demos[i][0] for i in picked]
    heldout_prompts = [row[0] for row in splits["heldout"]]
    samples = {"prompts": prompts, "demos": [demos[i][1] for i in picked],
               "init": sample(pi_init, prompts, k, cfg, eos, cfg.seed + 1, "sample pi_init"),
               "sft": sample(pi_sft, prompts, k, cfg, eos, cfg.seed + 2, "sample pi_sft"),
               "heldout_init": sample(pi_init, heldout_prompts, 1, cfg, eos, cfg.seed + 3, "sample pi_init"),
               "heldout_sft": sample(pi_sft, heldout_prompts, 2, cfg, eos, cfg.seed + 4, "sample pi_sft")}
    save_atomic({"samples": samples, "stage_config": stage_cfg}, path)
    said("sample", f"sampled {len(samples['init'])} pi_init and {len(samples['sft'])} pi_sft responses on "
                   f"{len(prompts)} demonstration prompts, {len(samples['heldout_sft'])} pi_sft on held-out prompts")
    return samples


@timed("gold")
def stage_gold(cfg, vocab, splits, batches, pi_init):
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
    opt = configure_optimizer(gold, cfg.rm_lr, cfg.weight_decay)
    ckpt = Checkpoint(Stage(cfg, vocab, stage_cfg), "rm_gold", rm=gold, opt=opt)
    for step in ckpt.steps(cfg.gold_rm_steps):  # Bradley-Terry on the gold pairs
        with autocast(cfg):
            loss = pairwise_loss(gold, batches.triples(splits["gold"], "rm_gold", step))
        afd.optimizer_step(gold, opt, loss, afd.lr_at(step, cfg.gold_rm_steps, cfg.rm_lr, cfg), cfg.grad_clip)
        ckpt.log(step, loss)
    prompts, _, chosen, rejected = map(list, zip(*splits["heldout"]))
    eos = vocab.eot_id
    accuracy = pairwise_accuracy(score(gold, prompts, chosen, cfg, eos), score(gold, prompts, rejected, cfg, eos))
    info = {"kind": "gold reward model (a proxy)", "pairs": len(splits["gold"]), "steps": cfg.gold_rm_steps,
            "init_from": cfg.gold_init_from or "pi_init", "heldout_accuracy": accuracy}
    log(f"[gold] the golden reward is a proxy: a reward model trained on {len(splits['gold'])} pairs no "
        f"other model sees; held-out chosen > rejected accuracy {accuracy:.3f}")
    gold = frozen_copy(gold)
    return (lambda prompts, responses: score(gold, prompts, responses, cfg, eos)), info


@timed("rm")
def stage_reward_models(cfg, vocab, splits, batches, samples, pi_init, pi_sft, golden):
    """Every reward model of reward.RM_NAMES (afd.train_reward_model; logratio needs no training),
    and its accuracies on held-out pairs."""
    reward_models = {}
    for name in RM_NAMES:
        with timed(f"rm/{name}"):
            reward_models[name] = (LogRatioReward(pi_sft, pi_init) if name == "logratio" else afd.train_reward_model(
                name, pi_init, splits["demos"], splits["pref"], samples, batches,
                Stage(cfg, vocab, stage_config(cfg, "rm", unit=name)), cfg))
    # held-out pairs, one per held-out prompt: demo vs sft, chosen vs rejected, own data
    prompts, demos, chosen, rejected = map(list, zip(*splits["heldout"]))
    sft_a, sft_b = samples["heldout_sft"][0::2], samples["heldout_sft"][1::2]
    golden_a, golden_b = golden(prompts, sft_a), golden(prompts, sft_b)
    kinds = {"demo": demos, "chosen": chosen, "rejected": rejected, "init": samples["heldout_init"],
             "sft_a": sft_a, "sft_b": sft_b}
    rows = []
    for name, rm in reward_models.items():
        with timed(f"rm/{name}"):
            scores = score_kinds(rm, prompts, kinds, cfg, vocab.eot_id)
        rows.append({"name": name, **heldout_accuracies(name, scores, golden_a, golden_b)})
    log("[rm] held-out accuracy (own data / demo>sft / chosen>rejected / golden order of sft pairs): "
        + "; ".join(f"{r['name']} {r['heldout_accuracy']:.2f}/{r['acc_demo_vs_sft']:.2f}/"
                    f"{r['acc_chosen_vs_rejected']:.2f}/{r['acc_golden_sft_pairs']:.2f}" for r in rows))
    return reward_models, rows


@timed("policy")
def stage_policies(cfg, vocab, batches, pi_init, pi_sft, reward_models):
    """Each trained method of --methods (afd.py), from pi_sft: {method: policy}."""
    policies = {}
    for method in [m for m in methods_of(cfg) if m != "bon"]:
        with timed(f"policy/{method}"):
            stage = Stage(cfg, vocab, stage_config(cfg, "policy", unit=method))
            policies[method] = train_method(method, cfg, batches, stage, pi_init, pi_sft, reward_models)
        log(f"[{method}] done")
    return policies


def train_method(method, cfg, batches, stage, pi_init, pi_sft, reward_models):
    """One trained method of afd.py (a --methods name other than bon), from pi_sft: its policy."""
    if method == "afd_adversarial":
        return afd.afd_adversarial(pi_init, pi_sft, batches, stage, cfg)
    if method == "irl_iterated":
        return afd.irl_iterated(pi_sft, batches, stage, cfg)
    if method == "irft":
        return afd.irft(pi_sft, batches, stage, cfg)
    if method == "ava_d_direct":
        return afd.ava_d_direct(pi_sft, batches, stage, cfg)
    reward_model = reward_models[method[3:]]  # rl_<rm>: RL on reward model <rm>
    if method == "rl_ava_d":  # AVA's RL reward: the expected return sum_t E[R_t] (Eq. 19)
        reward_model = ExpectedReturn(reward_model)
    return afd.rl_on_reward(method, pi_sft, reward_model, batches, stage, cfg)


# ----------------------------------------------------------------------------------------
# Evaluation

def golden_parts(prompts, responses, cfg, P, N):
    """{part: (P, N)} of data.golden_parts on the built-in task (None on real data, whose
    golden reward is a model): prompts (P,) texts, responses (P * N,) texts, prompt-major."""
    if cfg.task != "synthetic":
        return None
    rows = [data.golden_parts(prompts[i // N], r) for i, r in enumerate(responses)]
    return {part: torch.tensor([row[part] for row in rows], dtype=torch.float64).view(P, N) for part in rows[0]}


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


def best_of_n_rows(estimates, parts, task):
    """The results rows of afd.best_of_n_evaluation: for each picker and n, the golden reward (mean,
    standard error), the win rate against SFT's response and the KL bound; on the built-in task
    each part of the golden reward and the golden reward by kind of prompt; share_of_ceiling."""
    rows = []
    for name, by_n in estimates.items():
        vote = name == "majority" or name.startswith("weighted_")  # a vote's pick: KL(. || pi_sft) <= log n
        for n, est in by_n.items():
            m, se = afd.mean_stderr(est["golden"])
            rows.append({"rm": name, "n": n, "golden_reward": m, "golden_reward_stderr": se,
                         "win_rate_vs_sft": float(est["win"].mean()),
                         "kl_bound": math.log(n) if vote else afd.kl_bound(n)})
            if parts is not None:
                rows[-1]["parts"] = {part: float(est[part].mean()) for part in parts}
                rows[-1]["kinds"] = by_kind(est["golden"], task)
    add_share_of_ceiling(rows)
    return rows


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
    prompts, P, N, eos = splits["eval_prompts"], len(splits["eval_prompts"]), cfg.bon_n, vocab.eot_id
    with timed("evaluate/sample policies"):
        responses = {"init": sample(pi_init, prompts, 1, cfg, eos, cfg.seed + 5, "eval pi_init"),
                     "sft": sample(pi_sft, prompts, 1, cfg, eos, cfg.seed + 6, "eval pi_sft"),
                     "demonstrations": splits["eval_demos"]}
        for name, policy in trained.items():  # the same sampling seed as SFT's
            responses[name] = sample(policy, prompts, 1, cfg, eos, cfg.seed + 6, f"eval {name}")
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
                log_ratio = score(LogRatioReward(trained[name], pi_sft), prompts, responses[name], cfg, eos)
            policies[-1]["kl_to_sft"], policies[-1]["kl_to_sft_stderr"] = afd.kl_estimate(log_ratio, 0.0)
    # AVA-d's per-token rewards on the SFT responses with the highest and the lowest golden reward
    tokens = [{"prompt": task.eval_prompts[i], "response": vocab.decode(responses["sft"][i]),
               "golden_reward": float(golden_of["sft"][i]),
               **reward_models["ava_d"].token_table(prompts[i], responses["sft"][i], eos, vocab.decode)}
              for i in dict.fromkeys([int(golden_of["sft"].argmax()), int(golden_of["sft"].argmin())])]
    shown = range(min(3, P))  # the report's example prompts
    examples = {name: [(task.eval_prompts[i], vocab.decode(responses[name][i])) for i in shown]
                for name in responses}
    bon_rows = []
    if "bon" in methods_of(cfg):  # Best-of-N: N candidates of pi_sft per prompt, every RM, every n <= N
        with timed("evaluate/sample candidates"):
            candidates = sample(pi_sft, prompts, N, cfg, eos, cfg.seed + 7, "bon pi_sft")
        flat_prompts = [p for p in prompts for _ in range(N)]
        golden_cand = golden(flat_prompts, candidates).view(P, N)
        scores = {}
        for name, rm in progress(reward_models.items(), desc="score candidates"):
            with timed(f"evaluate/score {name}"):
                scores[name] = score(rm, flat_prompts, candidates, cfg, eos).view(P, N)
        best = afd.best_of_n(scores["init_sft"])  # (P,) shown in the report
        examples[f"best-of-{N} init_sft"] = [(task.eval_prompts[i], vocab.decode(candidates[i * N + int(best[i])]))
                                             for i in shown]
        parts = golden_parts(task.eval_prompts, [vocab.decode(c) for c in candidates], cfg, P, N)
        values = {"golden": golden_cand, "win": afd.win_rate_indicator(golden_cand, golden_of["sft"][:, None]),
                  **(parts or {})}  # (P, N) each; win: against the SFT response
        estimates = afd.best_of_n_evaluation(scores, golden_cand, text_ids(candidates, P, N), values,
                                             [n for n in BON_SIZES if n <= N], cfg.seed)
        bon_rows = best_of_n_rows(estimates, parts, task)
    log("[evaluate] golden reward " + ", ".join(f"{p['name']} {p['golden_reward']:.3f}" for p in policies)
        + (f"; best-of-{N} " + ", ".join(f"{b['rm']} {b['golden_reward']:.3f}" for b in bon_rows if b["n"] == N)
           if bon_rows else ""))
    said("evaluate", f"golden reward of {', '.join(responses)} on {P} evaluation prompts"
                     + (f", and {N} pi_sft candidates per prompt scored by {len(reward_models)} reward models"
                        if bon_rows else ""))
    return policies, bon_rows, examples, tokens


# ----------------------------------------------------------------------------------------
# The run

def saved_results(cfg):
    """results.json of an earlier run with the same config and code, or None. A file that is not what
    a run wrote (report.read_results) is redone from the checkpoints, with one line saying so."""
    path = os.path.join(cfg.out_dir, "results.json")
    results, problem = read_results(path)
    if problem:
        if os.path.lexists(path):
            log(f"[evaluate] {path}: {problem}; redoing the evaluation")
        return None
    if results.get("stage_config") != (current := stage_config(cfg, "evaluate")):
        log(f"[evaluate] {changes(results.get('stage_config', {}), current)} since {path}: redoing it")
        return None
    return results


def main(argv, host_fix=None):
    """The whole pipeline for a command line; returns the results (results.json). host_fix: see
    cli.check_memory."""
    cfg = parse_args(argv)
    check_code_tables(METHODS, RM_NAMES)  # the stage cache's tables name code that is there
    STAGE_LINES.clear()
    STAGE_TIMES.clear()
    check_out_dir(cfg)
    parallel.setup_distributed(cfg)
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
    check_memory(cfg, vocab, parallel.WORLD, host_fix)
    batches = Batches(cfg, vocab.eot_id, splits["demos"])
    pi_init = stage_pretrain(cfg, vocab, splits, batches)
    pi_sft = stage_sft(cfg, vocab, batches, pi_init)
    samples = stage_sample(cfg, vocab, splits, pi_init, pi_sft)
    golden, golden_info = stage_gold(cfg, vocab, splits, batches, pi_init)
    reward_models, rm_rows = stage_reward_models(cfg, vocab, splits, batches, samples, pi_init, pi_sft, golden)
    trained = stage_policies(cfg, vocab, batches, pi_init, pi_sft, reward_models)
    policies, bon_rows, examples, tokens = stage_evaluate(cfg, task, vocab, splits, pi_init, pi_sft,
                                                          reward_models, trained, golden)
    results = {"preset": cfg.preset, "seed": cfg.seed, "device": cfg.device, "task": cfg.task,
               "processes": parallel.WORLD, "config": asdict(cfg), "golden_reward": golden_info,
               "policies": policies, "reward_models": rm_rows, "best_of_n": bon_rows, "ava_token_rewards": tokens,
               "examples": examples, "stages": STAGE_LINES, "wall_time_s": time.time() - t0,
               "stage_times": STAGE_TIMES, "stage_config": stage_config(cfg, "evaluate")}
    results["digest"] = results_digest(results)  # a later edit of results.json is then known
    if is_main():
        write_text(json.dumps(results, indent=2), os.path.join(cfg.out_dir, "results.json"))
        write_report(results, cfg.out_dir)
    log(markdown_tables(results))
    log(f"[done] {time.time() - t0:.0f} s; wrote {cfg.out_dir}/results.json and report.md")
    if parallel.WORLD > 1:
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
        die(f"{e}, and run the same command again: finished stages are kept", status=1)


if __name__ == "__main__":
    cli(sys.argv[1:])
