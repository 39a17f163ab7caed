"""The objectives of course.OBJECTIVES, each tested on its own (course mode).

One test or more per objective, named test_<short name>_... (the function's name; for a method,
the class in snake case, then the method) and marked @pytest.mark.objective("<module>.<name>").
Expected values are worked out by hand in the comments, or computed by an independent formula
(a loop, a brute-force enumeration, torch.distributions, math.log). A test never depends on
another objective: where the objective calls one (sft_loss calls token_logprobs, best_of_n_estimate
calls order_statistic_weights, ...), the test first replaces it by a reference written here or in
conftest.py, so that a mistake in one objective fails only that objective's tests.

A student who has written, say, afd.sft_loss grades it with

    python -m pytest -m "not slow" -k sft_loss

and an instructor checks that each objective's tests, and only those, fail without it with
`python tools/course.py check` (`python tools/course.py list` prints the objectives and their tests).
"""
import itertools
import math

import pytest
import torch

import afd
import model as model_module
import reward
from data import make_batch
from model import GPT, GPTConfig, frozen_copy, generate

LN2, LN3 = math.log(2), math.log(3)


# ----------------------------------------------------------------------------------------
# References that stand in for one objective while another is tested

def reference_order_statistic_weights(N, n):
    """C(i-1, n-1) / C(N, n) for i = 1..N, float64 (checked against enumeration below)."""
    return torch.tensor([math.comb(i - 1, n - 1) / math.comb(N, n) for i in range(1, N + 1)], dtype=torch.float64)


def reference_rloo_advantages(rewards):
    """A_i = r_i - mean_{j != i} r_j, with a loop over each group's members."""
    P, K = rewards.shape
    others = [[torch.cat([rewards[p, :i], rewards[p, i + 1:]]).mean() for i in range(K)] for p in range(P)]
    return rewards - torch.stack([torch.stack(row) for row in others])


def reference_gaussian_kl_to_prior(mu, log_sigma):
    return torch.distributions.kl_divergence(torch.distributions.Normal(mu, log_sigma.exp()),
                                             torch.distributions.Normal(0.0, 1.0))


def reference_gaussian_logpdf(x, mu, log_sigma):
    return torch.distributions.Normal(mu, log_sigma.exp()).log_prob(x)


def reference_td_differences(q_taken, mask, gamma):
    """Q(s_t, y_{t+1}) - gamma * Q(s_{t+1}, y_{t+2}) on the mask, next Q = 0 at the end; a loop."""
    td = torch.zeros_like(q_taken)
    B, T = q_taken.shape
    for b, t in itertools.product(range(B), range(T)):
        q_next = q_taken[b, t + 1] if t + 1 < T and mask[b, t + 1] else 0.0
        td[b, t] = q_taken[b, t] - gamma * q_next
    return td


class FixedLogprobs:
    """A stand-in language model whose log-probabilities of the given targets are a fixed table
    (B, T): two-token vocabulary, the target's logit log p and the other's log(1 - p), so that
    log softmax(logits)[target] = log p whichever way a loss gets there. Off the targets (-100)
    both tokens get probability 1/2."""

    def __init__(self, logp, targets):
        p = torch.where(targets != -100, logp.exp(), torch.full_like(logp, 0.5))
        y = targets.clamp(min=0)                                     # the target token, 0 or 1
        self.logits = torch.stack([torch.where(y == 0, p, 1 - p), torch.where(y == 1, p, 1 - p)], -1).log()

    def __call__(self, idx, targets=None):
        return self.logits, None


# ----------------------------------------------------------------------------------------
# 1. model.token_logprobs

def batch_with_prompts_and_padding():
    """Two rows: prompt [1, 2] then 3 response tokens, and prompt [4] then 1 response token and
    padding; targets a non-contiguous view, as idx[:, 1:] would be."""
    idx, targets, _ = make_batch([[1, 2], [4]], [[5, 6, 7], [8]], pad_id=0)
    return idx, torch.cat([targets, targets[:, :1]], 1)[:, :-1]


@pytest.mark.objective("model.token_logprobs")
def test_token_logprobs_match_a_loop_over_rows_and_tokens(tiny_gpt):
    gpt = tiny_gpt()
    idx, targets = batch_with_prompts_and_padding()
    assert not targets.is_contiguous()
    logits, _ = gpt(idx)
    out = model_module.token_logprobs(gpt, idx, targets)
    assert out.shape == targets.shape and out.dtype == torch.float32
    for b, t in itertools.product(*map(range, targets.shape)):
        y = int(targets[b, t])
        if y == -100:
            assert out[b, t].item() == 0.0, (b, t)  # exactly 0 off the response
        else:  # log p(y | idx[b, :t+1]) = logit - log sum exp of the logits at position t
            expected = logits[b, t, y] - torch.logsumexp(logits[b, t], dim=0)
            assert out[b, t].item() == pytest.approx(expected.item(), abs=1e-5), (b, t)
    out.sum().backward()  # the losses train through it
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gpt.parameters())


