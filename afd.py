"""
The methods of alignment from demonstrations, in the order METHOD.md presents them. Each
objective is a short function whose docstring carries its formula; each method is one function
that reads top to bottom: its models, its optimisers, and its training loop written out.

    lr_at, optimizer_step       1   what every training loop shares: the schedule, one AdamW step
    sft_loss, sft               2   forward KL = SFT on the demonstrations
    discriminator_loss          3   reverse KL: the discriminator's classification loss
    sample_batch, rloo_advantages, policy_gradient_loss, rloo_loss
                                4   one sampling step, and the RLOO policy-gradient loss with a KL penalty
    discriminator_step, afd_adversarial
                                5   the adversarial method (GAIL-style)
    TAILORED, tailored_triples, discriminator_batch_loss, train_reward_model
                                6   the reward models' recipe: which responses are positives and negatives
    rl_step, rl_steps, rl_on_reward
                                6   RL on a fixed reward (a tailored reward model, AVA-d)
    irl_round, irl_iterated     7   iterated IRL with an explicit reward
    irft_loss, irft_stage, irft 8   IRFT (the implicit reward; one stage is SPIN)
    best_of_n, best_of_n_estimate, majority_vote, weighted_vote, kl_bound, best_of_n_evaluation
                                9   Best-of-N, its every-n estimator, the oracle and majority rows
    ava_d_direct                10  AVA-d's direct optimisation: the policy is AVA's Q model
    mean_stderr, win_rate_indicator, kl_estimate
                                11  evaluation

A training loop names what makes it resumable in one line, `ckpt = Checkpoint(stage, name,
policy=..., opt=...)` (training.py: a killed run goes on from its last checkpoint, a finished
one is loaded), and draws step-indexed batches from `batches` (training.Batches):
    batches.policy(label, step)             -> (prompts, their demonstrations, the step's generator)
    batches.pairs(rows, label, step)        -> a data.make_batch of (prompt, response) rows
    batches.triples(triples, label, step)   -> B better responses, then the B worse ones
    batches.demonstrations(label, part, parts)  -> a random subset of the demonstrations
`label` names a random stream: the same label, the same draws.
"""
import math

import torch
import torch.nn.functional as F

from data import make_batch
from model import (configure_optimizer, frozen_copy, generate, masked_mean, sequence_logprob, shared_prompt_batch,
                   token_logprobs, trainable_copy)
from parallel import autocast, average_gradients, sample
from reward import AVA, AVARewardModel, RewardModel, ava_d_loss, ava_p_loss, pairwise_loss
from training import Checkpoint, check_finite, stable_seed


# ----------------------------------------------------------------------------------------
# 1. What every training loop shares

