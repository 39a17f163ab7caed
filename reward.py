"""
Reward models (METHOD.md section 1, "the practical AfD algorithm").

A `RewardModel` is the policy's GPT trunk with a scalar head read at the last response
token. Its training data decides what it is:

| name      | negatives            | positives            | loss                          |
|-----------|----------------------|----------------------|-------------------------------|
| init_sft  | y ~ pi_init(.|x)     | y ~ pi_sft(.|x)      | afd.discriminator_loss        |
| init_demo | y ~ pi_init(.|x)     | demonstrations y^E   | afd.discriminator_loss        |
| sft_demo  | y ~ pi_sft(.|x)      | demonstrations y^E   | afd.discriminator_loss        |
| pref      | rejected response    | chosen response      | bradley_terry_loss            |
| logratio  | -                    | -                    | none: log pi_sft - log pi_init |

Every reward model is used through one interface: `scorer(idx, targets, last) -> (B,)`,
on batches made by data.make_batch. The training loops are in train.py.
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from afd import sequence_logprob
from model import GPT

POINTWISE = {"init_sft": ("init", "sft"), "init_demo": ("init", "demo"),
             "sft_demo": ("sft", "demo")}  # name -> (negatives, positives)
RM_NAMES = ["init_sft", "init_demo", "sft_demo", "pref", "logratio"]


class RewardModel(nn.Module):
    """r(x, y): a GPT trunk, then a linear head on the hidden state of the last response token."""

    def __init__(self, config):
        super().__init__()
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
        h_last = h[torch.arange(idx.shape[0], device=idx.device), last]  # (B, C)
        return self.head(h_last).squeeze(-1).float()             # (B,)


def bradley_terry_loss(r_chosen, r_rejected):
    """Pairwise (Bradley-Terry) loss on the same prompt: L = -E log sigma(r(x, y+) - r(x, y-))."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


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
        return sequence_logprob(self.pi_sft, idx, targets) - sequence_logprob(self.pi_init, idx, targets)


def frozen_copy(model):
    """A frozen copy of a model (reference models of KL terms, fixed scorers)."""
    model = copy.deepcopy(model)
    model.requires_grad_(False)
    return model.eval()


@torch.no_grad()
def pairwise_accuracy(scores_better, scores_worse):
    """Fraction of pairs the reward model orders like the label (a tie counts one half)."""
    return float(((scores_better > scores_worse).float() + 0.5 * (scores_better == scores_worse).float()).mean())
