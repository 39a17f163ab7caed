"""AVA (reward.AVARewardModel and its losses, METHOD.md section 10): the heads, padding invariance,
reproducibility, the AVA-p contrast, training on a toy demonstration set (slow), and the reward
models' held-out accuracies. The Gaussian terms, the TD differences and the per-token objective
are tested one by one in test_objectives.py."""
import math
import random

import pytest
import torch
import torch.nn.functional as F

import reward
from data import make_batch
from model import GPT, GPTConfig, configure_optimizer
from reward import AVARewardModel, ava_d_loss, ava_p_loss

V, EOT, SEP = 16, 0, 1
CONFIG = GPTConfig(block_size=16, vocab_size=V, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(autouse=True)
def _reward_weights_by_reference(reference_weights):
    """AVA's reward weights are an objective of their own (course.py): these tests use a reference."""


def tiny_ava(seed=0, random_reward_head=False):
    torch.manual_seed(seed)
    model = AVARewardModel.from_policy(GPT(CONFIG))
    if random_reward_head:  # the head starts at zero; make the rewards depend on the input
        torch.nn.init.normal_(model.reward_head.weight, std=0.5)
        torch.nn.init.normal_(model.reward_head.bias, std=0.5)
    return model.eval()


def test_q_values_are_the_policys_log_softmax_at_temperature_alpha(reference_logprobs):
    """Eq. 12: Q(s_t, .) = log softmax(alpha z_t), z the trunk's own LM head (the policy's logits)."""
    torch.manual_seed(1)
    policy = GPT(CONFIG)
    model = AVARewardModel.from_policy(policy)
    idx, targets, _ = make_batch([[3, 4, SEP], [5, SEP]], [[6, 7, EOT], [8, EOT]], EOT)
    q_taken = model(idx, targets, readout="heads")[3]
    torch.testing.assert_close(q_taken, reference_logprobs(policy, idx, targets).detach(), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        logits, _ = policy(idx)
        expected = F.log_softmax(2.5 * logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    got = model(idx, targets, readout="heads", alpha=2.5)[3]
    torch.testing.assert_close(got, expected.masked_fill(targets == -100, 0.0), atol=1e-5, rtol=1e-5)
    # the reward head starts at the prior: mu = 0, so every sequence scores 0 with both read-outs
    assert model(idx, targets).abs().max() == 0 and model(idx, targets, readout="sum").abs().max() == 0


def test_readouts_are_the_last_timesteps_reward_and_the_sum_of_the_weighted_rewards():
    model = tiny_ava(random_reward_head=True)
    idx, targets, last = make_batch([[3, 4, SEP], [5, SEP]], [[6, 7, 8, EOT], [9, EOT]], EOT)
    with torch.no_grad():
        mu = model(idx, targets, readout="heads")[0]                 # (B, T) w_t mu_t, 0 off the mask
        r_last, r_sum = model(idx, targets, last), model(idx, targets, readout="sum")
    assert mu[0, 2:6].abs().min() > 0 and mu[1, 1:3].abs().min() > 0
    # row 0: prompt of 3, response of 4: positions 2..5 predict it, the last at 5; row 1: at 2
    torch.testing.assert_close(r_last, torch.stack([mu[0, 5], mu[1, 2]]))
    torch.testing.assert_close(r_sum, torch.stack([mu[0, 2:6].sum(), mu[1, 1:3].sum()]))
    torch.testing.assert_close(reward.ExpectedReturn(model)(idx, targets, last), r_sum)


def test_sequence_score_is_invariant_to_padding():
    model = tiny_ava(random_reward_head=True)
    prompt, response = [4, 5, SEP], [6, 7, EOT]
    alone = model(*make_batch([prompt], [response], EOT)[:2])
    idx, targets, _ = make_batch([prompt, [9, 9, 9, 9, SEP]], [response, [2, 3, 4, 5, 6, 7, EOT]], EOT)
    padded = model(idx, targets)[0]
    assert idx.shape[1] > len(prompt) + len(response)
    assert alone.abs().item() > 1e-3  # the check is not trivially 0 == 0
    torch.testing.assert_close(padded, alone[0], atol=1e-5, rtol=1e-5)


def test_reward_head_gradient_is_bitwise_reproducible():
    """The taken tokens' head rows are gathered so that their CPU backward is deterministic: ten
    backward passes give the same gradient to the bit (gathering by indexing, w[y], gave a different
    one in 10 of 10 tries at this size: many repeated tokens, summed by several threads)."""
    def head_grad():
        torch.manual_seed(0)
        model = AVARewardModel.from_policy(GPT(GPTConfig(block_size=32, vocab_size=50, n_layer=1, n_head=2,
                                                         n_embd=64)))
        torch.nn.init.normal_(model.reward_head.weight)
        idx = torch.randint(0, 50, (32, 32), generator=torch.Generator().manual_seed(1))
        mu, log_sigma, _, _ = model(idx, idx, readout="heads")
        (mu.sum() + log_sigma.sum()).backward()
        return model.reward_head.weight.grad
    first = head_grad()
    assert first.abs().sum() > 0
    assert all(torch.equal(first, head_grad()) for _ in range(10))


def test_ava_p_loss_lowers_the_rejected_likelihood_and_adds_the_contrast(monkeypatch):
    """ava_p_loss on given per-token terms (ava_token_objective and the contrast replaced, so that
    this tests only how AVA-p combines them: Eq. 17 and 18)."""
    likelihood = torch.tensor([[0.0, -1.0, -3.0], [0.0, -2.0, 0.0], [-4.0, -5.0, 0.0], [-6.0, 0.0, 0.0]])
    bayes = torch.tensor([[0.0, 0.5, -0.5], [0.0, 1.0, 0.0], [2.0, -1.0, 0.0], [-3.0, 0.0, 0.0]])
    mask = torch.tensor([[False, True, True], [False, True, False], [True, True, False], [True, False, False]])
    mu = torch.tensor([[0.0, 0.3, 1.5], [0.0, -0.7, 0.0], [0.4, 0.9, 0.0], [-0.2, 0.0, 0.0]])  # last: 1.5, -0.7, 0.9, -0.2
    targets = torch.where(mask, 1, -100)
    monkeypatch.setattr(reward, "ava_token_objective", lambda *args: (likelihood, bayes, mask, mu))
    monkeypatch.setattr(reward, "contrastive_expected_return", lambda rc, rr: torch.sigmoid(rc - rr).mean())
    # 6 tokens: chosen likelihoods -1 -3 -2 count +, rejected -4 -5 -6 count -: (-6 + 15) / 6;
    # bayes (0.5 - 0.5 + 1 + 2 - 1 - 3) / 6 = -1 / 6; contrast: last rewards 1.5 vs 0.9, -0.7 vs -0.2
    contrast = (1 / (1 + math.exp(-0.6)) + 1 / (1 + math.exp(0.5))) / 2
    expected = -(9.0 - 1.0) / 6 - contrast
    assert ava_p_loss(None, torch.zeros(4, 3, dtype=torch.long), targets, 1.0, 1.0).item() == pytest.approx(expected)


def toy_demo(rng):
    """Toy demonstrator: the response is the prompt's 4 digits sorted, then EOT."""
    digits = [rng.randrange(2, 10) for _ in range(4)]
    return digits + [SEP], sorted(digits) + [EOT]


@pytest.mark.slow
def test_ava_d_learns_a_reward_that_ranks_demonstrations_first():
    rng = random.Random(0)
    train, heldout = [toy_demo(rng) for _ in range(512)], [toy_demo(rng) for _ in range(200)]
    # random sequences over the same tokens, on the held-out prompts
    random_responses = [[rng.randrange(2, 10) for _ in range(4)] + [EOT] for _ in heldout]
    model = tiny_ava(seed=0)
    opt = configure_optimizer(model, 3e-3, 0.0)
    model.train()
    losses = []
    for step in range(300):
        batch = [train[rng.randrange(len(train))] for _ in range(32)]
        idx, targets, _ = make_batch([p for p, _ in batch], [r for _, r in batch], EOT)
        loss = ava_d_loss(model, idx, targets, lam=1.0, gamma=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    assert sum(losses[-20:]) / 20 < 0.75 * sum(losses[:20]) / 20  # the objective improves
    prompts = [p for p, _ in heldout]
    with torch.no_grad():
        # the expected return (Eq. 19, RL's reward): on this toy, where every response has 5 tokens,
        # it ranks demonstrations first; the last timestep's reward, which AVA-d does not train to
        # order responses, did so for 21-71% of prompts (3 seeds)
        r_demo = model(*make_batch(prompts, [r for _, r in heldout], EOT)[:2], readout="sum")
        r_random = model(*make_batch(prompts, random_responses, EOT)[:2], readout="sum")
    accuracy = (r_demo > r_random).float().mean().item()
    assert accuracy > 0.8, accuracy  # 0.94-0.96 on three seeds here; chance is 0.5


def test_heldout_accuracies_by_hand():
    """Two held-out prompts; only the first pair of SFT samples differs in golden reward."""
    t = lambda *v: torch.tensor(v)
    scores = {"demo": t(1.0, 0.0), "sft_a": t(0.0, 1.0), "sft_b": t(0.5, 0.5), "init": t(-1.0, 2.0),
              "chosen": t(2.0, 2.0), "rejected": t(1.0, 3.0)}
    rows = reward.heldout_accuracies("init_sft", scores, golden_a=t(1.0, 0.0), golden_b=t(0.0, 0.0))
    assert rows["heldout_accuracy"] == 0.5             # own pair, sft_a > init: (0 > -1) yes, (1 > 2) no
    assert rows["acc_demo_vs_sft"] == 0.5              # demo > sft_a: yes, then no
    assert rows["acc_chosen_vs_rejected"] == 0.5       # 2 > 1 yes, 2 > 3 no
    assert rows["n_golden_sft_pairs"] == 1             # the second pair is a golden tie: left out
    assert rows["acc_golden_sft_pairs"] == 0.0         # the better sample (a) scored 0 < 0.5
    assert reward.heldout_accuracies("pref", scores, t(1.0, 0.0), t(0.0, 0.0))["heldout_accuracy"] == 0.5


class PerStateAVA(AVARewardModel):
    """The paper's per-state reward head (Eq. 9), for the comparison below: one (mu, log sigma) per
    position, read at h_{t+1}, the hidden state after the taken token (h_t has not seen it)."""

    def __init__(self, config):
        super().__init__(config)
        self.state_head = torch.nn.Linear(config.n_embd, 2)
        torch.nn.init.zeros_(self.state_head.weight)
        torch.nn.init.zeros_(self.state_head.bias)

    def heads(self, idx, targets, alpha):
        h, attention = reward.hidden_and_attention(self.trunk, idx)
        mask = targets != -100
        w = reward.reward_weights(attention, reward.mask_of_rows(idx, targets))
        q = F.log_softmax(alpha * self.trunk.lm_head(h).float(), dim=-1)
        q_taken = q.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        mu, log_sigma = self.state_head(F.pad(h[:, 1:], (0, 0, 0, 1))).float().unbind(-1)  # read at t + 1
        weighted = (w * mu, torch.log(w.clamp(min=1e-30)) + log_sigma, w * q_taken)
        return [v.masked_fill(~mask, 0.0) for v in (*weighted, q_taken)]


@pytest.mark.slow
def test_the_state_action_head_ranks_demonstrations_better_than_a_per_state_head():
    """METHOD.md section 10's reason for the state-action head, on the toy above: after 300 AVA-d
    steps, the expected return ranks demonstrations above random strings far more often with it
    (seed 0: 0.96 against 0.66)."""
    accuracy = {}
    for cls in (AVARewardModel, PerStateAVA):
        rng = random.Random(0)
        train, heldout = [toy_demo(rng) for _ in range(512)], [toy_demo(rng) for _ in range(200)]
        random_responses = [[rng.randrange(2, 10) for _ in range(4)] + [EOT] for _ in heldout]
        torch.manual_seed(0)
        model = cls.from_policy(GPT(CONFIG))
        opt = configure_optimizer(model, 3e-3, 0.0)
        for step in range(300):
            batch = [train[rng.randrange(len(train))] for _ in range(32)]
            loss = ava_d_loss(model, *make_batch([p for p, _ in batch], [r for _, r in batch], EOT)[:2], 1.0, 1.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
        prompts = [p for p, _ in heldout]
        with torch.no_grad():
            r_demo = model(*make_batch(prompts, [r for _, r in heldout], EOT)[:2], readout="sum")
            r_random = model(*make_batch(prompts, random_responses, EOT)[:2], readout="sum")
        accuracy[cls] = (r_demo > r_random).float().mean().item()
    assert accuracy[AVARewardModel] > 0.8 and accuracy[PerStateAVA] < accuracy[AVARewardModel] - 0.15, accuracy
