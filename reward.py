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

The three tailored models take both classes on the same demonstration prompts x
(afd.tailored_triples). AVA (`AVARewardModel`, arXiv 2411.09341 after AVRIL) is Bayesian IRL:
on the same trunk, its LM head gives Q-values and a token-level reward head a Gaussian
N(mu_t, sigma_t^2) per response position, both scaled by reward weights from attention; it
ranks responses by the last timestep's expected reward, and RL maximises the expected return
sum_t mu_t (ExpectedReturn).

Every reward model is used through one interface: `scorer(idx, targets, last) -> (B,)`,
on batches made by data.make_batch. train.py trains them (its reward-model stage).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import make_batch
from model import GPT, SharedPrompts, frozen_copy, masked_mean, sequence_logprob

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
    """AVA's TQR model (arXiv 2411.09341, METHOD.md section 10): a GPT trunk with a Q head and a
    reward head, both read at the hidden state h_t of state s_t = (x, y_<=t) and indexed by the
    taken token y_{t+1}, and reward weights w_t from the trunk's last attention (Eq. 11).

    - Q head: the trunk's own LM head, z_t = lm_head(h_t); Q(s_t, .) = log softmax(alpha z_t)
      (Eq. 12: the Q-values of a pre-trained LLM policy), so the Boltzmann policy of Q with
      beta = 1 / alpha is the trunk itself: AVA's direct optimisation trains that policy.
    - reward head: (mu, log sigma) of the reward of taking y_{t+1} in s_t, one row for every
      vocabulary token, the taken token's kept (a state-action head as in AVRIL; the paper's
      Eq. 9 reads one (mu, sigma) per state: see METHOD.md section 10's table). Zero-initialised,
      so every q(R_t) starts at the prior N(0, 1) before the weights.
    - weights (Eq. 11): the reward distribution at t is that of w_t R_t, N(w_t mu_t, (w_t sigma_t)^2),
      and the Q-values in the Bellman term are w_t Q(s_t, .).
    Positions follow data.make_batch: targets[b, t] = y_{t+1} on response tokens, -100 elsewhere.
    A SharedPrompts batch (model.score_pairs) is turned back into full rows first: the weights need
    the attention of every row of the sequence.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.trunk = GPT(config)
        self.reward_head = nn.Linear(config.n_embd, 2 * config.vocab_size)  # (mu, log sigma) per token
        nn.init.zeros_(self.reward_head.weight)
        nn.init.zeros_(self.reward_head.bias)

    @classmethod
    def from_policy(cls, policy):
        """The trunk, and with it the Q head (its LM head), starts from a policy."""
        model = cls(policy.config)
        model.trunk.load_state_dict(policy.state_dict())
        return model

    def forward(self, idx, targets, last=None, readout="last", alpha=1.0):
        """readout "last": the expected reward of the whole sequence, w_T mu_T at its last token,
        (B,): what AVA-p's contrast (CER, Eq. 18) trains, which ranks responses (Best-of-N,
        accuracies; METHOD.md section 10); "sum": sum_t w_t mu_t, (B,): the expected return of Eq. 19,
        RL's reward (ExpectedReturn);
        "heads": the per-position terms (B, T) each, 0 off the mask: w_t mu_t, log(w_t sigma_t),
        w_t Q(s_t, y_{t+1}), Q(s_t, y_{t+1}) = log softmax(alpha z_t)[y_{t+1}]. (Each goes through
        forward, so that DistributedDataParallel sees the training call.)"""
        if isinstance(idx, SharedPrompts):
            idx, targets, last = full_rows(idx)
        heads = self.heads(idx, targets, alpha)
        if readout == "heads":
            return heads
        mu = heads[0]                                                # (B, T) w_t mu_t
        if readout == "sum":
            return mu.sum(dim=1)
        return mu.gather(1, last_response_position(targets).unsqueeze(1)).squeeze(1)

    def heads(self, idx, targets, alpha):
        h, attention = hidden_and_attention(self.trunk, idx)        # (B, T, C), (B, T, T)
        mask = targets != -100
        w = reward_weights(attention, mask_of_rows(idx, targets))  # (B, T)
        y = targets.clamp(min=0)                                     # (B, T) the taken tokens
        q = F.log_softmax(alpha * self.trunk.lm_head(h).float(), dim=-1)  # (B, T, V) Eq. 12
        q_taken = q.gather(-1, y.unsqueeze(-1)).squeeze(-1)          # (B, T)
        rows = self.reward_head.weight.view(2, -1, h.shape[-1])      # (2, V, C): mean, log-std rows
        bias = self.reward_head.bias.view(2, -1, 1)                  # (2, V, 1)
        # only the taken tokens' rows, gathered by F.embedding: its CPU backward is deterministic,
        # that of indexing (rows[0][y]) sums repeated rows in a thread-dependent order
        mu, log_sigma = (((h * F.embedding(y, rows[i])).sum(-1) + F.embedding(y, bias[i]).squeeze(-1)).float()
                         for i in (0, 1))                            # (B, T) each
        weighted = (w * mu, torch.log(w.clamp(min=1e-30)) + log_sigma, w * q_taken)  # clamp: w = 0 at pads
        return [v.masked_fill(~mask, 0.0) for v in (*weighted, q_taken)]

    def token_rewards(self, idx, targets):
        """(mu, sigma), each (B, T): the per-token (weighted) reward posterior (0 and 1 off the mask)."""
        mu, log_sigma, _, _ = self(idx, targets, readout="heads")
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


class ExpectedReturn(nn.Module):
    """r(x, y) = sum_t E[w_t R_t] of an AVA model (Eq. 19): the reward AVA's RL maximises."""

    def __init__(self, ava):
        super().__init__()
        self.ava = ava

    def forward(self, idx, targets, last=None):
        return self.ava(idx, targets, last, readout="sum")


