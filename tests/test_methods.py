"""The methods of afd.py on tiny models: one sampling step, the discriminator and RL steps, a
round of iterated IRL and a stage of IRFT through real checkpoints and batches (training.py); and
train.py's command line.
The steps and methods use several objectives at once, and the command-line tests start train.py:
they are marked slow (in-process parsing and sample_batch stay in the fast suite)."""
import dataclasses
import json
import math
import os
import re
import types

import pytest
import torch

import afd
import checkpoint
import cli
import data
import reward
import training
from model import SharedPrompts, configure_optimizer, frozen_copy, trainable_copy
from reward import RewardModel

VOCAB = data.Vocab(range(11))  # 11 tokens and the end of text: 12 ids, EOS = 11
EOS = VOCAB.eot_id
DEMOS = [([1, 2, 3], [2, 3, EOS]), ([4, 5], [5, EOS]), ([6, 7, 8, 9], [9, 1, EOS]), ([10, 1], [1, 10, EOS]),
         ([3, 3, 2], [2, EOS])]  # (prompt, demonstration), distinct prompts of different lengths
PROMPTS = [p for p, _ in DEMOS[:3]]
# the fields a step function reads (any object has them; a cli.Config does)
STEP_CFG = types.SimpleNamespace(pg_group=4, max_new_tokens=4, temperature=1.0, beta_kl=0.1, grad_clip=1.0,
                                 disc_lr=1e-2, pg_shared_prompts=False)


def policy_batch(seed=0):
    """rl_step's prompts, generator and end-of-text id."""
    return PROMPTS, torch.Generator().manual_seed(seed), EOS


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def changed(before, model):
    return any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def tiny_run(out_dir, **overrides):
    """(batches, stage, cfg) on out_dir, as train.py hands them to a method: the DEMOS, tiny batches, a
    few steps of each run."""
    cfg = cli.Config(out_dir=str(out_dir), device="cpu", batch_size=4, warmup_steps=1, weight_decay=0.0,
                     max_new_tokens=4, pg_prompts=2, pg_group=2, pg_steps=2, pg_lr=1e-2, irl_rounds=2,
                     irl_rm_steps=2, rm_lr=1e-2, irft_stages=1, n_round_samples=3)
    cfg = dataclasses.replace(cfg, **overrides)
    return training.Batches(cfg, EOS, DEMOS), training.Stage(cfg, VOCAB, checkpoint.stage_config(cfg, "policy")), cfg


class ConstantReward(torch.nn.Module):
    def forward(self, idx, targets, last):
        return torch.full((targets.shape[0],), 0.7)


class TokenCountReward(torch.nn.Module):
    """r(x, y) = how many times `token` appears in the response."""

    def __init__(self, token):
        super().__init__()
        self.token = token

    def forward(self, idx, targets, last):
        return (targets == self.token).sum(dim=1).float()


# ----------------------------------------------------------------------------------------
# Step functions

