"""
Reward models and their losses (METHOD.md sections 6 and 10).

A `RewardModel` is the policy's GPT trunk with a scalar head read at the last response
token. Its training data decides what it is:

| name      | negatives            | positives            | loss                          |
|-----------|----------------------|----------------------|-------------------------------|
| init_sft  | y ~ pi_init(.|x)     | y ~ pi_sft(.|x)      | afd.discriminator_loss         |
| init_demo | y ~ pi_init(.|x)     | demonstrations y^E   | afd.discriminator_loss         |
| sft_demo  | y ~ pi_sft(.|x)      | demonstrations y^E   | afd.discriminator_loss         |
| pref      | rejected response    | chosen response      | pairwise_loss (Bradley-Terry)  |
| logratio  | -                    | -                    | none: log pi_sft - log pi_init |
| ava_d     | -                    | demonstrations y^E   | ava_d_loss (METHOD.md sec. 10) |
| ava_p     | rejected response    | chosen response      | ava_p_loss (METHOD.md sec. 10) |

AVA (`AVARewardModel`, arXiv 2411.09341 after AVRIL) is Bayesian IRL: on the same trunk it
has a token-level reward head, a Gaussian N(mu_t, sigma_t^2) per response position, and a Q
head over the vocabulary; its sequence reward is sum_t mu_t.

Every reward model is used through one interface: `scorer(idx, targets, last) -> (B,)`,
on batches made by data.make_batch. train.py trains them (its reward-model stage).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import make_batch
from model import GPT, frozen_copy, masked_mean, sequence_logprob

POINTWISE = {"init_sft": ("init", "sft"), "init_demo": ("init", "demo"),
             "sft_demo": ("sft", "demo")}  # name -> (negatives, positives)
RM_NAMES = ["init_sft", "init_demo", "sft_demo", "pref", "logratio", "ava_d", "ava_p"]
AVA = ("ava_d", "ava_p")


class RewardModel(nn.Module):
    """r(x, y): a GPT trunk, then a linear head on the hidden state of the last response token."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.trunk = GPT(config)
        self.head = nn.Linear(config.n_embd, 1)
        nn.init.zeros_(self.head.weight)  # starts at r = 0 for every response
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_policy(cls, policy):
        """A reward model whose trunk starts from a policy's weights (as in RLHF practice)."""
        rm = cls(policy.config)
        rm.trunk.load_state_dict(policy.state_dict())
        return rm

    def forward(self, idx, targets=None, last=None):
        h = self.trunk.hidden(idx)                               # (B, T, C)
        h_last = h[torch.arange(h.size(0), device=h.device), last]  # (B, C)
        return self.head(h_last).squeeze(-1).float()             # (B,)