def hidden_and_attention(gpt, idx):
    """The trunk's final hidden states (B, T, C) and its last block's causal attention
    probabilities, averaged over the heads, (B, T, T): row i holds what position i attends to."""
    block, seen = gpt.transformer.h[-1], {}
    hook = block.register_forward_pre_hook(lambda module, inputs: seen.update(x=inputs[0]))
    try:
        h = gpt.hidden(idx)                                          # (B, T, C)
    finally:
        hook.remove()
    x = block.ln_1(seen["x"])                                        # the last block's attention input
    B, T, C = x.shape
    q, k, _ = block.attn.c_attn(x).split(C, dim=2)                   # (B, T, C) each
    q, k = (t.view(B, T, block.attn.n_head, -1).transpose(1, 2).float() for t in (q, k))  # (B, nh, T, hd)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))         # (B, nh, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
    return h, scores.masked_fill(~causal, float("-inf")).softmax(dim=-1).mean(dim=1)


def mask_of_rows(idx, targets):
    """(B, T) True at each row's real positions, prompt and response: up to its last response token.
    (make_batch's rows are right-padded; targets == -100 from the last token on.)"""
    last = last_response_position(targets) + 1                       # (B,) the last token's position
    return torch.arange(idx.size(1), device=idx.device)[None, :] <= last[:, None]


def last_response_position(targets):
    """(B,) the position that predicts each row's last response token (0 if it has none)."""
    positions = torch.arange(targets.size(1), device=targets.device).expand_as(targets)
    return torch.where(targets != -100, positions, 0).max(dim=1).values


def full_rows(batch):
    """A model.SharedPrompts batch as data.make_batch's rows (idx, targets, last)."""
    n = batch.responses.size(0) // batch.prompts.size(0)
    prompts = [p[real].tolist() for p, real in zip(batch.prompts, batch.real) for _ in range(n)]
    responses = [row[:k].tolist() for row, k in zip(batch.responses, batch.lengths.tolist())]
    return make_batch(prompts, responses, 0, batch.prompts.device)


