"""Scoring that runs each prompt once (model.SharedPrompts, model.score_pairs, parallel.score): every scorer gets the same
numbers as on data.make_batch's full sequences, to float tolerance, and equal pairs get equal scores.
Prompts of different lengths (left padding), responses of different lengths (right padding), one-token
and empty responses, all in one call."""
from types import SimpleNamespace

import pytest
import torch

import parallel
import reward
from data import make_batch
from model import SharedPrompts, scoring_batches, shared_prompt_batch

# 3 prompts of lengths 3, 6 and 1, each with 3 responses: lengths 0-10, some of one token
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
RESPONSES = [[[1, 2], [3], []], [[5, 6, 7, 8], [9, 9, 9], [1]], [[2] * 10, [3, 4], [5]]]
ATOL = 1e-5


@pytest.fixture(autouse=True)
def _reward_weights_by_reference(reference_weights):
    """AVA's reward weights are an objective of their own (course.py): these tests use a reference."""


def plain_batch(prompts=PROMPTS, responses=RESPONSES):
    """make_batch on the same rows: each prompt repeated for each of its responses."""
    flat_prompts = [p for p, group in zip(prompts, responses) for _ in group]
    return make_batch(flat_prompts, [r for group in responses for r in group], pad_id=0)


def plain_positions(prompts=PROMPTS, responses=RESPONSES):
    """Where column 0 of each row of shared_prompt_batch is in make_batch's row (column j: len(p) - 1 + j)."""
    return [len(p) - 1 for p, group in zip(prompts, responses) for _ in group]


def trained_like(scorer):
    """Random (not zero-initialised) reward heads, so that equal scores are not trivially 0 == 0."""
    torch.manual_seed(1)
    for name, p in scorer.named_parameters():
        if name.startswith(("head", "reward_head")):
            torch.nn.init.normal_(p, std=0.5)
    return scorer.eval()


def test_shared_prompt_batch_reads_the_positions_of_make_batch(tiny_gpt):
    gpt = tiny_gpt(vocab=12, n_layer=2).eval()
    batch, targets, last = shared_prompt_batch(PROMPTS, RESPONSES, pad_id=0)
    assert isinstance(batch, SharedPrompts) and batch.prompts.shape == (3, 6) and batch.responses.shape == (9, 10)
    idx_p, targets_p, last_p = plain_batch()
    with torch.no_grad():
        h, h_plain = gpt.hidden(batch), gpt.hidden(idx_p)  # (9, 11, C), (9, 16, C)
    for b, start in enumerate(plain_positions()):
        n = int(last[b]) + 1  # the prompt's last token, then every response token
        assert int(last_p[b]) == start + n - 1  # last: the same token
        torch.testing.assert_close(h[b, :n], h_plain[b, start:start + n], rtol=0, atol=ATOL)
        assert torch.equal(targets[b, :n], targets_p[b, start:start + n])  # the same tokens predicted
        assert (targets[b, n - 1:] == -100).all()


def test_reward_model_on_shared_prompts_equals_the_plain_forward(tiny_gpt):
    rm = trained_like(reward.RewardModel.from_policy(tiny_gpt(vocab=12, n_layer=2)))
    with torch.no_grad():
        shared, plain = rm(*shared_prompt_batch(PROMPTS, RESPONSES, pad_id=0)), rm(*plain_batch())
    torch.testing.assert_close(shared, plain, rtol=0, atol=ATOL)
    assert plain.abs().min() > 1e-3 and len(set(plain.tolist())) == len(plain)


