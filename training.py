"""
What the training loops of afd.py and train.py share, none of it a method: the Checkpoint that
makes a loop resumable in one line, the step-indexed batches, and the stop on a NaN.

    ckpt = Checkpoint(stage, "pi_sft", model=pi_sft, opt=opt)
    for step in ckpt.steps(cfg.sft_steps):        # from where a killed run stopped, if it did
        idx, targets, _ = batches.pairs(batches.demos, "sft", step)
        ...                                       # the loss, then afd.optimizer_step
        ckpt.log(step, loss)                      # the curve; every ckpt_every steps all is saved

Batches are functions of (--seed, a label, the step, the torchrun rank): the same label draws the
same batches, so a resumed run equals an uninterrupted one.
"""
import json
import os
import random
import zlib
from dataclasses import dataclass

import torch

import parallel
from checkpoint import changes, load_checkpoint, load_weights, restore, said, save_model
from cli import die
from data import make_batch
from parallel import is_main, log, progress
from report import curve_summary, write_text


def stable_seed(*parts):
    """A seed from a label's parts, the same in every process and every run."""
    return zlib.crc32("/".join(map(str, parts)).encode())


@dataclass
class Stage:
    """Where a stage's training runs keep their results: --out_dir, and the stage config (its fields
    and the hash of its code: checkpoint.stage_config) that stamps each of them."""
    cfg: object
    vocab: object
    config: dict


RUNNING = None  # the Checkpoint whose loop runs now: a NaN names it (check_finite)


class Checkpoint:
    """The state a training loop names (Checkpoint(stage, name, policy=..., opt=..., disc=...)),
    saved and restored as one. The first named module is the result: when the loop ends it is
    saved as <out_dir>/<name>.pt with the curve, and if that file is already up to date (the same
    stage config), steps() loads it and yields no step. Every ckpt_every steps every named state,
    the step, the curve and the RNG go to <name>.resume.pt, from which a later run goes on."""

    def __init__(self, stage, name, **state):
        self.stage, self.name, self.state = stage, name, state
        self.model = next(iter(state.values()))
        self.config = {**stage.config, "run": name}
        self.path = os.path.join(stage.cfg.out_dir, f"{name}.pt")
        self.resume_path = os.path.join(stage.cfg.out_dir, f"{name}.resume.pt")
        self.curve, self.start, self.step = [], 0, 0

    def steps(self, total):
        """The steps still to run, range(start, total); the result saved at the end."""
        global RUNNING
        cfg, vocab = self.stage.cfg, self.stage.vocab
        if (saved := restore(self.model, self.path, self.config, vocab, self.name)) is not None:
            self.curve = saved["curve"]
            self.tidy()
            said(self.name, f"loaded {self.path} (up to date): {curve_summary(self.curve)}")
            return
        torch.manual_seed(stable_seed(cfg.seed, self.name, parallel.RANK))  # dropout
        self.resume(total)
        RUNNING = self
        self.model.train()
        self.bar = progress(range(self.start, total), initial=self.start, total=total, desc=self.name)
        for step in self.bar:
            self.step = step
            yield step
            if (step + 1) % cfg.ckpt_every == 0 and step + 1 < total:
                save_model(self.resume_path, self.model, vocab, self.config, step=step + 1, curve=self.curve,
                           rng=torch.get_rng_state(), state={k: v.state_dict() for k, v in self.others()})
        self.model.eval()
        RUNNING = None
        self.write_curve()
        save_model(self.path, self.model, vocab, self.config, curve=self.curve)
        self.tidy()
        said(self.name, f"trained {len(self.curve)} steps: {curve_summary(self.curve)}")

    def log(self, step, loss, **stats):
        """One record of the curve: {"step", "loss", **stats}."""
        self.curve.append({"step": step, "loss": loss.item(), **stats})
        self.bar.set_postfix(loss=f"{loss.item():.3f}")

    def others(self):
        return [(k, v) for k, v in self.state.items() if v is not self.model]

    def resume(self, total):
        """Every named state, the step, the curve and the RNG from <name>.resume.pt, if it was made
        with this stage config."""
        if not os.path.exists(self.resume_path):
            return
        saved = load_checkpoint(self.resume_path)
        if saved.get("stage_config") != self.config:
            log(f"[{self.name}] {changes(saved.get('stage_config', {}), self.config)} since {self.resume_path}: "
                f"starting over")
            return
        load_weights(self.model, saved, self.resume_path, self.stage.vocab)
        for key, value in self.others():
            value.load_state_dict(saved["state"][key])
        self.start, self.curve = saved["step"], saved["curve"]
        torch.set_rng_state(saved["rng"])
        log(f"[{self.name}] resuming from step {self.start} of {total} ({self.resume_path})")

    def write_curve(self):
        """<name>.curve.jsonl, one JSON record a step, unless it already holds exactly that."""
        path = os.path.join(self.stage.cfg.out_dir, f"{self.name}.curve.jsonl")
        text = "".join(json.dumps(r) + "\n" for r in self.curve)
        if is_main() and not (os.path.isfile(path) and open(path).read() == text):
            write_text(text, path)

    def tidy(self):
        """What sits beside an up-to-date <name>.pt, made whole whether or not an earlier run was
        stopped half-way: its curve file, and no resume checkpoint."""
        self.write_curve()
        if is_main() and os.path.exists(self.resume_path):
            os.remove(self.resume_path)


