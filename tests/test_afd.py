"""Best-of-N selection, evaluation helpers and the reward models. The objectives themselves (sft_loss,
discriminator_loss, RLOO, IRFT, the Best-of-N estimator, ...) are tested one by one in test_objectives.py;
the tests here that train with them are marked slow."""
import itertools
import math

import pytest
import torch

import afd
import reward


@pytest.mark.slow
def test_a_discriminator_trained_free_converges_to_the_log_density_ratio():
    """Free logits r(y) for 4 outcomes, trained with afd.discriminator_loss on 10 positives drawn as
    d_pos and 20 negatives drawn as d_neg (exact frequencies), converge to log d_pos - log d_neg."""
    d_pos, d_neg = torch.tensor([0.5, 0.3, 0.1, 0.1]), torch.tensor([0.1, 0.2, 0.3, 0.4])
    pos = torch.tensor([0] * 5 + [1] * 3 + [2] + [3])
    neg = torch.tensor([0] * 2 + [1] * 4 + [2] * 6 + [3] * 8)
    r = torch.zeros(4, requires_grad=True)
    opt = torch.optim.Adam([r], lr=0.05)
    for _ in range(2000):
        loss = afd.discriminator_loss(r[pos], r[neg])
        opt.zero_grad(); loss.backward(); opt.step()
    assert torch.allclose(r.detach(), (d_pos / d_neg).log(), atol=1e-3)


def test_best_of_n_returns_the_argmax():
    scores = torch.tensor([[0.1, 3.0, -1.0, 2.9], [5.0, 4.0, 6.0, 0.0]])
    assert afd.best_of_n(scores).tolist() == [1, 2]


def test_win_rate_and_mean_stderr():
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


@pytest.mark.slow
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


# ----------------------------------------------------------------------------------------
# Best-of-n beside its ceiling and a label-free baseline

def test_majority_vote_keeps_the_most_frequent_text_and_breaks_ties_at_random():
    text_ids = torch.tensor([[0, 1, 1, 2],    # text 1 twice: always one of its two samples
                             [0, 1, 2, 3]])   # all different: every sample equally often
    kept = afd.majority_vote(text_ids, 4, torch.Generator().manual_seed(0), draws=2000)
    assert set(kept[0].tolist()) == {1, 2}
    share = torch.bincount(kept[1], minlength=4).double() / 2000
    assert torch.allclose(share, torch.full((4,), 0.25, dtype=torch.float64), atol=0.04)
    pairs = afd.majority_vote(torch.tensor([[5, 5, 7]]), 2, torch.Generator().manual_seed(1), draws=3000)
    # subsets {0,1}: text 5 (two votes); {0,2} and {1,2}: a tie, each kept half the time
    values = torch.tensor([[1.0, 1.0, 0.0]])
    assert torch.gather(values, 1, pairs).mean().item() == pytest.approx(1 / 3 + 2 / 3 * 0.5, abs=0.03)


def test_share_of_ceiling_by_hand():
    import train
    rows = [{"rm": rm, "n": n, "golden_reward": g} for rm, n, g in
            [("oracle", 1, 1.0), ("oracle", 2, 2.0), ("init_sft", 1, 1.0), ("init_sft", 2, 1.25),
             ("pref", 2, 0.5)]]
    train.add_share_of_ceiling(rows)
    share = {(r["rm"], r["n"]): r.get("share_of_ceiling") for r in rows}
    assert share == {("oracle", 1): None, ("oracle", 2): None, ("init_sft", 1): None,
                     ("init_sft", 2): 0.25, ("pref", 2): -0.5}   # (1.25 - 1) / (2 - 1); (0.5 - 1) / 1


def test_text_ids_are_equal_for_equal_texts_within_a_prompt():
    import train
    candidates = [[1, 2], [3], [1, 2], [1, 2], [1, 2], [3]]
    assert train.text_ids(candidates, 2, 3).tolist() == [[0, 1, 0], [0, 0, 1]]


def test_weighted_vote_by_hand_sums_each_texts_softmax_weight():
    """One prompt, all N = 4 samples in every draw (n = N): text 0 twice at score 0, text 1 once at
    score s, text 2 once at -1. Weights e^0, e^0, e^s, e^-1 (over their sum): text 1 wins only when
    e^s > 2, i.e. s > ln 2, where majority voting keeps text 0 whatever the scores."""
    ids = torch.tensor([[0, 0, 1, 2]])
    for s, winners in [(2.0, {2}), (0.5, {0, 1})]:
        kept = afd.weighted_vote(ids, torch.tensor([[0.0, 0.0, s, -1.0]]), 4, torch.Generator().manual_seed(0), draws=64)
        assert set(kept[0].tolist()) == winners, s
    assert set(afd.majority_vote(ids, 4, torch.Generator().manual_seed(0), draws=64)[0].tolist()) == {0, 1}


def test_weighted_vote_with_equal_scores_is_majority_voting_and_breaks_ties_at_random():
    ids = torch.tensor([[3, 1, 3, 2, 1, 3], [5, 6, 5, 6, 7, 7]])  # row 0: text 3 most often; row 1: a 3-way tie
    kept = afd.weighted_vote(ids, torch.zeros(2, 6), 6, torch.Generator().manual_seed(1), draws=300)
    assert {int(ids[0, i]) for i in kept[0]} == {3}
    picked = torch.bincount(ids[1, kept[1]], minlength=8)[5:]
    assert (picked > 60).all()  # each tied text about a third of the time (100 each expected)


def test_weighted_vote_every_n_estimate_matches_enumerating_the_subsets():
    """The mean value of the kept sample over random n-subsets against the exact mean over all
    C(N, n) subsets (no ties: distinct scores), within 4 standard errors of the random draws."""
    ids = torch.tensor([[0, 1, 0, 2, 1, 0]])
    scores = torch.tensor([[0.3, 1.1, -0.4, 2.0, 0.9, 0.0]])
    values = torch.tensor([[1.0, -2.0, 1.0, 5.0, -2.0, 1.0]])
    n, N = 3, 6
    exact = []
    for subset in itertools.combinations(range(N), n):
        w = torch.softmax(scores[0, list(subset)].double(), 0)
        total = {int(ids[0, i]): 0.0 for i in subset}
        for i, wi in zip(subset, w):
            total[int(ids[0, i])] += float(wi)
        best = max(total, key=total.get)
        exact.append(float(values[0, next(i for i in subset if ids[0, i] == best)]))
    exact_mean = sum(exact) / len(exact)
    kept = afd.weighted_vote(ids, scores, n, torch.Generator().manual_seed(2), draws=4000)
    picked = values[0, kept[0]].double()
    se = picked.std() / math.sqrt(len(picked))
    assert abs(picked.mean() - exact_mean) < 4 * se and 0.5 < exact_mean < 3.0
