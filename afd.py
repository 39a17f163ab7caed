"""
Alignment from Demonstrations: the KL objectives and Best-of-N (METHOD.md section 1).

- `sft_loss`: forward KL to the demonstrator = cross-entropy on demonstration responses.
- `discriminator_loss`: the reverse-KL/adversarial discriminator; reward models of the
  `init_sft`, `init_demo` and `sft_demo` kind are trained with exactly this loss.
- Best-of-N: `best_of_n` picks the highest-reward candidate; `best_of_n_estimate` evaluates
  best-of-n for every n <= N from one draw of N samples (unbiased order statistics);
  `kl_bound` is the analytic KL(pi_BoN || pi_sft) bound.
- Evaluation helpers: `mean_stderr`, `win_rate`.

Every function takes tensors and returns tensors; the pipeline is in train.py.
"""
import math

import torch
import torch.nn.functional as F

from model import token_logprobs


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
