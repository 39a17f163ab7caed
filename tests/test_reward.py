"""AVA (reward.AVARewardModel and its objective, METHOD.md section 10): closed forms, the TD
term, training on a toy demonstration set, and padding invariance."""
import math
import random

import pytest
import torch

import reward
from data import make_batch
from model import GPT, GPTConfig, configure_optimizer, token_logprobs
from reward import (AVARewardModel, ava_d_loss, ava_p_loss, ava_token_objective, bradley_terry_loss,
                    gaussian_kl_to_prior, gaussian_logpdf, td_differences)

V, EOT, SEP = 16, 0, 1
CONFIG = GPTConfig(block_size=16, vocab_size=V, n_layer=2, n_head=2, n_embd=32)


def tiny_ava(seed=0, random_reward_head=False):
    torch.manual_seed(seed)
    model = AVARewardModel.from_policy(GPT(CONFIG))
    if random_reward_head:  # the head starts at zero; make the rewards depend on the input
        torch.nn.init.normal_(model.reward_head.weight, std=0.5)
        torch.nn.init.normal_(model.reward_head.bias, std=0.5)
    return model.eval()


def test_kl_to_prior_closed_form():
    # mu = 0.5, sigma = 2: (0.25 + 4 - 1) / 2 - log 2
    kl = gaussian_kl_to_prior(torch.tensor(0.5), torch.tensor(math.log(2.0)))
    assert kl.item() == pytest.approx(1.625 - math.log(2.0), abs=1e-6)
    assert gaussian_kl_to_prior(torch.tensor(0.0), torch.tensor(0.0)).item() == 0.0  # q = prior
    mu, log_sigma = torch.randn(50), torch.randn(50)
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(mu, log_sigma.exp()),
                                                 torch.distributions.Normal(0.0, 1.0))
    torch.testing.assert_close(gaussian_kl_to_prior(mu, log_sigma), expected)


def test_gaussian_logpdf():
    x, mu, log_sigma = torch.randn(20), torch.randn(20), torch.randn(20)
    expected = torch.distributions.Normal(mu, log_sigma.exp()).log_prob(x)
    torch.testing.assert_close(gaussian_logpdf(x, mu, log_sigma), expected)


def test_td_differences_by_hand():
    q = torch.tensor([[1.0, 2.0, 3.0, 5.0]])
    mask = torch.tensor([[True, True, True, False]])  # 3 response tokens, then padding
    td = td_differences(q * mask, mask, gamma=0.9)
    # Q0 - 0.9 Q1, Q1 - 0.9 Q2, Q2 - 0 (the episode ends), and the padding does not leak in
    torch.testing.assert_close(td[0, :3], torch.tensor([1.0 - 1.8, 2.0 - 2.7, 3.0]))


def test_token_objective_on_a_three_token_response():
    model, lam, gamma = tiny_ava(random_reward_head=True), 0.7, 0.9
    prompt, response = [5, 6, SEP], [7, 8, EOT]
    idx, targets, _ = make_batch([prompt], [response], EOT)
    objective, mask, reward = ava_token_objective(model, idx, targets, lam, gamma)
    assert mask[0].nonzero().flatten().tolist() == [2, 3, 4]  # states s_0..s_2 predict y_1..y_3
    # the same terms computed directly from the heads
    with torch.no_grad():
        h = model.trunk.hidden(idx)[0]                                  # (T, C)
        q = model.q_head(h)                                             # (T, V)
        params = model.reward_head(h).view(-1, 2, V)                    # (T, 2, V)
    expected, mus = [], []
    for k, t in enumerate([2, 3, 4]):
        y = response[k]
        q_next = q[t + 1, response[k + 1]] if k < 2 else 0.0
        td = q[t, y] - gamma * q_next
        mu, log_sigma = params[t, 0, y], params[t, 1, y]
        normal = torch.distributions.Normal(mu, log_sigma.exp())
        expected.append(torch.log_softmax(q[t], -1)[y]
                        - torch.distributions.kl_divergence(normal, torch.distributions.Normal(0.0, 1.0))
                        + lam * normal.log_prob(td))
        mus.append(mu)
    torch.testing.assert_close(objective[0, 2:5], torch.stack(expected).detach(), atol=1e-5, rtol=1e-5)
    assert objective[0][~mask[0]].abs().sum() == 0
    torch.testing.assert_close(reward[0], sum(mus).detach(), atol=1e-5, rtol=1e-5)


def test_q_head_starts_as_the_policy():
    torch.manual_seed(1)
    policy = GPT(CONFIG)
    model = AVARewardModel.from_policy(policy)
    idx, targets, _ = make_batch([[3, 4, SEP], [5, SEP]], [[6, 7, EOT], [8, EOT]], EOT)
    _, _, _, logp_taken = model.heads(idx, targets)
    torch.testing.assert_close(logp_taken, token_logprobs(policy, idx, targets).detach(), atol=1e-5, rtol=1e-5)
    # the reward head starts at the prior: mu = 0, sigma = 1, so every sequence scores 0
    assert model(idx, targets).abs().max() == 0


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
        mu, log_sigma, _, _ = model(idx, idx, per_token=True)
        (mu.sum() + log_sigma.sum()).backward()
        return model.reward_head.weight.grad
    first = head_grad()
    assert first.abs().sum() > 0
    assert all(torch.equal(first, head_grad()) for _ in range(10))


def test_ava_p_adds_the_preference_contrast():
    model, lam, gamma = tiny_ava(random_reward_head=True), 1.0, 1.0
    idx, targets, _ = make_batch([[4, SEP], [5, SEP], [4, SEP], [5, SEP]],
                                 [[6, EOT], [7, 8, EOT], [9, EOT], [2, EOT]], EOT)
    objective, mask, reward = ava_token_objective(model, idx, targets, lam, gamma)
    chosen_elbo = (objective[:2] * mask[:2]).sum() / mask[:2].sum()
    expected = -chosen_elbo + bradley_terry_loss(reward[:2], reward[2:])
    torch.testing.assert_close(ava_p_loss(model, idx, targets, lam, gamma), expected)


def toy_demo(rng):
    """Toy demonstrator: the response is the prompt's 4 digits sorted, then EOT."""
    digits = [rng.randrange(2, 10) for _ in range(4)]
    return digits + [SEP], sorted(digits) + [EOT]


def test_ava_d_learns_a_reward_that_ranks_demonstrations_first():
    rng = random.Random(0)
    train, heldout = [toy_demo(rng) for _ in range(512)], [toy_demo(rng) for _ in range(200)]
    # random sequences over the same tokens, on the held-out prompts
    random_responses = [[rng.randrange(2, 10) for _ in range(4)] + [EOT] for _ in heldout]
    model = tiny_ava(seed=0)
    opt = configure_optimizer(model, 3e-3, 0.0)
    model.train()
    losses = []
    for step in range(100):
        batch = [train[rng.randrange(len(train))] for _ in range(32)]
        idx, targets, _ = make_batch([p for p, _ in batch], [r for _, r in batch], EOT)
        loss = ava_d_loss(model, idx, targets, lam=1.0, gamma=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    assert sum(losses[-20:]) / 20 < 0.75 * sum(losses[:20]) / 20  # the objective improves (2.81 -> 1.74)
    prompts = [p for p, _ in heldout]
    with torch.no_grad():
        r_demo = model(*make_batch(prompts, [r for _, r in heldout], EOT)[:2])
        r_random = model(*make_batch(prompts, random_responses, EOT)[:2])
    accuracy = (r_demo > r_random).float().mean().item()
    assert accuracy > 0.9, accuracy


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