@pytest.mark.objective("model.token_logprobs")
def test_token_logprobs_are_float32_for_a_bfloat16_model(tiny_gpt):
    gpt = tiny_gpt().to(torch.bfloat16)
    idx, targets = batch_with_prompts_and_padding()
    out = model_module.token_logprobs(gpt, idx, targets)
    assert out.dtype == torch.float32  # log_softmax of bfloat16 logits loses too much
    expected = torch.log_softmax(gpt(idx)[0].float(), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    torch.testing.assert_close(out[targets != -100], expected[targets != -100])


@pytest.mark.objective("model.token_logprobs")
def test_token_logprobs_count_a_target_of_token_id_0(tiny_gpt):
    """Token 0 is a real token (the end of text, here): only -100 is off the response, so a mask of
    targets > 0 would drop these entries."""
    gpt = tiny_gpt()
    idx = torch.tensor([[5, 0, 3, 0, 2]])
    targets = torch.tensor([[-100, 3, 0, 0, -100]])
    out = model_module.token_logprobs(gpt, idx, targets)
    logp = torch.log_softmax(gpt(idx)[0].float(), -1)
    torch.testing.assert_close(out[0, 1:4], torch.stack([logp[0, 1, 3], logp[0, 2, 0], logp[0, 3, 0]]))
    assert out[0, 0] == 0 and out[0, 4] == 0 and (out[0, 2:4] < -0.1).all()


# ----------------------------------------------------------------------------------------
# 2. afd.sft_loss

@pytest.mark.objective("afd.sft_loss")
def test_sft_loss_by_hand_is_the_mean_over_response_tokens(reference_logprobs):
    logp = torch.tensor([[0.0, -1.0, -2.0, -3.0],
                         [0.0, 0.0, -6.0, 0.0]])
    targets = torch.tensor([[-100, 1, 0, 1],
                            [-100, -100, 1, -100]])
    gpt = FixedLogprobs(logp, targets)
    # 4 response tokens: -(-1 - 2 - 3 - 6) / 4 = 3
    # (a sum gives 12, a mean over all 8 entries 1.5, over the batch of 2 rows 6, a mean of the
    # row means (2 + 6) / 2 = 4)
    assert afd.sft_loss(gpt, torch.zeros(2, 4, dtype=torch.long), targets).item() == pytest.approx(3.0)


@pytest.mark.objective("afd.sft_loss")
def test_sft_loss_is_the_masked_response_nll_and_never_nan(tiny_gpt, reference_logprobs):
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


# ----------------------------------------------------------------------------------------
# 3. afd.discriminator_loss

@pytest.mark.objective("afd.discriminator_loss")
def test_discriminator_loss_by_hand():
    # positives r = 0, ln 3:   -log sigma(0) = ln 2,  -log sigma(ln 3) = -log 3/4 = ln 4/3
    # negatives r = 0, -ln 3, ln 3:  -log sigma(-r) = ln 2, ln 4/3, ln 4
    # each class averaged on its own: (ln 2 + ln 4/3) / 2 + (ln 2 + ln 4/3 + ln 4) / 3
    r_pos, r_neg = torch.tensor([0.0, LN3]), torch.tensor([0.0, -LN3, LN3])
    expected = (LN2 + math.log(4 / 3)) / 2 + (LN2 + math.log(4 / 3) + math.log(4)) / 3
    assert afd.discriminator_loss(r_pos, r_neg).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.objective("afd.discriminator_loss")
def test_discriminator_loss_gradient_vanishes_at_the_log_density_ratio():
    """Free logits r(y) for 4 outcomes, 10 positives drawn as d_pos and 20 negatives as d_neg (exact
    frequencies): the loss is stationary at r* = log d_pos - log d_neg, not elsewhere. With unequal
    class sizes this needs each class averaged on its own (a mean over all 30 rows, or sums, move
    the optimum to log(10 d_pos) - log(20 d_neg))."""
    d_pos, d_neg = torch.tensor([0.5, 0.3, 0.1, 0.1]), torch.tensor([0.1, 0.2, 0.3, 0.4])
    pos = torch.tensor([0] * 5 + [1] * 3 + [2] + [3])
    neg = torch.tensor([0] * 2 + [1] * 4 + [2] * 6 + [3] * 8)
    r = (d_pos / d_neg).log().requires_grad_()
    afd.discriminator_loss(r[pos], r[neg]).backward()
    assert r.grad.abs().max() < 1e-6
    r0 = torch.zeros(4, requires_grad=True)
    afd.discriminator_loss(r0[pos], r0[neg]).backward()
    assert r0.grad.abs().max() > 0.1  # and the check is not vacuous


@pytest.mark.objective("afd.discriminator_loss")
def test_discriminator_loss_is_finite_with_exact_gradients_at_extreme_logits():
    """Logits of +-200: -log sigma(-200) = 200 and -log sigma(200) = 0 in float32 only in the stable
    form (log(sigmoid(r)) and log(1 - sigmoid(r)) give inf there, and NaN gradients)."""
    r_pos = torch.tensor([-200.0, 200.0], requires_grad=True)
    r_neg = torch.tensor([200.0, -200.0], requires_grad=True)
    loss = afd.discriminator_loss(r_pos, r_neg)
    assert loss.item() == pytest.approx(200.0)  # (200 + 0) / 2 + (200 + 0) / 2
    loss.backward()  # d/dr_pos -(1 - sigma(r)) / 2, d/dr_neg sigma(r) / 2
    torch.testing.assert_close(r_pos.grad, torch.tensor([-0.5, 0.0]))
    torch.testing.assert_close(r_neg.grad, torch.tensor([0.5, 0.0]))


# ----------------------------------------------------------------------------------------
# 4. afd.rloo_advantages, afd.policy_gradient_loss

@pytest.mark.objective("afd.rloo_advantages")
def test_rloo_advantages_leave_one_out_and_exactly_zero_for_equal_rewards():
    rewards = torch.tensor([[1.0, 2.0, 6.0], [0.1, 0.1, 0.1]])
    # 1 - (2 + 6)/2, 2 - (1 + 6)/2, 6 - (1 + 2)/2; a mean that includes r_i gives -2, -1, 3
    expected = torch.tensor([[1 - 4.0, 2 - 3.5, 6 - 1.5], [0.0, 0.0, 0.0]])
    assert torch.allclose(afd.rloo_advantages(rewards), expected)
    for K in (2, 3, 5, 7):
        equal = torch.full((4, K), 0.1) * torch.arange(1, 5)[:, None] / 3  # rows of equal, inexact floats
        assert (afd.rloo_advantages(equal) == 0).all()


@pytest.mark.objective("afd.rloo_advantages")
def test_rloo_advantages_of_two_samples_are_their_difference():
    # K = 2: A_1 = r_1 - r_2 and A_2 = r_2 - r_1 (the first reward as baseline gives 0 and 2)
    assert afd.rloo_advantages(torch.tensor([[3.0, 5.0], [1.0, -1.0]])).tolist() == [[-2.0, 2.0], [2.0, -2.0]]


@pytest.mark.objective("afd.policy_gradient_loss")
def test_policy_gradient_loss_by_hand(monkeypatch):
    """Two prompts, K = 2 samples each, 2 positions (the second row of each group has one token;
    its second entry, 9, is off the mask and must not count)."""
    monkeypatch.setattr(afd, "rloo_advantages", reference_rloo_advantages)
    logp = torch.tensor([[-1.0, -2.0], [-0.5, 9.0], [-1.0, -1.0], [-2.0, 9.0]], requires_grad=True)
    logp_ref = torch.tensor([[-1.5, -2.0], [-0.5, 7.0], [-1.0, -2.0], [-1.0, 7.0]])
    mask = torch.tensor([[True, True], [True, False], [True, True], [True, False]])
    rewards = torch.tensor([1.0, 2.0, 0.0, 3.0])
    loss, kl = afd.policy_gradient_loss(logp, logp_ref, mask, rewards, group_size=2, beta_kl=0.5)
    # kl_i = sum over the mask of logp - logp_ref: 0.5 + 0, 0, 0 + 1, -1
    assert kl.tolist() == [0.5, 0.0, 1.0, -1.0]
    # r~ = r - 0.5 kl = 0.75, 2, -0.5, 3.5; A (K = 2: r~_i - r~_other) = -1.25, 1.25, -4, 4
    # sum_t logp on the mask = -3, -0.5, -2, -2
    # L = -mean_i A_i sum_t logp = -(3.75 - 0.625 + 8 - 8) / 4 = -0.78125
    # (KL with a + sign: -0.46875; KL subtracted after the baseline, A = rloo(r) - 0.5 kl: -0.8125)
    assert loss.item() == pytest.approx(-0.78125, abs=1e-6)
    # dL/dlogp[i, t] = -A_i / 4 on the mask: A is a constant, the KL term carries no gradient
    loss.backward()
    expected = torch.tensor([[0.3125, 0.3125], [-0.3125, 0.0], [1.0, 1.0], [-1.0, 0.0]])
    torch.testing.assert_close(logp.grad, expected)


@pytest.mark.objective("afd.policy_gradient_loss")
def test_policy_gradient_loss_moves_a_bandit_policy_to_the_best_action(monkeypatch):
    """A one-step bandit: 3 actions with rewards 0, 1, 0.2; the policy is a table of logits."""
    monkeypatch.setattr(afd, "rloo_advantages", reference_rloo_advantages)
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


@pytest.mark.objective("afd.policy_gradient_loss")
def test_policy_gradient_loss_gradient_is_zero_when_all_rewards_are_equal(monkeypatch):
    monkeypatch.setattr(afd, "rloo_advantages", reference_rloo_advantages)
    logits = torch.randn(5, requires_grad=True)
    actions = torch.tensor([0, 1, 2, 3, 4, 0])
    logp = torch.log_softmax(logits, 0)[actions][:, None]
    loss, _ = afd.policy_gradient_loss(logp, logp.detach(), torch.ones_like(logp, dtype=torch.bool),
                                       torch.full((6,), 0.3), group_size=3, beta_kl=0.5)
    loss.backward()
    assert (logits.grad == 0).all()


@pytest.mark.objective("afd.policy_gradient_loss")
def test_policy_gradient_loss_groups_rows_prompt_major_with_three_prompts_of_two_samples(monkeypatch):
    """P = 3 prompts, K = 2 samples each, rows prompt-major (rows 0-1 answer prompt 0): the baseline of
    a row is the other sample of its own prompt. Grouping sample-major (rows 0, 3 / 1, 4 / 2, 5) or
    into K groups of P gives other values, checked to differ."""
    monkeypatch.setattr(afd, "rloo_advantages", reference_rloo_advantages)
    logp = torch.tensor([[-1.0], [-2.0], [-0.5], [-3.0], [-1.5], [-0.25]], dtype=torch.float64, requires_grad=True)
    mask = torch.ones(6, 1, dtype=torch.bool)
    rewards = torch.tensor([1.0, 4.0, -2.0, 0.0, 3.0, 5.0], dtype=torch.float64)
    loss, _ = afd.policy_gradient_loss(logp, logp.detach(), mask, rewards, group_size=2, beta_kl=0.0)

    def by_groups(groups):  # -mean_i A_i logp_i, A_i = r_i - the mean of the others of i's group
        total = 0.0
        for group in groups:
            for i in group:
                total += -(rewards[i] - sum(rewards[j] for j in group if j != i) / (len(group) - 1)) * logp[i, 0].item()
        return float(total) / 6
    assert loss.item() == pytest.approx(by_groups([[0, 1], [2, 3], [4, 5]]), abs=1e-12)
    for wrong in ([[0, 3], [1, 4], [2, 5]], [[0, 2, 4], [1, 3, 5]], [[0, 1, 2], [3, 4, 5]]):
        assert abs(by_groups(wrong) - loss.item()) > 0.1
    # the gradient with a KL term: REINFORCE's, -A_i / 6 with A from r~ = r - 0.3 kl a constant (the
    # KL term carries no gradient of its own)
    logp_ref = torch.tensor([[-1.5], [-1.0], [-0.5], [-2.0], [-1.0], [-1.0]], dtype=torch.float64)
    afd.policy_gradient_loss(logp, logp_ref, mask, rewards, 2, 0.3)[0].backward()
    shaped = (rewards - 0.3 * (logp.detach() - logp_ref)[:, 0]).view(3, 2)
    advantages = (shaped - shaped.flip(1)).view(6, 1)  # K = 2: r~_i - r~_other
    torch.testing.assert_close(logp.grad, -advantages / 6)


# ----------------------------------------------------------------------------------------
# 6. reward.bradley_terry_loss, reward.LogRatioReward.forward

@pytest.mark.objective("reward.bradley_terry_loss")
def test_bradley_terry_loss_by_hand():
    # margins r+ - r- = ln 3 and 0: -log sigma(ln 3) = ln 4/3, -log sigma(0) = ln 2; mean ln(8/3) / 2
    # (chosen and rejected swapped: (ln 4 + ln 2) / 2; a sum: ln(8/3))
    chosen, rejected = torch.tensor([1.0, 5.0], requires_grad=True), torch.tensor([1.0 - LN3, 5.0])
    loss = reward.bradley_terry_loss(chosen, rejected)
    assert loss.item() == pytest.approx(math.log(8 / 3) / 2, abs=1e-6)
    loss.backward()  # d/dr+ = -(1 - sigma(margin)) / 2 = -1/8, -1/4: a step raises the chosen ones
    torch.testing.assert_close(chosen.grad, torch.tensor([-0.125, -0.25]))


@pytest.mark.objective("reward.bradley_terry_loss")
def test_bradley_terry_loss_is_stable_at_extreme_margins():
    """Margins of -200 and +200: losses 200 and 0, finite gradients -1/2 and 0 (log(sigmoid(.)) gives inf)."""
    chosen = torch.tensor([-100.0, 100.0], requires_grad=True)
    rejected = torch.tensor([100.0, -100.0], requires_grad=True)
    loss = reward.bradley_terry_loss(chosen, rejected)
    assert loss.item() == pytest.approx(100.0)
    loss.backward()
    torch.testing.assert_close(chosen.grad, torch.tensor([-0.5, 0.0]))
    torch.testing.assert_close(rejected.grad, torch.tensor([0.5, 0.0]))


@pytest.mark.objective("reward.LogRatioReward.forward")
def test_log_ratio_reward_forward_is_the_difference_of_sequence_logprobs(tiny_gpt, reference_logprobs):
    pi_init, pi_sft = tiny_gpt(seed=0), tiny_gpt(seed=1)
    scorer = reward.LogRatioReward(pi_sft, pi_init)
    assert not any(p.requires_grad for p in scorer.parameters())
    idx, targets, last = make_batch([[1, 2], [3, 4, 5], [6]], [[7, 8, 9], [10, 11], [1, 2, 3, 4]], pad_id=0)
    # log pi_sft(y|x) - log pi_init(y|x): sums over each row's response tokens, not means
    expected = (reference_logprobs(pi_sft, idx, targets) - reference_logprobs(pi_init, idx, targets)).sum(1)
    torch.testing.assert_close(scorer(idx, targets, last), expected.detach())
    assert expected.abs().min() > 1e-3  # the check is not trivially 0 == 0
    same = reward.LogRatioReward(pi_init, pi_init)
    assert torch.allclose(same(idx, targets, last), torch.zeros(3), atol=1e-6)


# ----------------------------------------------------------------------------------------
# 8. afd.irft_loss

@pytest.mark.objective("afd.irft_loss")
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


@pytest.mark.objective("afd.irft_loss")
def test_irft_loss_gradient_raises_the_demonstration_and_lowers_the_sample():
    """The loss trains the policy's log-probs (gradcheck in float64; a loss built from detached values
    or .item() has none), in the right direction: down on the demonstration's log-prob, up on the
    sample's; the reference's log-probs are constants to the caller but enter with opposite signs.
    Stable at a margin of -400 (beta 0.5): a loss of 200, not inf."""
    args = [torch.tensor([-3.0, -5.0, -1.0], dtype=torch.float64, requires_grad=True) for _ in range(4)]
    assert torch.autograd.gradcheck(lambda *a: afd.irft_loss(*a, 0.7), args)
    logp_demo, logp_ref_demo, logp_sample, logp_ref_sample = (a.detach().clone().requires_grad_() for a in args)
    afd.irft_loss(logp_demo, logp_ref_demo, logp_sample, logp_ref_sample, 0.7).backward()
    assert (logp_demo.grad < 0).all() and (logp_sample.grad > 0).all()  # a step raises log pi(y^E), lowers log pi(y~)
    extreme = afd.irft_loss(torch.tensor([-400.0]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), 0.5)
    assert extreme.item() == pytest.approx(200.0)


# ----------------------------------------------------------------------------------------
# 9. afd.order_statistic_weights, afd.best_of_n_estimate, afd.kl_bound

@pytest.mark.objective("afd.order_statistic_weights")
def test_order_statistic_weights_by_hand():
    # N = 4, n = 2: C(4, 2) = 6 pairs; the i-th smallest is the best of C(i-1, 1) = i-1 of them
    torch.testing.assert_close(afd.order_statistic_weights(4, 2), torch.tensor([0, 1, 2, 3], dtype=torch.float64) / 6)
    # N = 5, n = 3: C(5, 3) = 10 triples; C(i-1, 2) = 0, 0, 1, 3, 6 of them have the i-th as best
    torch.testing.assert_close(afd.order_statistic_weights(5, 3),
                               torch.tensor([0, 0, 1, 3, 6], dtype=torch.float64) / 10)
    # n = 1: a uniform draw; n = N: always the largest
    torch.testing.assert_close(afd.order_statistic_weights(4, 1), torch.full((4,), 0.25, dtype=torch.float64))
    torch.testing.assert_close(afd.order_statistic_weights(4, 4), torch.tensor([0, 0, 0, 1], dtype=torch.float64))


@pytest.mark.objective("afd.order_statistic_weights")
def test_order_statistic_weights_count_the_best_of_every_n_subset():
    """w_i = the fraction of the n-subsets of positions 1..N whose largest is i, by enumeration;
    float64, since best_of_n_estimate applies it to float64 values."""
    N = 7
    for n in range(1, N + 1):
        subsets = list(itertools.combinations(range(1, N + 1), n))
        counted = torch.tensor([sum(max(s) == i for s in subsets) / len(subsets) for i in range(1, N + 1)],
                               dtype=torch.float64)
        w = afd.order_statistic_weights(N, n)
        assert w.dtype == torch.float64 and w.shape == (N,)
        torch.testing.assert_close(w, counted, rtol=0, atol=1e-15)  # float32 arithmetic is ~1e-8 off


def brute_force_best_of_n(scores, values, n):
    """E[value of the best of a random n-subset], enumerating the subsets; of equal scores, the
    later index counts as better (what sorting ascending, stably, gives)."""
    N = scores.shape[1]
    return torch.tensor([sum(values[p, max(s, key=lambda i: (scores[p, i].item(), i))].item()
                             for s in itertools.combinations(range(N), n)) / math.comb(N, n)
                         for p in range(scores.shape[0])], dtype=torch.float64)


@pytest.mark.objective("afd.best_of_n_estimate")
def test_best_of_n_estimate_equals_brute_force_enumeration(monkeypatch):
    monkeypatch.setattr(afd, "order_statistic_weights", reference_order_statistic_weights)
    torch.manual_seed(0)
    P, N = 3, 7
    scores, values = torch.randn(P, N), torch.randn(P, N)
    for n in range(1, N + 1):
        got = afd.best_of_n_estimate(scores, values, n)
        assert got.shape == (P,) and got.dtype == torch.float64
        torch.testing.assert_close(got, brute_force_best_of_n(scores, values, n), rtol=0, atol=1e-9)
    assert torch.allclose(afd.best_of_n_estimate(scores, values, 1), values.double().mean(1))
    assert torch.allclose(afd.best_of_n_estimate(scores, values, N),
                          values.double().gather(1, scores.argmax(1, keepdim=True)).squeeze(1))


@pytest.mark.objective("afd.best_of_n_estimate")
def test_best_of_n_estimate_breaks_ties_by_index(monkeypatch):
    monkeypatch.setattr(afd, "order_statistic_weights", reference_order_statistic_weights)
    scores = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0, 2.0], [3.0, 3.0, 3.0, 1.0, 1.0, 1.0]])
    values = torch.tensor([[10.0, 20.0, 30.0, 40.0, 50.0, 60.0], [1.0, 4.0, 9.0, 16.0, 25.0, 36.0]])
    for n in range(1, 7):
        torch.testing.assert_close(afd.best_of_n_estimate(scores, values, n), brute_force_best_of_n(scores, values, n))
    # 64 equal scores: the i-th (by index) is the best of a subset when it is its largest index,
    # so the estimate is w @ values in index order (an unstable sort reorders ties this large)
    N, n = 64, 5
    values = torch.arange(N, dtype=torch.float64)[None] ** 2
    torch.testing.assert_close(afd.best_of_n_estimate(torch.zeros(1, N), values, n),
                               values @ reference_order_statistic_weights(N, n))


