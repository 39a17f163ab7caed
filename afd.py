"""
The methods of alignment from demonstrations, in the order METHOD.md presents them. Each
objective is a short function whose docstring carries its formula; each method is one
function that reads top to bottom, its phases numbered.

    sft_loss                    2   forward KL = SFT on the demonstrations
    discriminator_loss          3   reverse KL: the discriminator's classification loss
    sample_batch                4   one sampling step: K responses per prompt, as tensors
    rloo_advantages, policy_gradient_loss, rloo_loss
                                4   the RLOO policy-gradient loss with a KL penalty
    adversarial_step, afd_adversarial
                                5   the adversarial method (GAIL-style)
    TAILORED, tailored_triples, discriminator_batch_loss
                                6   the tailored reward models' data: both classes on the same prompts
    rl_step, rl_on_reward       6   RL on a fixed reward (a tailored reward model, AVA-d)
    irl_round, irl_iterated     7   iterated IRL with an explicit reward
    irft_loss, irft_stage, irft 8   IRFT (the implicit reward; one stage is SPIN)
    best_of_n, best_of_n_estimate, kl_bound
                                9   Best-of-N and its every-n estimator
    ava_d_direct                10  AVA-d's direct optimisation: the policy is AVA's Q model
    mean_stderr, win_rate_indicator, kl_estimate
                                11  evaluation

A step function (adversarial_step, rl_step) returns the policy's loss for one optimiser step
(adversarial_step takes the discriminator's own step first, in plain sight); the policy's
optimiser step (gradient clipping, AdamW, the learning-rate schedule) is train.fit's.
A whole method (afd_adversarial, rl_on_reward, irl_iterated, irft) is handed `run`, train.py's
plumbing, which does nothing specific to a method:
    run.train(model, name, loss_of_batch, batch_at, steps, lr)   `steps` AdamW steps on
        loss_of_batch(model, batch_at(step)), checkpointed and resumable, saved as <name>.pt
        (loaded instead when <name>.pt is up to date)
    run.policy_batches(label)        batch_at(step) -> PolicyBatch: a step's prompts
    run.triple_batches(triples, label)  batch_at(step) -> a batch of B better, then B worse rows
    run.demonstrations(label, part=0, parts=1)  a random subset of the demonstration prompts, with
        theirs (parts > 1: the part-th of disjoint slices)
    run.demonstration_batches(label) batch_at(step) -> a batch of demonstrations (data.make_batch)
    run.sample(policy, prompts, label, temperature=None)  one response per prompt (split across processes)
    run.data_parallel(model)         the model, wrapped for data parallelism under torchrun
`label` names a random stream: the same label, the same draws.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from data import make_batch
from model import (configure_optimizer, frozen_copy, generate, masked_mean, sequence_logprob, shared_prompt_batch,
                   token_logprobs, trainable_copy)
from reward import AVARewardModel, RewardModel, ava_d_loss, pairwise_loss


# ----------------------------------------------------------------------------------------
# 2. Forward KL: SFT

def sft_loss(model, idx, targets):
    """Forward KL to the demonstrator = SFT (METHOD.md section 2, mass-covering):

    min_pi E_x KL(d^beta || d^pi) = const - E_{(x, y^E) ~ D_demo} sum_t log pi(y^E_t | x, y^E_<t),
    here as a mean over response tokens (targets == -100 on prompt and padding).
    """
    return -masked_mean(token_logprobs(model, idx, targets), targets != -100)


# ----------------------------------------------------------------------------------------
# 3. Reverse KL: the discriminator

def discriminator_loss(r_pos, r_neg):
    """The discriminator's loss on logits r = logit D(x, y) (METHOD.md section 3); the
    tailored reward models init_sft, init_demo and sft_demo are trained with it too:

    L = -E_pos log sigma(r(x, y)) - E_neg log(1 - sigma(r(x, y))).
    Its optimum is D* = d_pos / (d_pos + d_neg), i.e. r* = log d_pos(y|x) - log d_neg(y|x):
    with positives from the demonstrator and negatives from pi, -E_pi[r*] is KL(d^pi || d^beta).
    """
    return -F.logsigmoid(r_pos).mean() - F.logsigmoid(-r_neg).mean()


# ----------------------------------------------------------------------------------------
# 4. The policy gradient: one sampling step, then the RLOO loss on its tensors

@dataclass
class PolicyBatch:
    """The inputs of one policy step (train.py's run.policy_batches makes one per step)."""
    prompts: list                # P demonstration prompts (token lists)
    demonstrations: list         # their demonstrated responses (token lists)
    eos_id: int                  # the end-of-text token: ends a sampled response, pads a batch
    generator: torch.Generator   # this step's random draws, on the policy's device


@torch.no_grad()
def sample_batch(policy, prompts, group_size, max_new_tokens, eos_id, generator, temperature=1.0, shared=False):
    """One sampling step (METHOD.md section 4): y_i ~ pi(.|x), group_size of them per prompt.
    Returns the batch (idx, targets, last), rows prompt-major: the group_size samples of the first
    prompt, then those of the second, ... As data.make_batch's full sequences, or with shared=True as
    model.shared_prompt_batch's: then every forward on the batch (the policy's, the reference's, a
    reward model's) runs each prompt once for its group. The same numbers to float tolerance, but
    not bit for bit, and sampling amplifies the difference over a run (train.py's --pg_shared_prompts)."""
    model = getattr(policy, "module", policy)  # a DistributedDataParallel wrapper samples through its module
    device = next(model.parameters()).device
    tokens, lengths = generate(model, prompts, group_size, max_new_tokens, eos_id, temperature, None, generator)
    responses = [row[:n] for row, n in zip(tokens.tolist(), lengths.tolist())]
    if shared:
        groups = [responses[i * group_size:(i + 1) * group_size] for i in range(len(prompts))]
        return shared_prompt_batch(prompts, groups, eos_id, device)
    return make_batch([p for p in prompts for _ in range(group_size)], responses, eos_id, device)


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
    """The RLOO policy-gradient loss with a per-token KL penalty to a frozen reference
    (METHOD.md section 4). Rows are K = group_size samples y_i ~ pi(.|x) of each prompt,
    prompt-major:
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


def rloo_loss(policy, ref, samples, rewards, group_size, beta_kl):
    """policy_gradient_loss on a sampled batch (sample_batch) and its rewards (B,): the
    reference's log-probs are constants, the policy's carry the gradient.
    Returns (loss, stats): the mean reward and the mean KL to the reference of the samples."""
    idx, targets, _ = samples
    with torch.no_grad():
        logp_ref = token_logprobs(ref, idx, targets)                 # (B, T)
    logp = token_logprobs(policy, idx, targets)                      # (B, T)
    loss, kl = policy_gradient_loss(logp, logp_ref, targets != -100, rewards, group_size, beta_kl)
    return loss, {"reward": rewards.mean().item(), "kl": kl.mean().item()}


# ----------------------------------------------------------------------------------------
# 5. The adversarial method: reverse KL to the demonstrator

def adversarial_step(policy, ref, disc, disc_opt, batch, cfg):
    """One step of adversarial imitation (METHOD.md section 5): a discriminator step, then the
    policy-gradient loss on the reward r(x, y) = logit D(x, y), KL-penalised to ref (pi_sft).

    disc is trained to tell demonstrations (label 1) from the policy's samples (label 0) with
    discriminator_loss; at its optimum r = log d^beta(y|x) - log d^pi(y|x), so maximising
    E_pi[r] minimises the reverse KL(d^pi || d^beta). batch is a PolicyBatch; the policy's
    optimiser step is the caller's. Returns (loss, stats).
    """
    K = cfg.pg_group
    # 1. sample K responses per prompt from the current policy
    samples = sample_batch(policy, batch.prompts, K, cfg.max_new_tokens, batch.eos_id, batch.generator,
                           cfg.temperature, cfg.pg_shared_prompts)
    demos = make_batch(batch.prompts, batch.demonstrations, batch.eos_id, samples[1].device)
    # 2. one discriminator step: the demonstrations against the samples
    disc.train()
    r_demo, r_sample = disc(*demos), disc(*samples)                  # (P,), (P*K,)
    disc_loss = discriminator_loss(r_demo, r_sample)
    disc_opt.zero_grad(set_to_none=True)
    disc_loss.backward()
    torch.nn.utils.clip_grad_norm_(disc.parameters(), cfg.grad_clip)
    disc_opt.step()
    disc.eval()
    disc_acc = 0.5 * float((r_demo > 0).float().mean() + (r_sample < 0).float().mean())
    # 3. the rewards: the updated discriminator's logits on the samples, constants
    with torch.no_grad():
        rewards = disc(*samples).float()                             # (P*K,)
    # 4. the policy-gradient loss
    loss, stats = rloo_loss(policy, ref, samples, rewards, K, cfg.beta_kl)
    return loss, {**stats, "disc_acc": disc_acc}


def afd_adversarial(pi_init, pi_sft, run, cfg):
    """The adversarial method, whole: from pi_sft, alternate a discriminator step and a policy
    step for cfg.pg_steps steps (the discriminator starts from pi_init's trunk):

        for step in range(pg_steps):
            loss = adversarial_step(pi, pi_sft, D, ...)   # D's step is inside
            AdamW step of pi on loss                       # train.fit
    """
    policy, ref = trainable_copy(pi_sft), frozen_copy(pi_sft)
    disc = RewardModel.from_policy(pi_init).to(next(pi_init.parameters()).device)
    disc_opt = configure_optimizer(disc, cfg.disc_lr, cfg.weight_decay)
    disc_parallel = run.data_parallel(disc)
    run.train(policy, "policy_afd_adversarial",
              lambda pi, batch: adversarial_step(pi, ref, disc_parallel, disc_opt, batch, cfg),
              run.policy_batches("adversarial"), cfg.pg_steps, cfg.pg_lr,
              aux=(disc, disc_opt))  # the discriminator is checkpointed with the policy
    return policy


# ----------------------------------------------------------------------------------------
# 6. Tailored reward models, and RL on a fixed reward

TAILORED = {"init_sft": ("sft", "init"), "init_demo": ("demo", "init"), "sft_demo": ("demo", "sft")}
"""Each tailored reward model's classes: name -> (positives, negatives), all on the same prompts."""


def tailored_triples(name, prompts, demonstrations, init_samples, sft_samples):
    """The training data of tailored reward model `name` (METHOD.md section 6): one (x, positive,
    negative) triple per sample, both classes on the same prompt x, as AfD defines them. prompts
    (P,) with their demonstrations (P,); init_samples, sft_samples (P * k,), k samples of each
    prompt, prompt-major. A batch of B triples is B positives, then B negatives
    (train.triples_batch), the order afd.discriminator_loss takes them in."""
    k = len(init_samples) // len(prompts)
    responses = {"demo": [y for y in demonstrations for _ in range(k)], "init": init_samples, "sft": sft_samples}
    positives, negatives = TAILORED[name]
    return [(prompts[i // k], responses[positives][i], responses[negatives][i]) for i in range(len(init_samples))]


def discriminator_batch_loss(model, batch):
    """discriminator_loss of a reward model on a batch of B positives, then B negatives."""
    r = model(*batch)                                                # (2B,)
    B = r.shape[0] // 2
    return discriminator_loss(r[:B], r[B:])


def rl_step(policy, ref, reward_model, batch, cfg):
    """One policy-gradient step on a fixed reward model r (METHOD.md section 6):
    maximise E_{y ~ pi}[r(x, y)] - beta_kl KL(pi || ref) with RLOO. Returns (loss, stats)."""
    # 1. sample K responses per prompt from the current policy
    samples = sample_batch(policy, batch.prompts, cfg.pg_group, cfg.max_new_tokens, batch.eos_id,
                           batch.generator, cfg.temperature, cfg.pg_shared_prompts)
    # 2. the rewards, constants
    with torch.no_grad():
        rewards = reward_model(*samples).float()                     # (P*K,)
    # 3. the policy-gradient loss
    return rloo_loss(policy, ref, samples, rewards, cfg.pg_group, cfg.beta_kl)


def rl_on_reward(name, pi_sft, reward_model, run, cfg):
    """RL from pi_sft on an already trained reward model (init_sft: AfD's tailored reward
    model used for training rather than reranking; ava_d: AVA's sum_t mu_t), KL to pi_sft:

        for step in range(pg_steps):
            AdamW step of pi on rl_step(pi, pi_sft, r, ...)
    """
    policy, ref = trainable_copy(pi_sft), frozen_copy(pi_sft)
    run.train(policy, f"policy_{name}", lambda pi, batch: rl_step(pi, ref, reward_model, batch, cfg),
              run.policy_batches(name), cfg.pg_steps, cfg.pg_lr)
    return policy


# ----------------------------------------------------------------------------------------
# 7. Iterated IRL with an explicit reward

def irl_round(k, pi_sft, policy, triples, run, cfg):
    """Round k of iterated IRL (METHOD.md section 7; arXiv 2503.13538 and its released code),
    from pi_k = policy:
      1. sample y~ ~ pi_k(.|x) near-greedily (temperature irl_temperature) on a random subset
         of the demonstration prompts;
      2. aggregate: P_k = P_{k-1} + {(x, y^E, y~)};
      3. a fresh reward model r_k from pi_sft's trunk, trained on all of P_k with
         L_R = -E_{P_k} log sigma(r(x, y^E) - r(x, y~)) (Bradley-Terry, the demonstration
         always the winner: no preference labels);
      4. policy steps: maximise E_{y ~ pi}[r_k(x, y)] - beta_kl KL(pi || pi_k), giving pi_{k+1}.
    policy is trained in place; returns P_k.
    """
    # 1. sample: pi_k answers the round's demonstration prompts, near-greedily
    prompts, demonstrations = run.demonstrations(f"irl_round{k}")
    own = run.sample(policy, prompts, f"irl_round{k}", temperature=cfg.irl_temperature)
    # 2. aggregate the (prompt, demonstration, own sample) triples of every round so far
    triples = triples + list(zip(prompts, demonstrations, own))
    # 3. reward steps: a fresh reward model from pi_sft; the demonstration beats pi_j's sample, j <= k
    reward_model = RewardModel.from_policy(pi_sft).to(next(pi_sft.parameters()).device)
    run.train(reward_model, f"rm_irl_iterated_round{k}", pairwise_loss, run.triple_batches(triples, f"irl_rm{k}"),
              cfg.irl_rm_steps, cfg.rm_lr)
    # 4. policy steps on the round's fixed reward, KL to pi_k
    ref, reward = frozen_copy(policy), frozen_copy(reward_model)
    run.train(policy, f"policy_irl_iterated_round{k}", lambda pi, batch: rl_step(pi, ref, reward, batch, cfg),
              run.policy_batches(f"irl{k}"), max(1, cfg.pg_steps // cfg.irl_rounds), cfg.pg_lr)
    return triples


def irl_iterated(pi_sft, run, cfg):
    """Iterated IRL, whole: pi_0 = pi_sft, P_{-1} = {}:

        for k in range(irl_rounds):
            P_k = irl_round(k, pi_k, P_{k-1})    # r_k fresh from pi_sft on P_k; pi_k -> pi_{k+1}
    """
    policy = trainable_copy(pi_sft)
    triples = []
    for k in range(cfg.irl_rounds):
        triples = irl_round(k, pi_sft, policy, triples, run, cfg)
    return policy


# ----------------------------------------------------------------------------------------
# 8. IRFT: the implicit reward

def irft_loss(logp_demo, logp_ref_demo, logp_sample, logp_ref_sample, beta):
    """IRFT (METHOD.md section 8; SPIN is one stage): the implicit reward beta*log(pi/pi_t) in a
    DPO-shaped loss, the demonstration winning over the model's own sample y~ ~ pi_t:

    L = -E log sigma(beta [log pi(y^E|x)/pi_t(y^E|x) - log pi(y~|x)/pi_t(y~|x)]).
    Arguments are sequence log-probs (B,); L = log 2 when pi = pi_t.
    """
    margin = (logp_demo - logp_ref_demo) - (logp_sample - logp_ref_sample)
    return -F.logsigmoid(beta * margin).mean()


def irft_stage(t, policy, run, cfg):
    """Stage t of IRFT (METHOD.md section 8), from pi_t = policy (trained in place):
      1. sample y~ ~ pi_t(.|x) on the stage's own slice of the demonstrations (the stages'
         slices are disjoint, as in IRFT's released code);
      2. freeze pi_t, the reference of the implicit reward beta log(pi / pi_t);
      3. steps on irft_loss, the demonstration winning over pi_t's own sample.
    """
    # 1. sample: pi_t answers the stage's demonstration prompts
    prompts, demonstrations = run.demonstrations("irft", part=t, parts=cfg.irft_stages)
    triples = list(zip(prompts, demonstrations, run.sample(policy, prompts, f"irft{t}")))
    # 2. the frozen reference
    ref = frozen_copy(policy)

    # 3. steps on the IRFT loss; a batch holds B demonstrations, then the B samples
    def loss_of_batch(pi, batch):
        idx, targets, _ = batch
        logp = sequence_logprob(pi, idx, targets)                    # (2B,)
        with torch.no_grad():
            logp_ref = sequence_logprob(ref, idx, targets)           # (2B,)
        B = logp.shape[0] // 2
        return irft_loss(logp[:B], logp_ref[:B], logp[B:], logp_ref[B:], cfg.irft_beta)
    run.train(policy, f"policy_irft_stage{t}", loss_of_batch, run.triple_batches(triples, f"irft{t}"),
              max(1, cfg.pg_steps // cfg.irft_stages), cfg.pg_lr)


def irft(pi_sft, run, cfg):
    """IRFT, whole: pi_0 = pi_sft;

        for t in range(irft_stages):
            irft_stage(t, pi_t)                      # pi_t -> pi_{t+1}
    """
    policy = trainable_copy(pi_sft)
    for t in range(cfg.irft_stages):
        irft_stage(t, policy, run, cfg)
    return policy


# ----------------------------------------------------------------------------------------
# 9. Best-of-N

def best_of_n(scores):
    """Best-of-N selection: scores (P, N) reward of N candidates per prompt -> (P,) argmax."""
    return scores.argmax(dim=1)


def order_statistic_weights(N, n):
    """w_i = C(i-1, n-1) / C(N, n), i = 1..N: P(the best of a random n-subset is the i-th of
    the N sorted ascending). Returns (N,) float64."""
    return torch.tensor([math.comb(i - 1, n - 1) / math.comb(N, n) for i in range(1, N + 1)],
                        dtype=torch.float64)


def best_of_n_estimate(rm_scores, values, n):
    """Unbiased estimate of E[value of the best-of-n response] from N >= n samples per prompt
    (METHOD.md section 9). Sort the N samples by reward-model score, ascending, values v_(1..N):
    E[value of best-of-n] = sum_{i=n..N} C(i-1, n-1) / C(N, n) * v_(i).
    rm_scores, values: (P, N) -> (P,) float64. Ties in score are broken by index.
    """
    order = torch.sort(rm_scores, dim=1, stable=True).indices
    v_sorted = torch.gather(values.double(), 1, order)  # (P, N) ascending by score
    return v_sorted @ order_statistic_weights(values.shape[1], n)


def majority_vote(text_ids, n, generator, draws=256):
    """Self-consistency: among n of the N samples of a prompt, keep the response text that
    occurs most often (no reward model, no labels; ties broken at random). text_ids (P, N):
    equal ids for equal texts. Returns (P, draws) the kept sample's index in `draws` random
    n-subsets, each with its own tie-break (for n = N only the tie-break varies); the mean
    of values (P, N) at these indices estimates the value of majority voting over n."""
    P, N = text_ids.shape
    kept = []
    for _ in range(draws):
        subset = torch.rand(P, N, generator=generator).argsort(dim=1)[:, :n]        # (P, n)
        ids = torch.gather(text_ids, 1, subset)                                     # (P, n)
        votes = (ids[:, :, None] == ids[:, None, :]).sum(dim=2)                      # (P, n) for each one's text
        tie_break = 0.5 * torch.rand(P, n, generator=generator)                     # < 1: orders equal votes only
        kept.append(torch.gather(subset, 1, (votes + tie_break).argmax(dim=1, keepdim=True)))
    return torch.cat(kept, dim=1)                                                   # (P, draws)


def kl_bound(n):
    """KL(pi_BoN || pi_sft) <= log n - (n - 1) / n."""
    return math.log(n) - (n - 1) / n


# ----------------------------------------------------------------------------------------
# 10. AVA's direct optimisation

def ava_d_direct(pi_sft, run, cfg):
    """AVA-d's direct optimisation (arXiv 2411.09341, "AVA pipelines"; METHOD.md section 10): the
    policy is the Boltzmann policy of AVA's Q model, whose Q head is the policy's own LM head,
    Q(s, .) = log softmax(alpha z(s)). From pi_sft, the Q model (the policy) and a fresh reward
    head are trained jointly on the AVA-d objective over the demonstrations:

        for step in range(pg_steps):
            AdamW step of (pi, reward head) on reward.ava_d_loss(a batch of demonstrations)

    Returns the trunk: with alpha * beta = 1 the Boltzmann policy softmax(beta Q) = softmax(z) is it.
    """
    model = AVARewardModel.from_policy(pi_sft).to(next(pi_sft.parameters()).device)
    run.train(model, "policy_ava_d_direct",
              lambda m, batch: ava_d_loss(m, batch[0], batch[1], cfg.ava_lambda, cfg.ava_gamma, cfg.ava_alpha,
                                          cfg.ava_beta),
              run.demonstration_batches("ava_d_direct"), cfg.pg_steps, cfg.pg_lr)
    return model.trunk


# ----------------------------------------------------------------------------------------
# 11. Evaluation

def win_rate_indicator(golden, golden_ref):
    """1 if the response beats the reference response of its prompt, 1/2 on a tie, else 0."""
    return (golden > golden_ref).double() + 0.5 * (golden == golden_ref).double()


def mean_stderr(values):
    """Mean and standard error of the mean over prompts."""
    values = torch.as_tensor(values, dtype=torch.float64)
    se = values.std(unbiased=True) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return float(values.mean()), float(se)


def kl_estimate(logp_pi, logp_ref):
    """Monte-Carlo KL(pi || pi_ref) = E_{y ~ pi}[log pi(y|x) - log pi_ref(y|x)] from sequence
    log-probs (B,) of samples y ~ pi; returns (mean, standard error)."""
    return mean_stderr((logp_pi - logp_ref).detach())
