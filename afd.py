"""
Alignment from Demonstrations: the KL objectives and Best-of-N (METHOD.md section 1).

- `sft_loss`: forward KL to the demonstrator = cross-entropy on demonstration responses.
- `discriminator_loss`: the reverse-KL/adversarial discriminator; reward models of the
  `init_sft`, `init_demo` and `sft_demo` kind are trained with exactly this loss.
- Best-of-N: `best_of_n` picks the highest-reward candidate; `best_of_n_estimate` evaluates
  best-of-n for every n <= N from one draw of N samples (unbiased order statistics);
  `kl_bound` is the analytic KL(pi_BoN || pi_sft) bound.
- Evaluation helpers: `mean_stderr`, `win_rate`.
- Policy optimisation (METHOD.md sections 1 and 2): `rloo_advantages` and
  `policy_gradient_loss` (one RLOO step on a KL-penalised reward, written once for the
  adversarial, iterated-IRL and fixed-reward methods), `kl_estimate`, and `irft_loss` (the
  implicit-reward / SPIN objective).

Every function takes tensors and returns tensors; the pipeline is in train.py.
"""
import math

import torch
import torch.nn.functional as F

from data import make_batch
from model import generate, token_logprobs


def masked_mean(values, mask):
    """sum(values * mask) / max(sum(mask), 1): a mean over the unmasked entries, 0 if none."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def sequence_logprob(model, idx, targets):
    """log d^pi(y|x) = sum_t log pi(y_t | x, y_<t), one value per row: (B,)."""
    return token_logprobs(model, idx, targets).sum(dim=1)


def sft_loss(model, idx, targets):
    """Forward KL = SFT (METHOD.md section 1, mass-covering):

    min_pi E_x KL(d^beta || d^pi) = const - E_{(x, y^E) ~ D_demo} sum_t log pi(y^E_t | x, y^E_<t),
    here as a mean over response tokens (targets == -100 on prompt and padding).
    """
    return -masked_mean(token_logprobs(model, idx, targets), targets != -100)


def discriminator_loss(r_pos, r_neg):
    """The AfD discriminator / pointwise reward-model loss on logits r = logit(D(x, y)):

    L = -E_pos log sigma(r(x, y)) - E_neg log(1 - sigma(r(x, y))).
    Its optimum is D* = d_pos / (d_pos + d_neg), i.e. r* = log d_pos(y|x) - log d_neg(y|x):
    with positives from the demonstrator and negatives from pi, -E_pi[r*] is KL(d^pi || d^beta).
    """
    return -F.logsigmoid(r_pos).mean() - F.logsigmoid(-r_neg).mean()


def best_of_n(scores):
    """Best-of-N selection: scores (P, N) reward of N candidates per prompt -> (P,) argmax."""
    return scores.argmax(dim=1)


def order_statistic_weights(N, n):
    """w_i = C(i-1, n-1) / C(N, n), i = 1..N: P(the best of a random n-subset is the i-th)."""
    return torch.tensor([math.comb(i - 1, n - 1) / math.comb(N, n) for i in range(1, N + 1)],
                        dtype=torch.float64)


def best_of_n_estimate(rm_scores, values, n):
    """Unbiased estimate of E[value of the best-of-n response] from N >= n samples per prompt.

    Sort the N samples by reward-model score, ascending, values v_(1..N):
    E[value of best-of-n] = sum_{i=n..N} C(i-1, n-1) / C(N, n) * v_(i).
    rm_scores, values: (P, N) -> (P,) float64. Ties in score are broken by index.
    """
    order = torch.sort(rm_scores, dim=1, stable=True).indices
    v_sorted = torch.gather(values.double(), 1, order)  # (P, N) ascending by score
    return v_sorted @ order_statistic_weights(values.shape[1], n)


def kl_bound(n):
    """KL(pi_BoN || pi_sft) <= log N - (N - 1) / N."""
    return math.log(n) - (n - 1) / n


def win_rate_indicator(golden, golden_ref):
    """1 if the response beats the reference response of its prompt, 1/2 on a tie, else 0."""
    return (golden > golden_ref).double() + 0.5 * (golden == golden_ref).double()


def mean_stderr(values):
    """Mean and standard error of the mean over prompts."""
    values = torch.as_tensor(values, dtype=torch.float64)
    se = values.std(unbiased=True) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return float(values.mean()), float(se)


def rloo_advantages(rewards):
    """REINFORCE leave-one-out baseline over the K samples of each prompt:

    A_i = r_i - mean_{j != i} r_j = K / (K - 1) * (r_i - mean_j r_j).   rewards (P, K), K >= 2.
    Rewards are centred on the group's first one before averaging (A does not change), so a
    group of equal rewards gets advantages of exactly zero.
    """
    K = rewards.shape[1]
    centred = rewards - rewards[:, :1]
    return K / (K - 1) * (centred - centred.mean(dim=1, keepdim=True))


def policy_gradient_loss(logp, logp_ref, mask, rewards, group_size, beta_kl):
    """One RLOO policy-gradient step with a per-token KL penalty to a frozen reference.

    Rows are K = group_size samples y_i ~ pi(.|x) of each prompt, prompt-major:
      r~_i = r(x, y_i) - beta_kl * sum_t [log pi(y_i,t | s_t) - log pi_ref(y_i,t | s_t)]
      A_i  = r~_i - mean_{j != i} r~_j                    (rloo_advantages)
      L    = -mean_i A_i * sum_t log pi(y_i,t | s_t)       (REINFORCE; A is a constant)
    logp (B, T) per-token log-probs of the policy (with grad), logp_ref (B, T) of the
    reference (no grad), mask (B, T) True on response tokens, rewards (B,).
    Returns (loss, kl) with kl (B,) the per-sequence sum_t log pi - log pi_ref.
    """
    mask = mask.to(logp.dtype)
    kl = ((logp.detach() - logp_ref) * mask).sum(dim=1)              # (B,)
    advantages = rloo_advantages((rewards - beta_kl * kl).view(-1, group_size)).view(-1)
    loss = -(advantages * (logp * mask).sum(dim=1)).mean()
    return loss, kl


def rloo_loss(policy, ref, reward_of, prompts, group_size, beta_kl, max_new_tokens, eos_id,
              generator, temperature=1.0, train_policy=None):
    """The policy-gradient step of every policy-optimisation method, written once.

    Draws group_size responses y ~ pi(.|x) per prompt (token lists), rewards them with
    reward_of(idx, targets, last) -> (B,), and returns (policy_gradient_loss, stats). The
    methods differ only in reward_of and ref. train_policy is the module to differentiate
    through (the policy, or its DistributedDataParallel wrapper); gradient clipping and the
    optimizer step are the caller's (train.fit).
    """
    device = next(policy.parameters()).device
    with torch.no_grad():
        tokens, lengths = generate(policy, prompts, group_size, max_new_tokens, eos_id,
                                   temperature, None, generator)
    responses = [row[:k] for row, k in zip(tokens.tolist(), lengths.tolist())]
    idx, targets, last = make_batch([p for p in prompts for _ in range(group_size)], responses,
                                    eos_id, device)
    with torch.no_grad():
        rewards = reward_of(idx, targets, last).float()             # (B,)
        logp_ref = token_logprobs(ref, idx, targets)                # (B, T)
    logp = token_logprobs(train_policy or policy, idx, targets)     # (B, T)
    loss, kl = policy_gradient_loss(logp, logp_ref, targets != -100, rewards, group_size, beta_kl)
    return loss, {"reward": rewards.mean().item(), "kl": kl.mean().item()}


def kl_estimate(logp_pi, logp_ref):
    """Monte-Carlo KL(pi || pi_ref) = E_{y ~ pi}[log pi(y|x) - log pi_ref(y|x)] from sequence
    log-probs (B,) of samples y ~ pi; returns (mean, standard error)."""
    return mean_stderr((logp_pi - logp_ref).detach())


def irft_loss(logp_demo, logp_ref_demo, logp_sample, logp_ref_sample, beta):
    """IRFT (METHOD.md section 2; SPIN is one stage): the implicit reward beta*log(pi/pi_t) in a
    DPO-shaped loss, the demonstration winning over the model's own sample y~ ~ pi_t:

    L = -E log sigma(beta [log pi(y^E|x)/pi_t(y^E|x) - log pi(y~|x)/pi_t(y~|x)]).
    Arguments are sequence log-probs (B,); L = log 2 when pi = pi_t.
    """
    margin = (logp_demo - logp_ref_demo) - (logp_sample - logp_ref_sample)
    return -F.logsigmoid(beta * margin).mean()