@pytest.mark.objective("afd.kl_bound")
def test_kl_bound_by_hand():
    assert afd.kl_bound(1) == 0.0  # Best-of-1 is the policy itself
    assert afd.kl_bound(2) == pytest.approx(math.log(2) - 1 / 2)      # 0.193
    assert afd.kl_bound(4) == pytest.approx(math.log(4) - 3 / 4)      # 0.636
    assert afd.kl_bound(16) == pytest.approx(math.log(16) - 15 / 16)  # 1.835
    bounds = [afd.kl_bound(n) for n in range(1, 65)]
    assert all(a < b for a, b in zip(bounds, bounds[1:]))  # grows with n, like log n


# ----------------------------------------------------------------------------------------
# 10. AVA: reward.gaussian_kl_to_prior, reward.gaussian_logpdf, reward.td_differences,
#     reward.reward_weights, reward.contrastive_expected_return, reward.ava_token_objective

@pytest.mark.objective("reward.gaussian_kl_to_prior")
def test_gaussian_kl_to_prior_closed_form():
    # mu = 0.5, sigma = 2: (0.25 + 4 - 1) / 2 - log 2   (sigma for sigma^2: (0.25 + 2 - 1) / 2 - log 2)
    kl = reward.gaussian_kl_to_prior(torch.tensor(0.5), torch.tensor(math.log(2.0)))
    assert kl.item() == pytest.approx(1.625 - math.log(2.0), abs=1e-6)
    assert reward.gaussian_kl_to_prior(torch.tensor(0.0), torch.tensor(0.0)).item() == 0.0  # q = prior
    mu, log_sigma = torch.randn(50), torch.randn(50)
    torch.testing.assert_close(reward.gaussian_kl_to_prior(mu, log_sigma),
                               reference_gaussian_kl_to_prior(mu, log_sigma))


