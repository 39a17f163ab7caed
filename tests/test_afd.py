"""The AfD objectives, Best-of-N and the reward models."""
import itertools
import math

import pytest
import torch

import afd
import reward
from data import make_batch
from model import frozen_copy, generate, sequence_logprob


def test_sft_loss_is_the_masked_response_nll_and_never_nan(tiny_gpt):
    model = tiny_gpt()
    idx = torch.randint(0, 12, (2, 6))
    targets = torch.full((2, 6), -100)
    loss = afd.sft_loss(model, idx, targets)  # a fully masked batch
    assert loss.item() == 0.0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    targets[0, 2:5] = idx[0, 3:6]  # three response tokens in the first row only
    logits, _ = model(idx)
    logp = torch.log_softmax(logits.float(), -1)[0, 2:5].gather(1, idx[0, 3:6, None])
    assert afd.sft_loss(model, idx, targets).item() == pytest.approx(-logp.mean().item(), abs=1e-5)


def test_discriminator_optimum_is_the_log_density_ratio():
    """Free logits r(y) trained with the discriminator loss converge to log d_pos - log d_neg."""
    d_pos = torch.tensor([0.5, 0.3, 0.1, 0.1])
    d_neg = torch.tensor([0.1, 0.2, 0.3, 0.4])
    r = torch.zeros(4, requires_grad=True)
    opt = torch.optim.Adam([r], lr=0.05)
    for _ in range(2000):
        # expectations over the two distributions, written exactly
        loss = -(d_pos * torch.nn.functional.logsigmoid(r)).sum() - (d_neg * torch.nn.functional.logsigmoid(-r)).sum()
        opt.zero_grad(); loss.backward(); opt.step()
    assert torch.allclose(r.detach(), (d_pos / d_neg).log(), atol=1e-3)
    # and the sampled form used in training is the same objective
    assert afd.discriminator_loss(torch.tensor([2.0]), torch.tensor([-1.0])).item() == pytest.approx(
        -math.log(1 / (1 + math.exp(-2))) - math.log(1 - 1 / (1 + math.exp(1))))


def test_best_of_n_returns_the_argmax():
    scores = torch.tensor([[0.1, 3.0, -1.0, 2.9], [5.0, 4.0, 6.0, 0.0]])
    assert afd.best_of_n(scores).tolist() == [1, 2]


def test_order_statistics_estimator_equals_brute_force_enumeration():
    torch.manual_seed(0)
    P, N = 3, 7
    scores, values = torch.randn(P, N), torch.randn(P, N)
    for n in range(1, N + 1):
        brute = torch.tensor([[values[p, max(s, key=lambda i: scores[p, i])].item()
                               for s in itertools.combinations(range(N), n)] for p in range(P)]).mean(1)
        assert torch.allclose(afd.best_of_n_estimate(scores, values, n), brute.double(), atol=1e-9)
    assert torch.allclose(afd.best_of_n_estimate(scores, values, 1), values.double().mean(1))
    assert torch.allclose(afd.best_of_n_estimate(scores, values, N),
                          values.double().gather(1, scores.argmax(1, keepdim=True)).squeeze(1))


def test_kl_bound_and_win_rate():
    assert afd.kl_bound(1) == 0.0
    assert afd.kl_bound(16) == pytest.approx(math.log(16) - 15 / 16)
    w = afd.win_rate_indicator(torch.tensor([1.0, 2.0, 0.0]), torch.tensor([1.0, 1.0, 1.0]))
    assert w.tolist() == [0.5, 1.0, 0.0]
    assert afd.mean_stderr([1.0, 3.0]) == pytest.approx((2.0, 1.0))