def test_ava_reward_model_on_shared_prompts_equals_the_plain_forward(tiny_gpt):
    """AVA's read-outs (the last timestep's reward, the expected return) on a SharedPrompts batch: it is
    turned back into full rows (the reward weights need every row's attention), so the same numbers."""
    ava = trained_like(reward.AVARewardModel.from_policy(tiny_gpt(vocab=12, n_layer=2)))
    batch, targets, last = shared_prompt_batch(PROMPTS, RESPONSES, pad_id=0)
    idx_p, targets_p, last_p = plain_batch()
    with torch.no_grad():
        for readout in ("last", "sum"):
            shared, plain = ava(batch, targets, last, readout=readout), ava(idx_p, targets_p, last_p, readout=readout)
            torch.testing.assert_close(shared, plain, rtol=0, atol=ATOL)
            nonempty = torch.tensor([len(r) > 0 for group in RESPONSES for r in group])
            assert plain[nonempty].abs().min() > 1e-4  # not trivially 0 == 0


def test_log_probs_on_shared_prompts_equal_the_plain_forward(tiny_gpt, reference_logprobs):
    """Token by token, the first response token included (predicted at the prompt's last position)."""
    gpt = tiny_gpt(vocab=12, n_layer=2).eval()
    batch, targets, last = shared_prompt_batch(PROMPTS, RESPONSES, pad_id=0)
    idx_p, targets_p, _ = plain_batch()
    with torch.no_grad():
        logp, logp_p = reference_logprobs(gpt, batch, targets), reference_logprobs(gpt, idx_p, targets_p)
    for b, start in enumerate(plain_positions()):
        n = int(last[b])
        torch.testing.assert_close(logp[b, :n], logp_p[b, start:start + n], rtol=0, atol=ATOL)
    torch.testing.assert_close(logp.sum(1), logp_p.sum(1), rtol=0, atol=ATOL)
    assert (logp[:, 0] != 0).sum() == 8  # every non-empty response's first token counts


@pytest.mark.objective("reward.LogRatioReward.forward")
def test_log_ratio_reward_forward_on_shared_prompts_equals_the_plain_forward(tiny_gpt, reference_logprobs):
    scorer = reward.LogRatioReward(tiny_gpt(vocab=12, n_layer=2, seed=1), tiny_gpt(vocab=12, n_layer=2, seed=0))
    with torch.no_grad():
        shared, plain = scorer(*shared_prompt_batch(PROMPTS, RESPONSES, pad_id=0)), scorer(*plain_batch())
    torch.testing.assert_close(shared, plain, rtol=0, atol=ATOL)
    one_token = [1, 5, 8]  # rows whose only token is the first response token: its log-ratio is not lost
    assert plain[one_token].abs().min() > 1e-3 and shared[2] == 0  # the empty response: 0


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_gradients_on_shared_prompts_equal_the_plain_forward(tiny_gpt, reference_logprobs, dropout):
    """Training on a shared-prompt batch (the policy step with --pg_shared_prompts): the gradient of
    a loss on the per-token log-probs (here of the policy-gradient shape, sum_b A_b log pi(y_b|x_b),
    plus a per-token term) equals the plain forward's: the prompt's forward, run once, carries the
    gradient of all its responses. With dropout the two draw different masks, so then only the
    training-mode path runs and is finite."""
    policy = tiny_gpt(vocab=12, n_layer=2, seed=1, dropout=dropout).train(dropout > 0)
    advantages = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.5, -0.5, 1.0, 3.0, -2.0])
    results = []
    for batch in (shared_prompt_batch(PROMPTS, RESPONSES, pad_id=0), plain_batch()):
        policy.zero_grad(set_to_none=True)
        logp = reference_logprobs(policy, batch[0], batch[1])  # (9, T), 0 off the responses
        loss = -(advantages * logp.sum(dim=1)).mean() + 0.1 * logp.pow(2).sum()
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in policy.parameters()]))
    (loss, grads), (loss_plain, grads_plain) = results
    if dropout > 0:
        assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
        return
    torch.testing.assert_close(loss, loss_plain, rtol=0, atol=ATOL)
    for g, g_plain in zip(grads, grads_plain):
        torch.testing.assert_close(g, g_plain, rtol=1e-4, atol=ATOL)
    assert sum(g.abs().sum() for g in grads) > 1e-3