@pytest.mark.objective("reward.gaussian_logpdf")
def test_gaussian_logpdf_by_hand_and_against_torch_distributions():
    # at the mean, sigma = 1: -log(2 pi) / 2;  x = mu + 2 sigma, sigma = e: -log(2 pi) / 2 - 1 - 2
    assert reward.gaussian_logpdf(torch.tensor(0.3), torch.tensor(0.3), torch.tensor(0.0)).item() == pytest.approx(
        -0.5 * math.log(2 * math.pi))
    assert reward.gaussian_logpdf(torch.tensor(1.0 + 2 * math.e), torch.tensor(1.0), torch.tensor(1.0)).item() == (
        pytest.approx(-0.5 * math.log(2 * math.pi) - 1 - 2))
    x, mu, log_sigma = torch.randn(20), torch.randn(20), torch.randn(20)
    torch.testing.assert_close(reward.gaussian_logpdf(x, mu, log_sigma), reference_gaussian_logpdf(x, mu, log_sigma))


@pytest.mark.objective("reward.td_differences")
def test_td_differences_by_hand():
    q = torch.tensor([[1.0, 2.0, 3.0, 5.0],
                      [4.0, 6.0, 7.0, 8.0],
                      [2.0, 3.0, 4.0, 5.0]])
    mask = torch.tensor([[True, True, True, False],    # 3 response tokens, then padding (Q = 5 there)
                         [False, True, True, True],    # a prompt position, then 3 tokens to the end
                         [True, True, True, True]])    # a one-token prompt: the response fills the row
    td = reward.td_differences(q, mask, gamma=0.9)
    assert td.shape == q.shape
    # row 0: 1 - 0.9*2, 2 - 0.9*3, 3 - 0 (the episode ends: the padding's 5 must not leak in)
    torch.testing.assert_close(td[0, :3], torch.tensor([1.0 - 1.8, 2.0 - 2.7, 3.0]))
    # row 1: 6 - 0.9*7, 7 - 0.9*8, 8 - 0 (nothing after the last column)
    torch.testing.assert_close(td[1, 1:], torch.tensor([6.0 - 6.3, 7.0 - 7.2, 8.0]))
    # row 2: 2 - 2.7, 3 - 3.6, 4 - 4.5, 5 - 0 (no wrap-around to the first column's Q = 2)
    torch.testing.assert_close(td[2], torch.tensor([2.0 - 2.7, 3.0 - 3.6, 4.0 - 4.5, 5.0]))