def check_finite(what, value, model):
    """Stop with one line if value (a loss, a gradient norm) is NaN or infinite on any process."""
    if not parallel.all_finite(value):
        run = RUNNING
        die(not_finite(run.name if run else "training", what, value, run.step if run else 0,
                       run.start if run else 0, model, run.resume_path if run else ""))


LR_OPTION = {"pi_init": "--pretrain_lr", "pi_sft": "--sft_lr", "rm": "--rm_lr", "policy": "--pg_lr"}


def not_finite(name, what, value, step, start, model, path):
    """The one line that says why training `name` stopped on a NaN or infinite value, and what to
    change: the weights it started from, or its learning rate (a loss that diverged)."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    kept = f"; the last good checkpoint is {path}" if os.path.exists(path) else ""
    if bad:  # only the weights it was loaded with can be (the step stops before an update makes them)
        return (f"{name}: the weights it starts from hold NaN or infinite values ({bad[0]}); "
                f"they come from --init_from or a checkpoint in --out_dir: use other weights{kept}")
    if step == start == 0:
        return (f"{name}: the {what} is {value.item()} on the first batch, before any update: the data "
                f"or the starting weights give it, not the learning rate")
    option = LR_OPTION.get(name.split("_")[0], LR_OPTION.get(name))
    return (f"{name}: the {what} became {value.item()} at step {step}; training diverged: lower "
            f"{option or 'the learning rate'} (or --grad_clip){kept}")


class Batches:
    """Step-indexed batches for the training loops, this process's share under torchrun:

        pairs(rows, label, step)        a data.make_batch of (prompt, response) rows, grouped by length
        triples(triples, label, step)   a batch of B better responses, then the B worse ones
        policy(label, step)             (prompts, their demonstrations, a generator): a policy step's prompts
        demonstrations(label, part=0, parts=1)   a random subset of the demonstrations (prompts, responses)
    """

    def __init__(self, cfg, eos_id, demos):
        self.cfg, self.eos_id, self.demos, self.groups = cfg, eos_id, demos, {}

    def batch(self, pairs, **kw):
        return make_batch([p for p, _ in pairs], [r for _, r in pairs], self.eos_id, self.cfg.device, **kw)

    def pairs(self, rows, label, step, loss_on_prompt=False):
        """Rows are drawn 8 batches at a time and sorted by length, so that a batch holds little padding."""
        size, g = self.cfg.batch_size // parallel.WORLD, step // 8
        if (label, g) not in self.groups:
            self.groups = {}  # one group of 8 batches kept
            rng = random.Random(f"{self.cfg.seed}/{label}/{g}/{parallel.RANK}")
            pool = sorted((rows[rng.randrange(len(rows))] for _ in range(8 * size)),
                          key=lambda row: len(row[0]) + len(row[1]))
            batches = [pool[i:i + size] for i in range(0, len(pool), size)]
            rng.shuffle(batches)
            self.groups[label, g] = batches
        return self.batch(self.groups[label, g][step % 8], loss_on_prompt=loss_on_prompt)

    def rows(self, rows, size, label, step):
        """`size` rows drawn at random (with replacement)."""
        rng = random.Random(f"{self.cfg.seed}/{label}/{step}/{parallel.RANK}")
        return [rows[rng.randrange(len(rows))] for _ in range(size)]

    def triples(self, triples, label, step):
        """Half a batch of (prompt, better, worse) triples: the better responses, then the worse."""
        return self.triples_batch(self.rows(triples, max(1, self.cfg.batch_size // parallel.WORLD // 2), label, step))

    def triples_batch(self, triples):
        """One batch of (prompt, better, worse) triples: the B better responses, then the B worse."""
        return self.batch([(p, a) for p, a, _ in triples] + [(p, b) for p, _, b in triples])

    def policy(self, label, step):
        """pg_prompts demonstration prompts (this process's share), their demonstrations, and the
        generator of the step's samples, seeded by the prompts picked."""
        cfg = self.cfg
        indices = self.rows(range(len(self.demos)), max(1, cfg.pg_prompts // parallel.WORLD), label, step)
        generator = torch.Generator(cfg.device).manual_seed(stable_seed(cfg.seed, label, indices, parallel.RANK))
        return [self.demos[i][0] for i in indices], [self.demos[i][1] for i in indices], generator

    def demonstrations(self, label, part=0, parts=1):
        """n_round_samples demonstration prompts drawn without replacement, and their responses.
        With parts > 1, the part-th of `parts` disjoint slices of one random order of the
        demonstrations (each of min(n_round_samples, n_demo // parts) prompts)."""
        rng = random.Random(f"{self.cfg.seed}/{label}/prompts")
        size = min(self.cfg.n_round_samples, len(self.demos) // parts)
        indices = rng.sample(range(len(self.demos)), size * parts)[part * size:(part + 1) * size]
        return [self.demos[i][0] for i in indices], [self.demos[i][1] for i in indices]