# ----------------------------------------------------------------------------------------
# parallel.score: flat lists, prompt-major or not, equal pairs, several batches

CFG, VOCAB = SimpleNamespace(device="cpu", bf16=False), SimpleNamespace(eot_id=0)


def flat_rows():
    """24 pairs: the 9 of PROMPTS/RESPONSES prompt-major, a prompt met again later, exact repeats."""
    prompts = [p for p, group in zip(PROMPTS, RESPONSES) for _ in group]
    responses = [r for group in RESPONSES for r in group]
    prompts += [[1, 2, 3], [7, 7], [1, 2, 3], [4, 5, 6, 7, 8, 9], [10], [7, 7], [1, 2, 3], [2, 3]] + prompts[:7]
    responses += [[4, 4, 4], [1], [1, 2], [9, 9, 9], [], [1], [4, 4, 4], [5, 6]] + responses[:7]
    return prompts, responses


@torch.no_grad()
def plain_scores(scorer, prompts, responses):
    """The plain scorer: make_batch rows, in order, no sharing."""
    return torch.cat([scorer(*make_batch(prompts[i:i + 5], responses[i:i + 5], pad_id=0)) for i in range(0, len(prompts), 5)])


@pytest.mark.parametrize("kind", ["reward_model", "ava"])
@pytest.mark.parametrize("batch", [256, 3])
def test_score_equals_the_plain_forward_and_equal_pairs_tie(tiny_gpt, kind, batch):
    cls = reward.RewardModel if kind == "reward_model" else reward.AVARewardModel
    scorer = trained_like(cls.from_policy(tiny_gpt(vocab=12, n_layer=2)))
    prompts, responses = flat_rows()
    got = parallel.score(scorer, prompts, responses, CFG, VOCAB.eot_id, batch=batch)
    torch.testing.assert_close(got, plain_scores(scorer, prompts, responses), rtol=0, atol=ATOL)
    pairs = [(tuple(p), tuple(r)) for p, r in zip(prompts, responses)]
    for i in range(len(pairs)):  # equal pairs: exactly equal scores, wherever they are
        for j in range(i):
            if pairs[i] == pairs[j]:
                assert got[i] == got[j]


def test_score_kinds_scores_each_kind_in_one_call(tiny_gpt):
    scorer = trained_like(reward.RewardModel.from_policy(tiny_gpt(vocab=12, n_layer=2)))
    prompts = [[1, 2, 3], [4, 5], [6]]
    kinds = {"a": [[7], [8, 9], [1]], "b": [[7], [2], [3, 3]], "c": [[7, 1], [8, 9], []]}
    got = parallel.score_kinds(scorer, prompts, kinds, CFG, VOCAB.eot_id)
    for kind, responses in kinds.items():
        torch.testing.assert_close(got[kind], plain_scores(scorer, prompts, responses), rtol=0, atol=ATOL)
    assert got["a"][0] == got["b"][0] and got["a"][1] == got["c"][1]  # equal responses of one prompt: a tie


def test_scoring_batches_cover_each_pair_once_in_groups_of_one_prompt():
    prompts, responses = flat_rows()
    pairs = list(dict.fromkeys((tuple(p), tuple(r)) for p, r in zip(prompts * 3, [r + [1] * k for k in range(3)
                                                                                 for r in responses])))
    seen = []
    for groups in scoring_batches(pairs, batch=8, group_size=4):
        assert len({len(g) for g in groups}) == 1 and sum(map(len, groups)) <= max(8, len(groups[0]))
        for g in groups:
            assert 1 <= len(g) <= 4 and len({pairs[i][0] for i in g}) == 1  # one prompt, run once for the group
            lengths = [len(pairs[i][1]) for i in g]
            assert lengths == sorted(lengths)
        seen += [i for g in groups for i in g]
    assert sorted(seen) == list(range(len(pairs)))