@pytest.mark.objective("reward.gaussian_kl_to_prior")
def test_gaussian_kl_to_prior_gradient_in_float64():
    mu = torch.tensor([0.5, -1.5, 0.0], dtype=torch.float64, requires_grad=True)
    log_sigma = torch.tensor([0.3, -0.7, 1.2], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(reward.gaussian_kl_to_prior, (mu, log_sigma))
    reward.gaussian_kl_to_prior(mu, log_sigma).sum().backward()  # d/dmu = mu, d/dlog sigma = sigma^2 - 1
    torch.testing.assert_close(mu.grad, mu.detach())
    torch.testing.assert_close(log_sigma.grad, (2 * log_sigma.detach()).exp() - 1)


@pytest.mark.objective("reward.gaussian_logpdf")
def test_gaussian_logpdf_gradient_in_float64():
    x = torch.tensor([0.2, -1.0, 3.0], dtype=torch.float64, requires_grad=True)
    mu = torch.tensor([0.0, 0.5, -1.0], dtype=torch.float64, requires_grad=True)
    log_sigma = torch.tensor([0.0, -0.5, 0.8], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(reward.gaussian_logpdf, (x, mu, log_sigma))


@pytest.mark.objective("reward.td_differences")
def test_td_differences_carry_the_gradient_of_both_q_terms():
    """AVRIL trains through Q(s_t, .) and Q(s_{t+1}, .) alike: no DQN-style detached target. In float64
    against finite differences; d td_t / d q_{t+1} = -gamma on the mask."""
    q = torch.tensor([[1.0, 2.0, 3.0, 5.0], [4.0, 6.0, 7.0, 8.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, True, False], [False, True, True, True]])
    assert torch.autograd.gradcheck(lambda x: reward.td_differences(x, mask, 0.9), (q,))
    reward.td_differences(q, mask, 0.9)[0, 0].backward()
    torch.testing.assert_close(q.grad[0], torch.tensor([1.0, -0.9, 0.0, 0.0], dtype=torch.float64))


def reference_reward_weights(attention, rows):
    """w_t = 1/|y| sum_i A[i, t] over a row's real queries i; a loop."""
    w = torch.zeros(rows.shape, dtype=attention.dtype)
    for b in range(rows.shape[0]):
        real = [i for i in range(rows.shape[1]) if rows[b, i]]
        for t in real:
            w[b, t] = sum(attention[b, i, t] for i in real) / len(real)
    return w


@pytest.mark.objective("reward.reward_weights")
def test_reward_weights_by_hand():
    # row 0: 3 real positions of 4 (the 4th is padding, whose query row and column must not count);
    # row 1: all 4 real. Rows of A sum to 1, causal (A[i, t] = 0 for t > i).
    attention = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [0.25, 0.75, 0.0, 0.0], [0.5, 0.1, 0.4, 0.0], [0.1, 0.2, 0.3, 0.4]],
                              [[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.2, 0.2, 0.6, 0.0], [0.0, 0.0, 0.3, 0.7]]])
    rows = torch.tensor([[True, True, True, False], [True, True, True, True]])
    w = reward.reward_weights(attention, rows)
    # row 0: (1 + 0.25 + 0.5) / 3, (0.75 + 0.1) / 3, 0.4 / 3, 0 (padding);
    # row 1: (1 + 0.5 + 0.2 + 0) / 4, (0.5 + 0.2) / 4, (0.6 + 0.3) / 4, 0.7 / 4
    torch.testing.assert_close(w, torch.tensor([[1.75 / 3, 0.85 / 3, 0.4 / 3, 0.0], [0.425, 0.175, 0.225, 0.175]]))
    torch.testing.assert_close(w.sum(dim=1), torch.ones(2))          # each sequence's weights sum to 1
    A = torch.rand(3, 5, 5, dtype=torch.float64).tril()
    A = A / A.sum(-1, keepdim=True)
    real = torch.tensor([[True] * 5, [True] * 2 + [False] * 3, [True] * 4 + [False]])
    torch.testing.assert_close(reward.reward_weights(A, real), reference_reward_weights(A, real))