def toy_sequences(good, n=16, T=6, vocab=12, seed=0):
    """Sequences of random tokens in 3..11 containing the marker token 1 (good) or 2 (bad)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(3, vocab, (n, T), generator=g)
    idx[:, T - 1] = 1 if good else 2
    return idx


def train_steps(model, loss_fn, steps=60, lr=3e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("kind", ["classifier", "bradley_terry"])
def test_reward_model_losses_fall_on_separable_toy_data(kind, tiny_gpt):
    rm = reward.RewardModel.from_policy(tiny_gpt())
    pos, neg = toy_sequences(True), toy_sequences(False, seed=1)
    last = torch.full((16,), 5)
    if kind == "classifier":
        loss_fn = lambda: afd.discriminator_loss(rm(pos, None, last), rm(neg, None, last))
    else:
        loss_fn = lambda: reward.bradley_terry_loss(rm(pos, None, last), rm(neg, None, last))
    losses = train_steps(rm, loss_fn)
    assert losses[-1] < 0.2 * losses[0]
    held_pos, held_neg = toy_sequences(True, seed=2), toy_sequences(False, seed=3)
    assert reward.pairwise_accuracy(rm(held_pos, None, last), rm(held_neg, None, last)) == 1.0


def test_reward_model_reads_the_last_response_token_and_ignores_padding(tiny_gpt):
    rm = reward.RewardModel.from_policy(tiny_gpt())
    torch.nn.init.normal_(rm.head.weight)
    idx = torch.randint(0, 12, (1, 8))
    padded = torch.cat([idx, torch.zeros(1, 4, dtype=torch.long)], 1)
    assert torch.allclose(rm(idx, None, torch.tensor([7])), rm(padded, None, torch.tensor([7])), atol=1e-6)
    assert not torch.allclose(rm(idx, None, torch.tensor([7])), rm(idx, None, torch.tensor([6])))


def test_logratio_reward_is_the_difference_of_sequence_logprobs(tiny_gpt):
    pi_init, pi_sft = tiny_gpt(seed=0), tiny_gpt(seed=1)
    scorer = reward.LogRatioReward(pi_sft, pi_init)
    assert not any(p.requires_grad for p in scorer.parameters())
    idx = torch.randint(0, 12, (3, 6))
    targets = torch.full((3, 6), -100)
    targets[:, 2:5] = idx[:, 3:6]
    expected = sequence_logprob(pi_sft, idx, targets) - sequence_logprob(pi_init, idx, targets)
    assert torch.allclose(scorer(idx, targets), expected)
    same = reward.LogRatioReward(pi_init, pi_init)
    assert torch.allclose(same(idx, targets), torch.zeros(3), atol=1e-6)


# ----------------------------------------------------------------------------------------
# Policy optimisation (issue: RLOO, adversarial, iterated IRL, IRFT)

def test_rloo_advantages_leave_one_out_and_exactly_zero_for_equal_rewards():
    rewards = torch.tensor([[1.0, 2.0, 6.0], [0.1, 0.1, 0.1]])
    expected = torch.tensor([[1 - 4.0, 2 - 3.5, 6 - 1.5], [0.0, 0.0, 0.0]])
    assert torch.allclose(afd.rloo_advantages(rewards), expected)
    for K in (2, 3, 5, 7):
        equal = torch.full((4, K), 0.1) * torch.arange(1, 5)[:, None] / 3  # rows of equal, inexact floats
        assert (afd.rloo_advantages(equal) == 0).all()


def test_rloo_step_moves_a_bandit_policy_to_the_best_action():
    """A one-step bandit: 3 actions with rewards 0, 1, 0.2; the policy is a table of logits."""
    torch.manual_seed(0)
    logits = torch.zeros(3, requires_grad=True)
    reward_of = torch.tensor([0.0, 1.0, 0.2])
    opt = torch.optim.SGD([logits], lr=0.5)
    P, K = 16, 4
    for _ in range(60):
        actions = torch.multinomial(torch.softmax(logits.detach(), 0), P * K, replacement=True)
        logp = torch.log_softmax(logits, 0)[actions][:, None]  # (B, 1): a one-token response
        loss, kl = afd.policy_gradient_loss(logp, logp.detach(), torch.ones_like(logp, dtype=torch.bool),
                                            reward_of[actions], K, beta_kl=0.1)
        assert (kl == 0).all()  # the reference is the policy itself here
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.softmax(logits, 0)[1] > 0.9


def test_policy_gradient_is_zero_when_all_rewards_are_equal():
    logits = torch.randn(5, requires_grad=True)
    actions = torch.tensor([0, 1, 2, 3, 4, 0])
    logp = torch.log_softmax(logits, 0)[actions][:, None]
    loss, _ = afd.policy_gradient_loss(logp, logp.detach(), torch.ones_like(logp, dtype=torch.bool),
                                       torch.full((6,), 0.3), group_size=3, beta_kl=0.5)
    loss.backward()
    assert (logits.grad == 0).all()


def test_kl_estimate_is_zero_for_the_same_weights_and_positive_otherwise(tiny_gpt):
    policy = tiny_gpt(seed=1)
    ref = frozen_copy(policy)
    tokens, lengths = generate(policy, [[1, 2, 3], [4, 5]], 8, 6, eos_id=0, generator=torch.Generator().manual_seed(0))
    prompts = [[1, 2, 3]] * 8 + [[4, 5]] * 8
    idx, targets, _ = make_batch(prompts, [t[:k] for t, k in zip(tokens.tolist(), lengths.tolist())], 0)
    logp, logp_ref = sequence_logprob(policy, idx, targets), sequence_logprob(ref, idx, targets)
    assert afd.kl_estimate(logp, logp_ref)[0] == 0.0
    other = tiny_gpt(seed=2)
    assert afd.kl_estimate(logp, sequence_logprob(other, idx, targets))[0] > 0


def test_irft_loss_matches_the_hand_computed_value_and_is_log2_at_the_reference():
    logp_demo, logp_ref_demo = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -5.0])
    logp_sample, logp_ref_sample = torch.tensor([-2.0, -6.0]), torch.tensor([-1.0, -6.5])
    beta = 0.5
    # margins: ((-3+4) - (-2+1)) = 2, ((-5+5) - (-6+6.5)) = -0.5
    expected = -(math.log(1 / (1 + math.exp(-1.0))) + math.log(1 / (1 + math.exp(0.25)))) / 2
    got = afd.irft_loss(logp_demo, logp_ref_demo, logp_sample, logp_ref_sample, beta)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    same = afd.irft_loss(logp_demo, logp_demo, logp_sample, logp_sample, beta)
    assert same.item() == pytest.approx(math.log(2), abs=1e-7)