def bradley_terry_loss(r_chosen, r_rejected):
    """Pairwise (Bradley-Terry) loss on the same prompt: L = -E log sigma(r(x, y+) - r(x, y-))."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def pairwise_loss(model, batch):
    """bradley_terry_loss of a reward model on a batch whose rows are B better responses, then
    the B worse ones of the same prompts (chosen/rejected, or demonstration/sample)."""
    rewards = model(*batch)                                          # (2B,)
    B = rewards.shape[0] // 2
    return bradley_terry_loss(rewards[:B], rewards[B:])


class LogRatioReward(nn.Module):
    """r(x, y) = log pi_sft(y|x) - log pi_init(y|x): no training.

    The optimal init_sft discriminator (afd.discriminator_loss with pi_sft samples as
    positives and pi_init samples as negatives) is exactly this log-ratio.
    """

    def __init__(self, pi_sft, pi_init):
        super().__init__()
        self.pi_sft = frozen_copy(pi_sft)
        self.pi_init = frozen_copy(pi_init)

    def forward(self, idx, targets, last=None):
        """log pi_sft(y|x) - log pi_init(y|x) per row, (B,): each a sum over the response tokens."""
        return sequence_logprob(self.pi_sft, idx, targets) - sequence_logprob(self.pi_init, idx, targets)


class AVARewardModel(nn.Module):
    """AVA's reward model (METHOD.md section 10): a GPT trunk with two heads, both read from
    the hidden state h_t of state s_t = (x, y_<=t) and indexed by the response token y_{t+1}.

    - reward head: (mu_t, log sigma_t) of q(R_t) = N(mu_t, sigma_t^2), the posterior over the
      reward of taking y_{t+1} in s_t. It outputs a (mean, log-std) pair for every token of the
      vocabulary and keeps the taken token's, as AVRIL's state-action reward does.
      Zero-initialised, so every q(R_t) starts at the prior N(0, 1).
    - Q head: Q(s_t, .) over the vocabulary, an untied copy of the LM head (so at the start
      softmax(Q) is the policy the trunk came from).
    Positions follow data.make_batch: targets[b, t] = y_{t+1} on response tokens, -100 elsewhere.
    (Why a row per token rather than one (mu, log sigma) per position: see the README's AVA notes.)
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.trunk = GPT(config)
        self.reward_head = nn.Linear(config.n_embd, 2 * config.vocab_size)  # (mu, log sigma) per token
        self.q_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        nn.init.zeros_(self.reward_head.weight)
        nn.init.zeros_(self.reward_head.bias)

    @classmethod
    def from_policy(cls, policy):
        """Trunk and Q head start from a policy (the Q head from its LM head)."""
        model = cls(policy.config)
        model.trunk.load_state_dict(policy.state_dict())
        with torch.no_grad():
            model.q_head.weight.copy_(policy.lm_head.weight)
        return model

    def forward(self, idx, targets, last=None, per_token=False):
        """The sequence reward sum_t mu_t: (B,). With per_token=True, the heads at every response
        position t (mask = targets != -100), each (B, T) float32: mu_t, log sigma_t,
        Q(s_t, y_{t+1}), log softmax(Q(s_t, .))[y_{t+1}]; 0 off the mask. (Both go through
        forward, so that DistributedDataParallel sees the training call.)"""
        heads = self.heads(idx, targets)
        return heads if per_token else heads[0].sum(dim=1)

    def heads(self, idx, targets):
        h = self.trunk.hidden(idx)                                   # (B, T, C)
        mask = targets != -100
        y = targets.clamp(min=0)                                     # (B, T) the taken tokens
        q = self.q_head(h).float()                                   # (B, T, V)
        q_taken = q.gather(-1, y.unsqueeze(-1)).squeeze(-1)          # (B, T)
        logp_taken = q_taken - torch.logsumexp(q, dim=-1)            # (B, T)
        w = self.reward_head.weight.view(2, -1, h.shape[-1])         # (2, V, C): mean, log-std rows
        b = self.reward_head.bias.view(2, -1, 1)                     # (2, V, 1)
        # only the taken tokens' rows, gathered by F.embedding: its CPU backward is deterministic,
        # that of indexing (w[0][y]) sums repeated rows in a thread-dependent order
        mu, log_sigma = (((h * F.embedding(y, w[i])).sum(-1) + F.embedding(y, b[i]).squeeze(-1)).float()
                         for i in (0, 1))                            # (B, T) each
        return [v.masked_fill(~mask, 0.0) for v in (mu, log_sigma, q_taken, logp_taken)]

    def token_rewards(self, idx, targets):
        """(mu, sigma), each (B, T): the per-token reward posterior (0 and 1 off the mask)."""
        mu, log_sigma, _, _ = self(idx, targets, per_token=True)
        return mu, log_sigma.exp()

    @torch.no_grad()
    def token_table(self, prompt, response, eos_id, decode):
        """One response's rewards token by token: {"sequence_reward": sum_t mu_t, "tokens":
        [(text, mu, sigma) of each response token]}; prompt and response are token lists."""
        idx, targets, _ = make_batch([prompt], [response], eos_id, next(self.parameters()).device)
        mu, sigma = self.token_rewards(idx, targets)                 # (1, T) each
        at = (targets[0] != -100).nonzero().squeeze(1)
        return {"sequence_reward": float(mu.sum()),
                "tokens": [(decode([int(targets[0, t])]), float(mu[0, t]), float(sigma[0, t])) for t in at]}


def gaussian_kl_to_prior(mu, log_sigma):
    """KL(N(mu, sigma^2) || N(0, 1)) = (mu^2 + sigma^2 - 1) / 2 - log sigma, elementwise."""
    return 0.5 * (mu ** 2 + torch.exp(2 * log_sigma) - 1) - log_sigma


def gaussian_logpdf(x, mu, log_sigma):
    """log N(x; mu, sigma^2) = -log(2 pi) / 2 - log sigma - (x - mu)^2 / (2 sigma^2), elementwise."""
    return -0.5 * math.log(2 * math.pi) - log_sigma - 0.5 * ((x - mu) * torch.exp(-log_sigma)) ** 2


def td_differences(q_taken, mask, gamma):
    """Q(s_t, y_{t+1}) - gamma * Q(s_{t+1}, y_{t+2}), with Q = 0 after the last response token
    (the episode ends there). q_taken, mask: (B, T) -> (B, T)."""
    q_next = F.pad(q_taken[:, 1:] * mask[:, 1:], (0, 1))            # (B, T)
    return q_taken - gamma * q_next


def ava_token_objective(model, idx, targets, lam, gamma):
    """AVA's per-token ELBO (METHOD.md section 10), to be maximised, and the sequence reward:

    log softmax(Q(s_t, .))[y_{t+1}] - KL(N(mu_t, sigma_t^2) || N(0,1))
        + lam * log N(Q(s_t, y_{t+1}) - gamma Q(s_{t+1}, y_{t+2}); mu_t, sigma_t^2)
    (policy likelihood, prior, Bellman consistency). Returns (objective (B, T), 0 off the
    mask; mask (B, T); sum_t mu_t (B,)).
    """
    mu, log_sigma, q_taken, logp_taken = model(idx, targets, per_token=True)
    mask = targets != -100
    td = td_differences(q_taken, mask, gamma)
    objective = (logp_taken - gaussian_kl_to_prior(mu, log_sigma)
                 + lam * gaussian_logpdf(td, mu, log_sigma)).masked_fill(~mask, 0.0)
    return objective, mask, mu.sum(dim=1)


def ava_d_loss(model, idx, targets, lam, gamma):
    """AVA-d (demonstrations only): minus the per-token ELBO, a mean over demonstration tokens."""
    objective, mask, _ = ava_token_objective(model, idx, targets, lam, gamma)
    return -masked_mean(objective, mask)


def ava_p_loss(model, idx, targets, lam, gamma):
    """AVA-p (preference pairs; rows: the B chosen responses, then their B rejected ones):

    L = -mean_{chosen tokens} ELBO_t - E log sigma(sum_t mu_t(y+) - sum_t mu_t(y-)).
    The per-token ELBO is taken on the chosen responses, the demonstrations of this view; the
    rejected ones enter only through the contrast.
    """
    objective, mask, reward = ava_token_objective(model, idx, targets, lam, gamma)
    B = idx.shape[0] // 2
    return -masked_mean(objective[:B], mask[:B]) + bradley_terry_loss(reward[:B], reward[B:])


@torch.no_grad()
def pairwise_accuracy(scores_better, scores_worse):
    """Fraction of pairs the reward model orders like the label (a tie counts one half)."""
    return float(((scores_better > scores_worse).float() + 0.5 * (scores_better == scores_worse).float()).mean())


# each reward model's own kind of held-out pair: (should score higher, should score lower)
OWN_PAIRS = {"init_sft": ("sft_a", "init"), "init_demo": ("demo", "init"), "sft_demo": ("demo", "sft_a"),
             "pref": ("chosen", "rejected"), "logratio": ("sft_a", "init"),
             "ava_d": ("demo", "init"), "ava_p": ("chosen", "rejected")}


def heldout_accuracies(name, scores, golden_a, golden_b):
    """A reward model's accuracies on held-out pairs, one pair per held-out prompt. scores maps
    "demo", "chosen", "rejected", "init", "sft_a", "sft_b" to its scores (P,) of each kind of
    response; golden_a, golden_b (P,) are the golden rewards of the two SFT samples."""
    differ = golden_a != golden_b  # pairs of SFT samples the golden reward tells apart
    a_is_better = golden_a > golden_b
    scores_better = torch.where(a_is_better, scores["sft_a"], scores["sft_b"])[differ]
    scores_worse = torch.where(a_is_better, scores["sft_b"], scores["sft_a"])[differ]
    better, worse = OWN_PAIRS[name]
    return {"heldout_accuracy": pairwise_accuracy(scores[better], scores[worse]),
            "acc_demo_vs_sft": pairwise_accuracy(scores["demo"], scores["sft_a"]),
            "acc_chosen_vs_rejected": pairwise_accuracy(scores["chosen"], scores["rejected"]),
            "acc_golden_sft_pairs": pairwise_accuracy(scores_better, scores_worse),
            "n_golden_sft_pairs": int(differ.sum())}