def lr_at(step, steps, lr, cfg):
    """The learning rate at a step: a linear warm-up over cfg.warmup_steps, times a cosine decay
    from lr to lr / 10 over the run (nanoGPT's schedule, with a floor at a tenth)."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps)
    return lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))


def optimizer_step(model, opt, loss, lr, grad_clip):
    """One optimiser step on loss at learning rate lr, its gradient clipped to norm grad_clip. A NaN
    or infinite loss or gradient stops the run before the weights change (training.check_finite)."""
    for group in opt.param_groups:
        group["lr"] = lr
    check_finite("loss", loss, model)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    average_gradients(model)  # under torchrun, every process's mean; nothing to do in one process
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    check_finite("gradient norm", grad_norm, model)
    opt.step()


# ----------------------------------------------------------------------------------------
# 2. Forward KL: SFT

def sft_loss(model, idx, targets):
    """Forward KL to the demonstrator = SFT (METHOD.md section 2, mass-covering):

    min_pi E_x KL(d^beta || d^pi) = const - E_{(x, y^E) ~ D_demo} sum_t log pi(y^E_t | x, y^E_<t),
    here as a mean over response tokens (targets == -100 on prompt and padding).
    """
    return -masked_mean(token_logprobs(model, idx, targets), targets != -100)


def sft(pi_init, batches, stage, cfg):
    """SFT, whole: pi_sft from pi_init, cfg.sft_steps steps of sft_loss on the demonstrations."""
    pi_sft = trainable_copy(pi_init)
    opt = configure_optimizer(pi_sft, cfg.sft_lr, cfg.weight_decay)
    ckpt = Checkpoint(stage, "pi_sft", model=pi_sft, opt=opt)
    for step in ckpt.steps(cfg.sft_steps):
        idx, targets, _ = batches.pairs(batches.demos, "sft", step)     # (B, T) each
        with autocast(cfg):
            loss = sft_loss(pi_sft, idx, targets)
        optimizer_step(pi_sft, opt, loss, lr_at(step, cfg.sft_steps, cfg.sft_lr, cfg), cfg.grad_clip)
        ckpt.log(step, loss)
    return pi_sft


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

def sample_batch(policy, prompts, group_size, max_new_tokens, eos_id, generator, temperature=1.0, shared=False):
    """One sampling step (METHOD.md section 4): y_i ~ pi(.|x), group_size of them per prompt.
    Returns the batch (idx, targets, last), rows prompt-major: the group_size samples of the first
    prompt, then those of the second, ... As data.make_batch's full sequences, or with shared=True as
    model.shared_prompt_batch's: then every forward on the batch (the policy's, the reference's, a
    reward model's) runs each prompt once for its group. The same numbers to float tolerance, but
    not bit for bit, and sampling amplifies the difference over a run (train.py's --pg_shared_prompts)."""
    device = next(policy.parameters()).device
    tokens, lengths = generate(policy, prompts, group_size, max_new_tokens, eos_id, temperature, None, generator)
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

def discriminator_step(disc, disc_opt, demos, samples, cfg):
    """One step of the discriminator D (METHOD.md section 5): discriminator_loss with the
    demonstrations as positives (label 1) and the policy's samples as negatives (label 0), at the
    constant learning rate cfg.disc_lr. Returns its accuracy on the batch, before the step."""
    disc.train()
    r_demo, r_sample = disc(*demos), disc(*samples)                  # (P,), (P*K,)
    optimizer_step(disc, disc_opt, discriminator_loss(r_demo, r_sample), cfg.disc_lr, cfg.grad_clip)
    disc.eval()
    return 0.5 * float((r_demo > 0).float().mean() + (r_sample < 0).float().mean())


def afd_adversarial(pi_init, pi_sft, batches, stage, cfg):
    """The adversarial method (METHOD.md section 5), from pi_sft: at each step a discriminator step,
    then a policy-gradient step on the reward r(x, y) = logit D(x, y), KL-penalised to pi_sft. D
    (from pi_init's trunk) tells demonstrations from the policy's samples; at its optimum
    r = log d^beta(y|x) - log d^pi(y|x), so maximising E_pi[r] minimises KL(d^pi || d^beta).
    """
    policy, ref = trainable_copy(pi_sft), frozen_copy(pi_sft)
    disc = RewardModel.from_policy(pi_init).to(cfg.device)
    opt = configure_optimizer(policy, cfg.pg_lr, cfg.weight_decay)
    disc_opt = configure_optimizer(disc, cfg.disc_lr, cfg.weight_decay)
    ckpt = Checkpoint(stage, "policy_afd_adversarial", policy=policy, opt=opt, disc=disc, disc_opt=disc_opt)
    for step in ckpt.steps(cfg.pg_steps):
        prompts, demonstrations, generator = batches.policy("adversarial", step)
        # 1. sample K responses per prompt from the current policy
        with autocast(cfg):
            samples = sample_batch(policy, prompts, cfg.pg_group, cfg.max_new_tokens, batches.eos_id, generator,
                                   cfg.temperature, cfg.pg_shared_prompts)
        # 2. one discriminator step: the demonstrations against the samples
        demos = make_batch(prompts, demonstrations, batches.eos_id, cfg.device)
        disc_acc = discriminator_step(disc, disc_opt, demos, samples, cfg)
        # 3. the rewards: the updated discriminator's logits on the samples, constants
        with torch.no_grad():
            rewards = disc(*samples).float()                         # (P*K,)
        # 4. one policy step on the RLOO loss
        with autocast(cfg):
            loss, stats = rloo_loss(policy, ref, samples, rewards, cfg.pg_group, cfg.beta_kl)
        optimizer_step(policy, opt, loss, lr_at(step, cfg.pg_steps, cfg.pg_lr, cfg), cfg.grad_clip)
        ckpt.log(step, loss, **stats, disc_acc=disc_acc)
    return policy


# ----------------------------------------------------------------------------------------
# 6. The reward models, and RL on a fixed reward

TAILORED = {"init_sft": ("sft", "init"), "init_demo": ("demo", "init"), "sft_demo": ("demo", "sft")}
"""Each tailored reward model's classes: name -> (positives, negatives), all on the same prompts."""


def tailored_triples(name, prompts, demonstrations, init_samples, sft_samples):
    """The training data of tailored reward model `name` (METHOD.md section 6): one (x, positive,
    negative) triple per sample, both classes on the same prompt x, as AfD defines them. prompts
    (P,) with their demonstrations (P,); init_samples, sft_samples (P * k,), k samples of each
    prompt, prompt-major. A batch of B triples is B positives, then B negatives
    (training.Batches.triples), the order afd.discriminator_loss takes them in."""
    k = len(init_samples) // len(prompts)
    responses = {"demo": [y for y in demonstrations for _ in range(k)], "init": init_samples, "sft": sft_samples}
    positives, negatives = TAILORED[name]
    return [(prompts[i // k], responses[positives][i], responses[negatives][i]) for i in range(len(init_samples))]


def discriminator_batch_loss(model, batch):
    """discriminator_loss of a reward model on a batch of B positives, then B negatives."""
    r = model(*batch)                                                # (2B,)
    B = r.shape[0] // 2
    return discriminator_loss(r[:B], r[B:])


def train_reward_model(name, pi_init, demos, pref, samples, batches, stage, cfg):
    """Reward model `name` of reward.RM_NAMES but logratio (METHOD.md sections 6 and 10), its trunk
    from pi_init, cfg.rm_steps steps on its own data:
      init_sft, init_demo, sft_demo  discriminator_loss, positives against negatives on the same
                                     n_rm demonstration prompts (TAILORED; samples: the sample stage's)
      pref                           Bradley-Terry on the preference pairs (prompt, chosen, rejected)
      ava_d                          AVA-d on the demonstrations (prompt, response)
      ava_p                          AVA-p on the preference pairs
    """
    triples = (tailored_triples(name, samples["prompts"], samples["demos"], samples["init"], samples["sft"])
               if name in TAILORED else pref)
    rm = (AVARewardModel if name in AVA else RewardModel).from_policy(pi_init).to(cfg.device)
    opt = configure_optimizer(rm, cfg.rm_lr, cfg.weight_decay)
    ckpt = Checkpoint(stage, f"rm_{name}", rm=rm, opt=opt)
    for step in ckpt.steps(cfg.rm_steps):
        with autocast(cfg):
            if name == "ava_d":  # demonstrations only
                idx, targets, _ = batches.pairs(demos, f"rm_{name}", step)
                loss = ava_d_loss(rm, idx, targets, cfg.ava_lambda, cfg.ava_gamma, cfg.ava_alpha, cfg.ava_beta)
            elif name == "ava_p":  # B chosen, then their B rejected
                idx, targets, _ = batches.triples(triples, f"rm_{name}", step)
                loss = ava_p_loss(rm, idx, targets, cfg.ava_lambda, cfg.ava_gamma, cfg.ava_alpha, cfg.ava_beta)
            elif name == "pref":
                loss = pairwise_loss(rm, batches.triples(triples, f"rm_{name}", step))
            else:  # a tailored classifier: B positives, then their B negatives
                loss = discriminator_batch_loss(rm, batches.triples(triples, f"rm_{name}", step))
        optimizer_step(rm, opt, loss, lr_at(step, cfg.rm_steps, cfg.rm_lr, cfg), cfg.grad_clip)
        ckpt.log(step, loss)
    return rm


def rl_step(policy, ref, reward_model, prompts, generator, eos_id, cfg):
    """The loss of one policy-gradient step on a fixed reward model r (METHOD.md section 6):
    maximise E_{y ~ pi}[r(x, y)] - beta_kl KL(pi || ref) with RLOO. Returns (loss, stats)."""
    # 1. sample K responses per prompt from the current policy
    samples = sample_batch(policy, prompts, cfg.pg_group, cfg.max_new_tokens, eos_id, generator, cfg.temperature,
                           cfg.pg_shared_prompts)
    # 2. the rewards, constants
    with torch.no_grad():
        rewards = reward_model(*samples).float()                     # (P*K,)
    # 3. the policy-gradient loss
    return rloo_loss(policy, ref, samples, rewards, cfg.pg_group, cfg.beta_kl)


def rl_steps(name, label, policy, ref, reward_model, steps, batches, stage, cfg):
    """`steps` steps of rl_step on the policy (trained in place), saved as <name>.pt."""
    opt = configure_optimizer(policy, cfg.pg_lr, cfg.weight_decay)
    ckpt = Checkpoint(stage, name, policy=policy, opt=opt)
    for step in ckpt.steps(steps):
        prompts, _, generator = batches.policy(label, step)
        with autocast(cfg):
            loss, stats = rl_step(policy, ref, reward_model, prompts, generator, batches.eos_id, cfg)
        optimizer_step(policy, opt, loss, lr_at(step, steps, cfg.pg_lr, cfg), cfg.grad_clip)
        ckpt.log(step, loss, **stats)


def rl_on_reward(name, pi_sft, reward_model, batches, stage, cfg):
    """RL from pi_sft on an already trained reward model, KL to pi_sft (init_sft: AfD's tailored
    reward model used for training rather than reranking; ava_d: AVA's expected return)."""
    policy, ref = trainable_copy(pi_sft), frozen_copy(pi_sft)
    rl_steps(f"policy_{name}", name, policy, ref, reward_model, cfg.pg_steps, batches, stage, cfg)
    return policy


# ----------------------------------------------------------------------------------------
# 7. Iterated IRL with an explicit reward

def irl_round(k, pi_sft, policy, triples, batches, stage, cfg):
    """Round k of iterated IRL (METHOD.md section 7; arXiv 2503.13538 and its released code),
    from pi_k = policy (trained in place); returns P_k:
      1. sample y~ ~ pi_k(.|x) near-greedily (temperature irl_temperature) on a random subset
         of the demonstration prompts;
      2. aggregate: P_k = P_{k-1} + {(x, y^E, y~)};
      3. a fresh reward model r_k from pi_sft's trunk, trained on all of P_k with
         L_R = -E_{P_k} log sigma(r(x, y^E) - r(x, y~)) (Bradley-Terry, the demonstration
         always the winner: no preference labels);
      4. policy steps: maximise E_{y ~ pi}[r_k(x, y)] - beta_kl KL(pi || pi_k), giving pi_{k+1}.
    """
    # 1. sample: pi_k answers the round's demonstration prompts, near-greedily
    prompts, demonstrations = batches.demonstrations(f"irl_round{k}")
    own = sample(policy, prompts, 1, cfg, batches.eos_id, stable_seed(cfg.seed, f"irl_round{k}"),
                 f"sample irl_round{k}", temperature=cfg.irl_temperature)
    # 2. aggregate the (prompt, demonstration, own sample) triples of every round so far
    triples = triples + list(zip(prompts, demonstrations, own))
    # 3. reward steps: a fresh reward model from pi_sft; the demonstration beats pi_j's sample, j <= k
    reward_model = RewardModel.from_policy(pi_sft).to(cfg.device)
    opt = configure_optimizer(reward_model, cfg.rm_lr, cfg.weight_decay)
    ckpt = Checkpoint(stage, f"rm_irl_iterated_round{k}", rm=reward_model, opt=opt)
    for step in ckpt.steps(cfg.irl_rm_steps):
        with autocast(cfg):
            loss = pairwise_loss(reward_model, batches.triples(triples, f"irl_rm{k}", step))
        optimizer_step(reward_model, opt, loss, lr_at(step, cfg.irl_rm_steps, cfg.rm_lr, cfg), cfg.grad_clip)
        ckpt.log(step, loss)
    # 4. policy steps on the round's fixed reward, KL to pi_k
    rl_steps(f"policy_irl_iterated_round{k}", f"irl{k}", policy, frozen_copy(policy), frozen_copy(reward_model),
             max(1, cfg.pg_steps // cfg.irl_rounds), batches, stage, cfg)
    return triples


def irl_iterated(pi_sft, batches, stage, cfg):
    """Iterated IRL, whole: pi_0 = pi_sft, P_{-1} = {}; round k trains r_k fresh from pi_sft on
    P_k and takes pi_k to pi_{k+1}."""
    policy = trainable_copy(pi_sft)
    triples = []
    for k in range(cfg.irl_rounds):
        triples = irl_round(k, pi_sft, policy, triples, batches, stage, cfg)
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


def irft_stage(t, policy, batches, stage, cfg):
    """Stage t of IRFT (METHOD.md section 8), from pi_t = policy (trained in place):
      1. sample y~ ~ pi_t(.|x) on the stage's own slice of the demonstrations (the stages'
         slices are disjoint, as in IRFT's released code);
      2. freeze pi_t, the reference of the implicit reward beta log(pi / pi_t);
      3. steps on irft_loss, the demonstration winning over pi_t's own sample.
    """
    # 1. sample: pi_t answers the stage's demonstration prompts
    prompts, demonstrations = batches.demonstrations("irft", part=t, parts=cfg.irft_stages)
    own = sample(policy, prompts, 1, cfg, batches.eos_id, stable_seed(cfg.seed, f"irft{t}"), f"sample irft{t}")
    triples = list(zip(prompts, demonstrations, own))
    # 2. the frozen reference
    ref = frozen_copy(policy)
    # 3. steps on the IRFT loss; a batch holds B demonstrations, then the B samples
    steps = max(1, cfg.pg_steps // cfg.irft_stages)
    opt = configure_optimizer(policy, cfg.pg_lr, cfg.weight_decay)
    ckpt = Checkpoint(stage, f"policy_irft_stage{t}", policy=policy, opt=opt)
    for step in ckpt.steps(steps):
        idx, targets, _ = batches.triples(triples, f"irft{t}", step)
        with autocast(cfg):
            logp = sequence_logprob(policy, idx, targets)            # (2B,)
            with torch.no_grad():
                logp_ref = sequence_logprob(ref, idx, targets)       # (2B,)
            B = logp.shape[0] // 2
            loss = irft_loss(logp[:B], logp_ref[:B], logp[B:], logp_ref[B:], cfg.irft_beta)
        optimizer_step(policy, opt, loss, lr_at(step, steps, cfg.pg_lr, cfg), cfg.grad_clip)
        ckpt.log(step, loss)


def irft(pi_sft, batches, stage, cfg):
    """IRFT, whole: pi_0 = pi_sft; stage t takes pi_t to pi_{t+1}."""
    policy = trainable_copy(pi_sft)
    for t in range(cfg.irft_stages):
        irft_stage(t, policy, batches, stage, cfg)
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


def weighted_vote(text_ids, scores, n, generator, draws=256, temperature=1.0):
    """Verifier-weighted self-consistency: among n of the N samples of a prompt, keep the text whose
    copies carry the most weight, each sample weighing w_i = softmax(r_i / temperature) over the n
    (r_i a reward model's score; ties broken at random). A text's weight is the sum over its copies:
    with equal scores this is majority voting, as temperature -> 0 it is Best-of-n. text_ids, scores
    (P, N). Returns (P, draws) the kept sample's index in `draws` random n-subsets (as majority_vote)."""
    P, N = text_ids.shape
    kept = []
    for _ in range(draws):
        subset = torch.rand(P, N, generator=generator).argsort(dim=1)[:, :n]                    # (P, n)
        ids = torch.gather(text_ids, 1, subset)                                                 # (P, n)
        w = torch.softmax(torch.gather(scores.double(), 1, subset) / temperature, dim=1)        # (P, n)
        weight = ((ids[:, :, None] == ids[:, None, :]).double() * w[:, None, :]).sum(dim=2)     # (P, n) of each one's text
        best = weight == weight.max(dim=1, keepdim=True).values                                 # exact ties only
        tie_break = torch.rand(P, n, generator=generator) * best
        kept.append(torch.gather(subset, 1, tie_break.argmax(dim=1, keepdim=True)))
    return torch.cat(kept, dim=1)                                                               # (P, draws)


def kl_bound(n):
    """KL(pi_BoN || pi_sft) <= log n - (n - 1) / n."""
    return math.log(n) - (n - 1) / n


def best_of_n_evaluation(scores, golden, text_ids, values, sizes, seed):
    """Best-of-n for every n in sizes from one draw of N candidates per prompt (METHOD.md section 9),
    as {picker: {n: {value: (P,) the expected value of the pick}}}, where a picker is
      each reward model of scores {name: (P, N) its scores of the candidates}: the best-scored of n,
      "oracle": the best of n by the golden reward (P, N) itself, the ceiling of any reward model,
      "majority": the most frequent text of n (self-consistency: text_ids (P, N), no reward),
      "weighted_<name>": each reward model's weighted vote over the n (weighted_vote, temperature 1),
    and values {value: (P, N)} (the golden reward, a win indicator, ...) what is averaged."""
    def by_kept(kept):  # the mean value of the samples kept in random n-subsets; at n = 1, of all
        return lambda v, n: v.double().mean(dim=1) if n == 1 else torch.gather(v.double(), 1, kept[n]).mean(dim=1)
    pickers = {name: (lambda v, n, s=s: best_of_n_estimate(s, v, n)) for name, s in scores.items()}
    pickers["oracle"] = lambda v, n: best_of_n_estimate(golden, v, n)
    pickers["majority"] = by_kept({n: majority_vote(text_ids, n, torch.Generator().manual_seed(
        stable_seed(seed, "majority", n))) for n in sizes if n > 1})  # (P, draws) each
    for name, s in scores.items():
        pickers[f"weighted_{name}"] = by_kept({n: weighted_vote(text_ids, s, n, torch.Generator().manual_seed(
            stable_seed(seed, "weighted", name, n))) for n in sizes if n > 1})
    return {name: {n: {key: pick(v, n) for key, v in values.items()} for n in sizes}
            for name, pick in pickers.items()}


# ----------------------------------------------------------------------------------------
# 10. AVA's direct optimisation

def ava_d_direct(pi_sft, batches, stage, cfg):
    """AVA-d's direct optimisation (arXiv 2411.09341, "AVA pipelines"; METHOD.md section 10): the
    policy is the Boltzmann policy of AVA's Q model, whose Q head is the policy's own LM head,
    Q(s, .) = log softmax(alpha z(s)). From pi_sft, the Q model (the policy) and a fresh reward
    head are trained jointly on reward.ava_d_loss over the demonstrations. Returns the trunk: with
    alpha * beta = 1 the Boltzmann policy softmax(beta Q) = softmax(z) is it."""
    model = AVARewardModel.from_policy(pi_sft).to(cfg.device)
    opt = configure_optimizer(model, cfg.pg_lr, cfg.weight_decay)
    ckpt = Checkpoint(stage, "policy_ava_d_direct", model=model, opt=opt)
    for step in ckpt.steps(cfg.pg_steps):
        idx, targets, _ = batches.pairs(batches.demos, "ava_d_direct", step)
        with autocast(cfg):
            loss = ava_d_loss(model, idx, targets, cfg.ava_lambda, cfg.ava_gamma, cfg.ava_alpha, cfg.ava_beta)
        optimizer_step(model, opt, loss, lr_at(step, cfg.pg_steps, cfg.pg_lr, cfg), cfg.grad_clip)
        ckpt.log(step, loss)
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