@pytest.mark.objective("reward.reward_weights")
def test_reward_weights_gradient_in_float64():
    A = torch.rand(2, 4, 4, dtype=torch.float64).tril().requires_grad_()
    rows = torch.tensor([[True, True, True, False], [True, True, True, True]])
    assert torch.autograd.gradcheck(lambda a: reward.reward_weights(a, rows), (A,))
    reward.reward_weights(A, rows)[0, 0].backward()  # w_0 of row 0 gets 1/3 from each real query's column 0
    torch.testing.assert_close(A.grad[0, :, 0], torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0], dtype=torch.float64))


@pytest.mark.objective("reward.contrastive_expected_return")
def test_contrastive_expected_return_by_hand_and_at_extreme_rewards():
    # margins 0, ln 3 and -ln 3: sigma = 1/2, 3/4, 1/4 (sigma, not log sigma): mean 1/2
    r_chosen = torch.tensor([0.5, LN3, -1.0 - LN3])
    assert reward.contrastive_expected_return(r_chosen, torch.tensor([0.5, 0.0, -1.0])).item() == pytest.approx(0.5)
    r = torch.tensor([100.0, -100.0], requires_grad=True)
    value = reward.contrastive_expected_return(r[:1], r[1:])
    value.backward()
    assert value.item() == pytest.approx(1.0) and torch.isfinite(r.grad).all()
    x = torch.tensor([0.3, -1.2], dtype=torch.float64, requires_grad=True)  # d/dx sigma(x) = sigma (1 - sigma), / 2
    reward.contrastive_expected_return(x, torch.zeros(2, dtype=torch.float64)).backward()
    torch.testing.assert_close(x.grad, torch.sigmoid(x.detach()) * torch.sigmoid(-x.detach()) / 2)