def reward_weights(attention, rows):
    """AVA's reward weights (Eq. 11), from attention probabilities (B, T, T) (row i: what query i
    attends to) and rows (B, T), True at each sequence's |y| real positions:

    w_t = 1/|y| sum_{i=1..|y|} softmax_t'(q_i . k_t' / sqrt(d))_t,
    the attention position t receives, averaged over the sequence's queries: sum_t w_t = 1.
    Returns (B, T); 0 at padding.
    """
    rows = rows.to(attention.dtype)                                  # (B, T)
    received = (attention * rows[:, :, None]).sum(dim=1)              # (B, T): summed over real queries
    return received / rows.sum(dim=1, keepdim=True).clamp(min=1) * rows


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


def ava_token_objective(model, idx, targets, lam, gamma, alpha, beta):
    """AVA's per-token objective (METHOD.md section 10; Eq. 13-14), to be maximised, in two parts:

    likelihood_t = beta * Q(s_t, y_{t+1}),  Q(s_t, .) = log softmax(alpha z_t)   (Eq. 12)
    bayes_t      = -KL(N(w_t mu_t, (w_t sigma_t)^2) || N(0, 1))
                   + lam * log N(w_t Q(s_t, y_{t+1}) - gamma w_{t+1} Q(s_{t+1}, y_{t+2});
                             w_t mu_t, (w_t sigma_t)^2)
    (policy likelihood; prior and Bellman consistency, on the weighted reward). Returns
    (likelihood (B, T), bayes (B, T), both 0 off the mask; mask (B, T); w_t mu_t (B, T)).
    """
    mu, log_sigma, q_weighted, q_taken = model(idx, targets, readout="heads", alpha=alpha)
    mask = targets != -100
    td = td_differences(q_weighted, mask, gamma)
    bayes = -gaussian_kl_to_prior(mu, log_sigma) + lam * gaussian_logpdf(td, mu, log_sigma)
    return (beta * q_taken).masked_fill(~mask, 0.0), bayes.masked_fill(~mask, 0.0), mask, mu


def contrastive_expected_return(r_chosen, r_rejected):
    """AVA-p's contrast (CER, Eq. 18), to be maximised: the expected reward at the last timestep
    of the chosen response above the rejected one's, F_c = mean sigma(E[R | y+] - E[R | y-])
    (sigma itself, as the paper writes it; Bradley-Terry's log sigma is not this)."""
    return torch.sigmoid(r_chosen - r_rejected).mean()


def ava_d_loss(model, idx, targets, lam, gamma, alpha=1.0, beta=1.0):
    """AVA-d (Eq. 13), on demonstrations: minus the per-token objective, a mean over their tokens."""
    likelihood, bayes, mask, _ = ava_token_objective(model, idx, targets, lam, gamma, alpha, beta)
    return -masked_mean(likelihood + bayes, mask)


def ava_p_loss(model, idx, targets, lam, gamma, alpha=1.0, beta=1.0):
    """AVA-p (Eq. 17) plus its contrast (Eq. 18), on rows of B chosen responses, then their B
    rejected ones; the loss, -(F_p + F_c):

    F_p = mean over the tokens of both: (+likelihood_t on y+, -likelihood_t on y-) + bayes_t
    F_c = contrastive_expected_return(w_T mu_T(y+), w_T mu_T(y-)).
    """
    likelihood, bayes, mask, mu = ava_token_objective(model, idx, targets, lam, gamma, alpha, beta)
    B = idx.shape[0] // 2
    sign = torch.ones(2 * B, 1, device=likelihood.device)
    sign[B:] = -1.0                                                  # lower the rejected responses' likelihood
    r_last = mu.gather(1, last_response_position(targets).unsqueeze(1)).squeeze(1)  # (2B,) w_T mu_T
    return -masked_mean(sign * likelihood + bayes, mask) - contrastive_expected_return(r_last[:B], r_last[B:])


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