def test_sample_batch_is_k_rows_per_prompt_prompt_major_with_the_prompt_masked(tiny_gpt):
    K = 3
    idx, targets, last = afd.sample_batch(tiny_gpt(), PROMPTS, K, 5, EOS, torch.Generator().manual_seed(0))
    assert idx.shape[0] == targets.shape[0] == last.shape[0] == len(PROMPTS) * K
    for row in range(len(PROMPTS) * K):
        prompt = PROMPTS[row // K]
        n = len(prompt)
        assert idx[row, :n].tolist() == prompt
        assert (targets[row, :n - 1] == -100).all()  # no target on the prompt
        response = targets[row, n - 1:last[row]]      # position n - 1 predicts the first response token
        assert 1 <= len(response) <= 5 and response.tolist() == idx[row, n:last[row] + 1].tolist()
        assert (targets[row, last[row]:] == -100).all()


def test_sample_batch_shared_holds_each_prompt_once_and_the_same_samples(tiny_gpt):
    K = 3
    plain = afd.sample_batch(tiny_gpt(), PROMPTS, K, 5, EOS, torch.Generator().manual_seed(0))
    idx, targets, last = afd.sample_batch(tiny_gpt(), PROMPTS, K, 5, EOS, torch.Generator().manual_seed(0),
                                          shared=True)
    assert isinstance(idx, SharedPrompts) and idx.prompts.shape[0] == len(PROMPTS)  # each prompt held once
    assert idx.responses.shape[0] == targets.shape[0] == last.shape[0] == len(PROMPTS) * K
    for g, prompt in enumerate(PROMPTS):
        assert idx.prompts[g][idx.real[g]].tolist() == prompt
    for row in range(len(PROMPTS) * K):
        n = int(last[row])  # the response's length; column j of targets is response token j
        plain_response = plain[1][row][plain[1][row] != -100].tolist()
        assert 1 <= n <= 5 and targets[row, :n].tolist() == idx.responses[row, :n].tolist() == plain_response
        assert (targets[row, n:] == -100).all()


def adversarial_body(policy, ref, disc, disc_opt, cfg):
    """The body of afd.afd_adversarial's loop on policy_batch(): the samples, the discriminator step,
    its rewards, the policy's loss. Returns (loss, stats)."""
    prompts, generator, eos = policy_batch()
    samples = afd.sample_batch(policy, prompts, cfg.pg_group, cfg.max_new_tokens, eos, generator, cfg.temperature,
                               cfg.pg_shared_prompts)
    demos = data.make_batch(prompts, [r for _, r in DEMOS[:3]], eos)
    disc_acc = afd.discriminator_step(disc, disc_opt, demos, samples, cfg)
    with torch.no_grad():
        rewards = disc(*samples).float()
    loss, stats = afd.rloo_loss(policy, ref, samples, rewards, cfg.pg_group, cfg.beta_kl)
    return loss, {**stats, "disc_acc": disc_acc}


@pytest.mark.slow
@pytest.mark.parametrize("step", ["rl", "adversarial"])
def test_policy_steps_on_shared_prompts_equal_the_plain_steps(tiny_gpt, step):
    """--pg_shared_prompts: the same samples (the same draws), and the same loss, stats and policy
    gradient to float tolerance, as the plain step."""
    results = []
    for shared in (False, True):
        pi = tiny_gpt()
        policy, ref = trainable_copy(pi), frozen_copy(pi)
        cfg = types.SimpleNamespace(**{**vars(STEP_CFG), "pg_shared_prompts": shared})
        if step == "rl":
            loss, stats = afd.rl_step(policy, ref, TokenCountReward(3), *policy_batch(), cfg)
        else:
            disc = RewardModel.from_policy(pi)
            loss, stats = adversarial_body(policy, ref, disc, configure_optimizer(disc, 1e-2, 0.0), cfg)
        loss.backward()
        results.append((loss.item(), stats, [p.grad.clone() for p in policy.parameters()]))
    (loss, stats, grads), (loss_shared, stats_shared, grads_shared) = results
    assert loss_shared == pytest.approx(loss, abs=1e-5) and stats_shared == pytest.approx(stats, abs=1e-5)
    assert abs(loss) > 1e-4 and sum(g.abs().sum() for g in grads) > 1e-4
    for g, g_shared in zip(grads, grads_shared):
        torch.testing.assert_close(g_shared, g, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_the_discriminator_step_trains_the_discriminator_only(tiny_gpt):
    """afd.afd_adversarial's loop body: the discriminator step changes D and nothing else; the
    policy's loss then carries a gradient to the policy only."""
    pi = tiny_gpt()
    policy, ref, disc = trainable_copy(pi), frozen_copy(pi), RewardModel.from_policy(pi)
    disc_opt = configure_optimizer(disc, 1e-2, 0.0)
    policy_before, ref_before, disc_before = snapshot(policy), snapshot(ref), snapshot(disc)
    loss, stats = adversarial_body(policy, ref, disc, disc_opt, STEP_CFG)
    assert changed(disc_before, disc)
    assert not changed(ref_before, ref)
    assert not changed(policy_before, policy)  # the policy's optimiser step comes after
    assert {"reward", "kl", "disc_acc"} <= set(stats)
    assert stats["disc_acc"] == 0.0  # before its first step D's zero head gives r = 0: no class on its side
    assert torch.isfinite(loss) and loss.requires_grad
    loss.backward()
    assert any(p.grad is not None and (p.grad != 0).any() for p in policy.parameters())
    assert all(p.grad is None for p in ref.parameters())


def reference_discriminator_loss(r_pos, r_neg):
    return -(torch.nn.functional.logsigmoid(r_pos).mean() + torch.nn.functional.logsigmoid(-r_neg).mean())


def test_the_discriminator_step_raises_the_demonstrations_logits_over_the_samples(tiny_gpt, monkeypatch):
    """Steps of discriminator_step on fixed demonstrations and samples move D the right way:
    the demonstrations' logits rise above the samples', and the accuracy it returns rises from 0.
    (The loss itself, an objective of its own, is a reference here.)"""
    monkeypatch.setattr(afd, "discriminator_loss", reference_discriminator_loss)
    disc = RewardModel.from_policy(tiny_gpt())
    disc_opt = configure_optimizer(disc, 1e-2, 0.0)
    demos = data.make_batch(PROMPTS, [[2, 3, EOS], [5, EOS], [9, 1, EOS]], EOS)
    samples = data.make_batch([p for p in PROMPTS for _ in range(2)], [[7, EOS], [8, 8, EOS]] * 3, EOS)
    cfg = types.SimpleNamespace(disc_lr=1e-2, grad_clip=1.0)
    accuracies = [afd.discriminator_step(disc, disc_opt, demos, samples, cfg) for _ in range(30)]
    with torch.no_grad():
        margin = disc(*demos).mean() - disc(*samples).mean()
    assert accuracies[0] == 0.0 and accuracies[-1] >= 0.75 and margin > 1.0  # r = 0 for all at the start


@pytest.mark.slow
def test_rl_step_on_a_constant_reward_is_exactly_zero(tiny_gpt):
    pi = tiny_gpt()
    policy, ref = trainable_copy(pi), frozen_copy(pi)
    loss, stats = afd.rl_step(policy, ref, ConstantReward(), *policy_batch(), STEP_CFG)
    assert loss.item() == 0.0 and stats["kl"] == 0.0  # equal rewards, policy == ref
    assert stats["reward"] == pytest.approx(0.7)
    loss.backward()
    assert all((p.grad == 0).all() for p in policy.parameters())


@pytest.mark.slow
def test_rl_step_on_a_reward_for_one_token_makes_it_more_likely(tiny_gpt):
    pi = tiny_gpt()
    policy, ref = trainable_copy(pi), frozen_copy(pi)

    def p_token(model):  # mean probability of token 3 as the first response token
        with torch.no_grad():
            return sum(torch.softmax(model(torch.tensor([p]))[0][0, -1], -1)[3] for p in PROMPTS) / len(PROMPTS)
    before = p_token(policy)
    loss, _ = afd.rl_step(policy, ref, TokenCountReward(3), *policy_batch(), STEP_CFG)
    loss.backward()
    assert any((p.grad != 0).any() for p in policy.parameters())
    torch.optim.SGD(policy.parameters(), lr=0.5).step()
    assert p_token(policy) > before


# ----------------------------------------------------------------------------------------
# Whole methods, through real checkpoints and batches

@pytest.mark.slow
def test_irl_round_aggregates_demonstration_triples_and_trains_both_models(tiny_gpt, tmp_path):
    batches, stage, cfg = tiny_run(tmp_path)
    pi_sft = tiny_gpt()
    policy = trainable_copy(pi_sft)
    policy_before = snapshot(policy)
    demo_of = {tuple(p): r for p, r in DEMOS}
    triples = afd.irl_round(0, pi_sft, policy, [], batches, stage, cfg)
    assert len(triples) == cfg.n_round_samples
    assert all(demo == demo_of[tuple(prompt)] and len(own) <= cfg.max_new_tokens for prompt, demo, own in triples)
    assert (tmp_path / "rm_irl_iterated_round0.pt").exists() and (tmp_path / "policy_irl_iterated_round0.pt").exists()
    assert changed(policy_before, policy)
    more = afd.irl_round(1, pi_sft, policy, triples, batches, stage, cfg)
    assert more[:len(triples)] == triples and len(more) == len(triples) + cfg.n_round_samples
    assert all(demo == demo_of[tuple(prompt)] for prompt, demo, _ in more)


class RecordingCheckpoint:
    """A stand-in for training.Checkpoint that runs no step and records what each loop names: its
    name, and its first model as it is before training."""
    calls = []

    def __init__(self, stage, name, **state):
        model = next(iter(state.values()))
        RecordingCheckpoint.calls.append((name, model, snapshot(model)))

    def steps(self, total):
        return iter(())


class RecordingBatches(training.Batches):
    """training.Batches that records the demonstrations a method asks for."""

    def __init__(self, *args):
        super().__init__(*args)
        self.calls = []

    def demonstrations(self, label, part=0, parts=1):
        self.calls.append((label, part, parts))
        return super().demonstrations(label, part, parts)


def test_irl_round_trains_a_fresh_reward_model_from_pi_sft_on_all_pairs_sampled_near_greedily(tiny_gpt,
                                                                                           monkeypatch):
    """2503.13538's released pipeline: each round samples at temperature 0.01, and trains a new reward
    model from the SFT model on the pairs of every round so far."""
    pi_sft, cfg = tiny_gpt(seed=0), cli.Config(irl_rounds=2, pg_steps=4, device="cpu")
    policy = trainable_copy(tiny_gpt(seed=5))  # pi_k differs from pi_sft
    temperatures = []

    def sample(policy, prompts, n, cfg, eos_id, seed, desc, temperature=None):
        temperatures.append(temperature)
        return [[7, EOS] for _ in prompts]
    monkeypatch.setattr(afd, "sample", sample)
    monkeypatch.setattr(afd, "Checkpoint", RecordingCheckpoint)
    RecordingCheckpoint.calls = []
    batches = training.Batches(cfg, EOS, DEMOS)
    triples = afd.irl_round(0, pi_sft, policy, [], batches, None, cfg)
    more = afd.irl_round(1, pi_sft, policy, triples, batches, None, cfg)
    assert temperatures == [cfg.irl_temperature] * 2 and cfg.irl_temperature == 0.01
    assert len(more) == 2 * len(triples) == 2 * len(DEMOS) and more[:len(DEMOS)] == triples
    reward_models = [c for c in RecordingCheckpoint.calls if c[0].startswith("rm_")]
    assert [c[0] for c in reward_models] == ["rm_irl_iterated_round0", "rm_irl_iterated_round1"]
    assert reward_models[0][1] is not reward_models[1][1]  # a new reward model each round
    for _, rm, start in reward_models:  # each starts from pi_sft's trunk, with a zero head
        assert isinstance(rm, RewardModel)
        assert all(torch.equal(start[f"trunk.{k}"], v) for k, v in pi_sft.state_dict().items())
        assert start["head.weight"].abs().sum() == 0


def test_irft_stages_sample_on_disjoint_slices_of_the_demonstrations(tiny_gpt, tmp_path, monkeypatch):
    batches, _, cfg = tiny_run(tmp_path, n_round_samples=2)
    slices = [batches.demonstrations("irft", part=t, parts=2) for t in range(2)]
    assert all(len(prompts) == 2 for prompts, _ in slices)  # min(n_round_samples, 5 // 2)
    assert not {tuple(p) for p in slices[0][0]} & {tuple(p) for p in slices[1][0]}
    demo_of = {tuple(p): r for p, r in DEMOS}
    assert all(demo_of[tuple(p)] == r for prompts, demos in slices for p, r in zip(prompts, demos))
    monkeypatch.setattr(afd, "Checkpoint", RecordingCheckpoint)
    recording = RecordingBatches(cli.Config(irft_stages=2, device="cpu", max_new_tokens=4), EOS, DEMOS)
    for t in range(2):
        afd.irft_stage(t, trainable_copy(tiny_gpt()), recording, None, recording.cfg)
    assert recording.calls == [("irft", 0, 2), ("irft", 1, 2)]


def test_tailored_batches_put_each_models_positives_first_on_the_same_prompts(monkeypatch):
    """The batch afd.train_reward_model builds for a tailored reward model (afd.tailored_triples through
    training.Batches.triples_batch, as Batches.triples does): B positives, then their B negatives, row b of each
    half on the same prompt; a scorer that knows the classes gets a loss near 0 from
    afd.discriminator_batch_loss, one that has them the wrong way round a large one. (The loss itself,
    an objective of its own, is a reference here.)"""
    monkeypatch.setattr(afd, "discriminator_loss", reference_discriminator_loss)
    prompts, demos = [[1, 2], [3, 4, 5], [6]], [[1, EOS], [1, 1, EOS], [1, 2, EOS]]
    init = [[3, EOS], [3, 4, EOS], [3, EOS], [3, 3, EOS], [3, 9, EOS], [3, EOS]]   # starts with 3
    sft = [[2, EOS], [2, 2, EOS], [2, 5, EOS], [2, EOS], [2, 8, EOS], [2, 2, 2, EOS]]  # starts with 2
    first_token = {"demo": 1, "sft": 2, "init": 3}
    batches = training.Batches(cli.Config(device="cpu"), EOS, DEMOS)
    for name, (positives, negatives) in afd.TAILORED.items():
        triples = afd.tailored_triples(name, prompts, demos, init, sft)
        assert len(triples) == len(init) and [t[0] for t in triples] == [p for p in prompts for _ in range(2)]
        idx, targets, last = batch = batches.triples_batch(triples)
        B = len(triples)
        for b in range(B):
            n = len(triples[b][0])
            assert idx[b, :n].tolist() == idx[B + b, :n].tolist() == triples[b][0]  # the same prompt
            assert idx[b, n] == first_token[positives] and idx[B + b, n] == first_token[negatives]

        class Knows(torch.nn.Module):  # +10 on the positive class, -10 on the negative (sign -1: reversed)
            def __init__(self, sign):
                super().__init__()
                self.sign = sign

            def forward(self, idx, targets, last):
                lengths = torch.tensor([len(t[0]) for t in triples] * 2)
                first = idx[torch.arange(idx.shape[0]), lengths]
                return self.sign * torch.where(first == first_token[positives], 10.0, -10.0)
        assert afd.discriminator_batch_loss(Knows(1), batch) < 1e-3 < 10 < afd.discriminator_batch_loss(Knows(-1), batch)


def test_a_bradley_terry_batch_is_trained_with_its_better_half_first(monkeypatch):
    """The batch the reward models' loops build from (prompt, better, worse) triples
    (training.Batches.triples_batch, for pref, ava_p and iterated IRL's reward) and reward.pairwise_loss
    read it the same way round: a scorer that ranks the better responses higher gets a loss below
    log 2, one that ranks them lower a loss above it. (The loss, an objective, is a reference here.)"""
    monkeypatch.setattr(reward, "bradley_terry_loss",
                        lambda r_chosen, r_rejected: -torch.nn.functional.logsigmoid(r_chosen - r_rejected).mean())
    triples = [([1, 2], [3, EOS], [4, 4, EOS]), ([5], [3, 3, EOS], [4, EOS]), ([6, 7, 8], [3, 5, EOS], [4, 6, EOS])]
    batch = training.Batches(cli.Config(device="cpu"), EOS, DEMOS).triples_batch(triples)

    class FirstToken(torch.nn.Module):  # +1 for a response that starts with 3 (the better), -1 for 4
        def __init__(self, sign):
            super().__init__()
            self.sign = sign

        def forward(self, idx, targets, last):
            first = targets[torch.arange(len(targets)), (targets != -100).int().argmax(dim=1)]
            return self.sign * torch.where(first == 3, 1.0, -1.0)
    assert reward.pairwise_loss(FirstToken(1), batch) < math.log(2) < reward.pairwise_loss(FirstToken(-1), batch)


@pytest.mark.slow
def test_ava_d_direct_trains_the_policy_and_the_reward_head(tiny_gpt, tmp_path):
    batches, stage, cfg = tiny_run(tmp_path)
    pi_sft = tiny_gpt()
    policy = afd.ava_d_direct(pi_sft, batches, stage, cfg)
    assert type(policy).__name__ == "GPT" and changed(snapshot(pi_sft), policy)
    state = torch.load(tmp_path / "policy_ava_d_direct.pt", weights_only=True)
    head = [v for k, v in state["model"].items() if k.startswith("reward_head")]
    assert head and any(v.abs().sum() > 0 for v in head)  # the reward head trained beside the policy
    curve = [json.loads(line) for line in (tmp_path / "policy_ava_d_direct.curve.jsonl").read_text().splitlines()]
    assert len(curve) == cfg.pg_steps and all(math.isfinite(r["loss"]) for r in curve)


@pytest.mark.slow
def test_irft_stage_starts_at_log2_and_writes_its_checkpoint(tiny_gpt, tmp_path):
    batches, stage, cfg = tiny_run(tmp_path)
    policy = trainable_copy(tiny_gpt())
    before = snapshot(policy)
    afd.irft_stage(0, policy, batches, stage, cfg)
    curve = [json.loads(line) for line in (tmp_path / "policy_irft_stage0.curve.jsonl").read_text().splitlines()]
    assert len(curve) == cfg.pg_steps // cfg.irft_stages
    assert curve[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # pi == pi_t at the first step
    assert (tmp_path / "policy_irft_stage0.pt").exists() and changed(before, policy)


@pytest.mark.slow
def test_a_method_run_again_with_the_same_config_loads_instead_of_training(tiny_gpt, tmp_path, capsys):
    pi_sft = tiny_gpt()
    first = afd.irft(pi_sft, *tiny_run(tmp_path))
    capsys.readouterr()
    again = afd.irft(pi_sft, *tiny_run(tmp_path))
    path = tmp_path / "policy_irft_stage0.pt"
    assert f"[policy_irft_stage0] loaded {path} (up to date)" in capsys.readouterr().out
    assert not changed(snapshot(first), again)
    afd.irft(pi_sft, *tiny_run(tmp_path, pg_lr=3e-3))
    assert f"[policy_irft_stage0] pg_lr 0.01 -> 0.003 since {path}: redoing it" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------
# The command line

@pytest.mark.slow
def test_help_lists_every_field_with_its_default_by_stage(run):
    for flag in ("--help", "-h"):
        proc = run(flag, env={**os.environ, "COLUMNS": "1000"})  # no line wrapping
        assert proc.returncode == 0, proc.stderr
        for f in dataclasses.fields(cli.Config):
            assert re.search(rf"--{f.name}\b", proc.stdout), f.name
            assert f.name == "preset" or f"(default {f.default!r}" in proc.stdout, f.name
        assert all(f"{title}:" in proc.stdout for title in cli.STAGE_HELP.values())


def test_an_option_parses_with_or_without_equals():
    assert cli.parse_args(["--preset=smoke", "--seed", "3"]).seed == 3
    assert cli.parse_args(["--preset=smoke", "--seed=3"]).seed == 3


def test_a_misspelt_option_suggests_the_field(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.parse_args(["--preset=smoke", "--pg_lrr=1"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "unknown option --pg_lrr; did you mean --pg_lr?" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("option, message", [
    ("--device=gpu", "--device='gpu': choose auto, cpu"),
    ("--dropout=2", "--dropout=2.0 must be in [0, 1)"),
    ("--temperature=nan", "--temperature=nan must be at least 0"),
    ("--methods=bon,adversarial", "--methods: unknown 'adversarial' (did you mean afd_adversarial?)"),
    ("--pref_noise_temp=0", "--pref_noise_temp=0.0 must be positive"),
    ("--demo_error=1", "--demo_error=1.0 must be a share, in [0, 1)"),
    ("--demo_error=0.3 --task=hh --data_dir=x", "it needs --task=synthetic and no --demos file"),
    ("--ava_gamma=1.5", "--ava_gamma=1.5 must be a discount, in [0, 1]"),
    ("--ava_alpha=2", "needs --ava_alpha x --ava_beta = 1 (here 2.0 x 1.0)"),
])
def test_a_bad_value_is_one_line_before_any_work(run, tmp_path, option, message):
    out = tmp_path / "out"
    proc = run("--preset=smoke", f"--out_dir={out}", *option.split())
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not out.exists()