AVA_V, AVA_EOT, AVA_SEP = 16, 0, 1


def tiny_ava_model():
    torch.manual_seed(0)
    model = reward.AVARewardModel.from_policy(GPT(GPTConfig(block_size=16, vocab_size=AVA_V, n_layer=2, n_head=2,
                                                            n_embd=32)))
    torch.nn.init.normal_(model.reward_head.weight, std=0.5)  # make the rewards depend on the input
    torch.nn.init.normal_(model.reward_head.bias, std=0.5)
    return model.eval()


def reference_ava_terms(model, idx, prompt, response, lam, gamma, alpha, beta):
    """AVA's per-token terms, written out token by token from the model's parts: the last block's
    attention by a loop over heads, the weights by reference_reward_weights, the Gaussian terms by
    torch.distributions. Returns [(likelihood_t, bayes_t, w_t mu_t)] for each response token."""
    trunk = model.trunk
    x = trunk.transformer.wte(idx) + trunk.transformer.wpe(torch.arange(idx.shape[1]))
    for block in trunk.transformer.h[:-1]:
        x = block(x)
    last = trunk.transformer.h[-1]
    q, k, _ = last.attn.c_attn(last.ln_1(x)).split(32, dim=2)
    heads = []
    for head in range(2):  # per head: softmax(q k^T / sqrt(16)) under the causal mask
        qh, kh = q[0, :, 16 * head:16 * (head + 1)], k[0, :, 16 * head:16 * (head + 1)]
        scores = qh @ kh.T / 4.0
        heads.append(torch.where(torch.ones(len(scores), len(scores)).tril().bool(), scores, -torch.inf).softmax(-1))
    attention = (heads[0] + heads[1])[None] / 2                      # (1, T, T)
    w = reference_reward_weights(attention, torch.ones(1, idx.shape[1], dtype=torch.bool))[0]
    h = trunk.hidden(idx)[0]                                         # (T, C)
    Q = torch.log_softmax(alpha * trunk.lm_head(h), -1)              # (T, V)
    params = model.reward_head(h).view(-1, 2, AVA_V)                 # (T, 2, V)
    start, terms = len(prompt) - 1, []
    for k_, y in enumerate(response):
        t = start + k_
        q_next = w[t + 1] * Q[t + 1, response[k_ + 1]] if k_ + 1 < len(response) else 0.0
        td = w[t] * Q[t, y] - gamma * q_next
        mu, sigma = w[t] * params[t, 0, y], w[t] * params[t, 1, y].exp()
        normal = torch.distributions.Normal(mu, sigma)
        bayes = -torch.distributions.kl_divergence(normal, torch.distributions.Normal(0.0, 1.0)) + lam * normal.log_prob(td)
        terms.append((beta * Q[t, y], bayes, mu))
    return terms


@pytest.mark.objective("reward.ava_token_objective")
def test_ava_token_objective_on_a_three_token_response(monkeypatch):
    for name, ref in [("gaussian_kl_to_prior", reference_gaussian_kl_to_prior), ("reward_weights", reference_reward_weights),
                      ("gaussian_logpdf", reference_gaussian_logpdf), ("td_differences", reference_td_differences)]:
        monkeypatch.setattr(reward, name, ref)
    model = tiny_ava_model()
    lam, gamma, alpha, beta = 0.7, 0.9, 1.5, 0.8
    prompt, response = [5, 6, AVA_SEP], [7, 8, AVA_EOT]
    idx, targets, _ = make_batch([prompt], [response], AVA_EOT)
    likelihood, bayes, mask, mu = reward.ava_token_objective(model, idx, targets, lam, gamma, alpha, beta)
    assert mask[0].nonzero().flatten().tolist() == [2, 3, 4]  # states s_0..s_2 predict y_1..y_3
    expected = reference_ava_terms(model, idx, prompt, response, lam, gamma, alpha, beta)
    for column, values in zip((likelihood, bayes, mu), zip(*expected)):
        torch.testing.assert_close(column[0, 2:5], torch.stack(values).detach(), atol=1e-5, rtol=1e-5)
        assert column[0][~mask[0]].abs().sum() == 0
    # gradients: both Q terms of the TD difference and the weights carry them, as in the reference
    model.zero_grad()
    (likelihood.sum() + bayes.sum()).backward()
    got = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    sum(a + b for a, b, _ in reference_ava_terms(model, idx, prompt, response, lam, gamma, alpha, beta)).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, atol=1e-5 * float(p.grad.abs().max()), rtol=1e-4, msg=name)
    assert got["trunk.transformer.h.1.attn.c_attn.weight"].abs().sum() > 0  # the weights' path trains the trunk too


# ----------------------------------------------------------------------------------------
# 11. afd.kl_estimate

@pytest.mark.objective("afd.kl_estimate")
def test_kl_estimate_by_hand():
    # log pi - log pi_ref = 1, 0, 2: mean 1, sample std sqrt((0 + 1 + 1) / 2) = 1, stderr 1 / sqrt(3)
    mean, se = afd.kl_estimate(torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-2.0, -2.0, -5.0]))
    assert (mean, se) == (pytest.approx(1.0), pytest.approx(1 / math.sqrt(3)))


@pytest.mark.objective("afd.kl_estimate")
def test_kl_estimate_keeps_the_sign_of_each_log_ratio():
    # log pi - log pi_ref = -1, 2, -4: mean -1 (absolute values: 7/3), sample std sqrt((0 + 9 + 9) / 2) = 3
    mean, se = afd.kl_estimate(torch.tensor([-3.0, -1.0, -6.0]), torch.tensor([-2.0, -3.0, -2.0]))
    assert (mean, se) == (pytest.approx(-1.0), pytest.approx(3 / math.sqrt(3)))


@pytest.mark.objective("afd.kl_estimate")
def test_kl_estimate_is_zero_for_the_same_weights_and_positive_otherwise(tiny_gpt, reference_logprobs):
    policy = tiny_gpt(seed=1)
    ref = frozen_copy(policy)
    tokens, lengths = generate(policy, [[1, 2, 3], [4, 5]], 8, 6, eos_id=0, generator=torch.Generator().manual_seed(0))
    prompts = [[1, 2, 3]] * 8 + [[4, 5]] * 8
    idx, targets, _ = make_batch(prompts, [t[:k] for t, k in zip(tokens.tolist(), lengths.tolist())], 0)
    logp, logp_ref = reference_logprobs(policy, idx, targets).sum(1), reference_logprobs(ref, idx, targets).sum(1)
    assert afd.kl_estimate(logp, logp_ref)[0] == 0.0
    other = tiny_gpt(seed=2)
    assert afd.kl_estimate(logp, reference_logprobs(other, idx, targets).sum(1))[0] > 0
