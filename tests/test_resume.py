"""Reliability: resumable stages, safe checkpoints, clear errors on bad input, torchrun."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import afd
import checkpoint
import cli
import data
import training
from model import GPT, GPTConfig, configure_optimizer
from test_faults import comparable

ROOT = Path(__file__).resolve().parents[1]
# smoke, with a pre-training stage long enough to be killed in the middle of
ARGS = ["--preset=smoke", "--device=cpu", "--pretrain_steps=300", "--ckpt_every=25"]


def digests(out_dir):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(out_dir).iterdir()}


@pytest.fixture(scope="module")
def finished(run, tmp_path_factory):
    """One uninterrupted run; tests copy its out dir rather than change it."""
    out = tmp_path_factory.mktemp("finished")
    proc = run(*ARGS, f"--out_dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_results(run, finished, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "train.py", *ARGS, f"--out_dir={out}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "pi_init.resume.pt").exists() and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "pi_init.resume.pt").exists() and not (out / "pi_init.pt").exists()  # killed mid-stage
    step = torch.load(out / "pi_init.resume.pt", weights_only=True)["step"]
    resumed = run(*ARGS, f"--out_dir={out}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"[pi_init] resuming from step {step} of 300" in resumed.stdout
    assert not (out / "pi_init.resume.pt").exists()
    assert comparable(out) == comparable(finished)  # bit-identical on the CPU


@pytest.mark.slow
def test_rerun_skips_what_is_up_to_date_and_redoes_what_changed(run, finished, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    (out / "report.md").unlink()  # a derived file: redrawn from results.json, no stage redone
    same = run(*ARGS, f"--out_dir={out}")
    assert same.returncode == 0 and "[evaluate] up to date" in same.stdout
    assert "## How to read this report" in (out / "report.md").read_text()
    assert comparable(out) == comparable(finished)
    changed = run(*ARGS, f"--out_dir={out}", "--rm_lr=1e-3")
    assert changed.returncode == 0, changed.stderr[-2000:]
    for label, path in [("pi_init", "pi_init.pt"), ("pi_sft", "pi_sft.pt"), ("sample", "samples.pt")]:
        assert f"[{label}] loaded {out / path} (up to date)" in changed.stdout
    assert f"[rm_init_sft] rm_lr 0.0003 -> 0.001 since {out / 'rm_init_sft.pt'}: redoing it" in changed.stdout
    assert comparable(out)["config"]["rm_lr"] == 1e-3
    assert comparable(out)["policies"][:3] == comparable(finished)["policies"][:3]  # same pi_init, pi_sft
    assert comparable(out)["reward_models"] != comparable(finished)["reward_models"]


PROJECT = ["model.py", "gpt2.py", "data.py", "realdata.py", "reward.py", "afd.py", "report.py", "train.py", "cli.py",
           "parallel.py", "checkpoint.py", "training.py", "assets"]


@pytest.mark.slow
def test_an_edited_loss_redoes_the_runs_that_call_it_and_nothing_else(finished, tmp_path):
    """A student edits afd.irft_loss and reruns: the IRFT stages are retrained (the log says
    which function changed), evaluation is redone, everything else is loaded."""
    project = tmp_path / "project"
    project.mkdir()
    for name in PROJECT:
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, project / name)
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    afd_py = project / "afd.py"
    source = afd_py.read_text()
    line = "    return -F.logsigmoid(beta * margin).mean()"
    assert line in source
    afd_py.write_text(source.replace(line, line.replace("beta *", "2 * beta *")))
    rerun = subprocess.run([sys.executable, "train.py", *ARGS, f"--out_dir={out}"], cwd=project,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    loaded = ["pi_init", "pi_sft", "rm_init_sft", "rm_pref", "rm_ava_d", "policy_afd_adversarial",
              "policy_irl_iterated_round1", "policy_rl_init_sft", "policy_rl_ava_d", "policy_ava_d_direct"]
    for name in loaded:
        assert f"[{name}] loaded {out / name}.pt (up to date)" in rerun.stdout, name
    assert "[sample] loaded" in rerun.stdout
    for name in ["policy_irft_stage0", "policy_irft_stage1"]:
        assert f"[{name}] afd.irft_loss changed since {out / name}.pt: redoing it" in rerun.stdout
        assert f"[{name}] trained " in rerun.stdout
    assert f"[evaluate] afd.irft_loss changed since {out / 'results.json'}: redoing it" in rerun.stdout
    changed = {p["name"] for p in comparable(out)["policies"]} - {
        a["name"] for a, b in zip(comparable(out)["policies"], comparable(finished)["policies"]) if a == b}
    assert changed == {"irft"}  # IRFT's row, and no other, moved


def test_code_versions_follow_references_across_modules(tmp_path):
    """The code stamp of a root holds every project name it reaches, and only those."""
    (tmp_path / "model.py").write_text("SCALE = 2\n\ndef helper(x):\n    return SCALE * x\n\n"
                                       "def unused(x):\n    return x\n")
    (tmp_path / "afd.py").write_text("import model\nfrom model import helper as h\n\n"
                                     "def loss(x):\n    return h(x) + model.SCALE\n")
    before = checkpoint.code_versions(("afd.loss",), folder=str(tmp_path))
    assert sorted(before) == ["afd.loss", "model.SCALE", "model.helper"]
    (tmp_path / "model.py").write_text("SCALE = 3\n\ndef helper(x):\n    return SCALE * x\n\n"
                                       "def unused(x):\n    return -x\n")
    checkpoint.module_names.cache_clear(), checkpoint.code_versions.cache_clear()
    after = checkpoint.code_versions(("afd.loss",), folder=str(tmp_path))
    assert [k for k in before if before[k] != after[k]] == ["model.SCALE"]
    assert checkpoint.changes({"code": before, "sft_lr": 1}, {"code": after, "sft_lr": 2}) == \
        "sft_lr 1 -> 2; model.SCALE changed"


def versions_after(tmp_path, before_source, after_source, roots=("afd.loss",)):
    """code_versions of roots with model.py as before_source, then as after_source (afd.py fixed)."""
    out = []
    for source in (before_source, after_source):
        (tmp_path / "model.py").write_text(source)
        checkpoint.module_names.cache_clear(), checkpoint.code_versions.cache_clear()
        out.append(checkpoint.code_versions(roots, folder=str(tmp_path)))
    return out


def test_the_cache_stamps_each_name_of_a_multi_target_assignment_on_its_own(tmp_path):
    """Edit one of four constants assigned on one line: that one, and only it, is named."""
    (tmp_path / "afd.py").write_text("import model\n\ndef loss(x):\n    return model.A + model.C * x\n")
    before, after = versions_after(tmp_path, "A, B, C, D = 1, 2, 3, 4\n", "A, B, C, D = 1, 2, 30, 4\n")
    assert sorted(before) == ["afd.loss", "model.A", "model.C"]  # B and D are never read
    assert [k for k in before if before[k] != after[k]] == ["model.C"]
    assert checkpoint.changes({"code": before}, {"code": after}) == "model.C changed"


def test_the_cache_ignores_docstrings_and_comments(tmp_path):
    (tmp_path / "afd.py").write_text("import model\n\ndef loss(x):\n    return model.helper(x)\n")
    before, after = versions_after(
        tmp_path, 'def helper(x):\n    """Twice x."""\n    return 2 * x  # doubled\n',
        'def helper(x):\n    """Two times x, reworded."""\n    # a new comment\n    return 2 * x    # doubled, twice\n')
    assert before == after
    _, edited = versions_after(tmp_path, 'def helper(x):\n    return 2 * x\n', 'def helper(x):\n    return 3 * x\n')
    assert edited != after


def test_the_cache_stamps_a_class_by_the_methods_the_code_reads(tmp_path):
    """A class's methods each have their own stamp, counted when the code reads their name (and
    forward and the dunders, called implicitly): editing a method the stage never calls redoes nothing."""
    (tmp_path / "afd.py").write_text("from model import Net\n\ndef loss(x):\n    return Net().score(x)\n")
    source = ("class Net:\n    SCALE = 2\n\n    def __init__(self):\n        self.k = 1\n\n"
              "    def score(self, x):\n        return self.helper(x) * self.SCALE\n\n"
              "    def helper(self, x):\n        return x + self.k\n\n    def sample(self):\n        return 0\n")
    before, after = versions_after(tmp_path, source, source.replace("return 0", "return 1"))
    assert sorted(before) == ["afd.loss", "model.Net", "model.Net.__init__", "model.Net.helper", "model.Net.score"]
    assert before == after  # sample() is never read: its edit redoes nothing
    _, edited = versions_after(tmp_path, source, source.replace("x + self.k", "x - self.k"))
    assert [k for k in before if before[k] != edited[k]] == ["model.Net.helper"]
    _, scaled = versions_after(tmp_path, source, source.replace("SCALE = 2", "SCALE = 3"))
    assert [k for k in before if before[k] != scaled[k]] == ["model.Net"]


def test_a_stale_entry_in_the_cache_tables_stops_the_run_with_one_line(tmp_path, monkeypatch, capsys):
    """A method's entry point renamed in afd.py, or a method without an entry in UNIT_CODE: one line
    naming it, before any work (a stale table would stamp the wrong code and redo every method)."""
    checkpoint.check_code_tables(cli.METHODS, ["init_sft", "pref", "logratio"])  # the tables as they are
    monkeypatch.setitem(checkpoint.UNIT_CODE["policy"], "irft", "afd.irft_renamed")
    with pytest.raises(SystemExit):
        checkpoint.check_code_tables(cli.METHODS, [])
    assert "checkpoint.UNIT_CODE names afd.irft_renamed, which afd.py does not define (renamed?)" in \
        capsys.readouterr().err
    monkeypatch.setitem(checkpoint.UNIT_CODE["policy"], "irft", "afd.irft")
    with pytest.raises(SystemExit):
        checkpoint.check_code_tables([*cli.METHODS, "new_method"], [])
    assert "UNIT_CODE['policy'] has no entry for new_method" in capsys.readouterr().err


def test_a_sampling_constant_is_in_the_stamp_of_sampling_not_of_pre_training_or_sft():
    cfg = cli.Config()
    assert "model.MIN_ROWS" not in checkpoint.stage_config(cfg, "sft")["code"]
    assert "model.MIN_ROWS" in checkpoint.stage_config(cfg, "sample")["code"]
    assert "training.Batches.pairs" in checkpoint.stage_config(cfg, "pretrain")["code"]  # its batches


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def demo_line(prompt="\n\nHuman: Hi there\n\nAssistant:", response=" Hello!"):
    return json.dumps({"prompt": prompt, "response": response})


@pytest.mark.slow
def test_bad_inputs_are_one_clear_error_and_keep_earlier_files(run, finished, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    before = digests(out)
    a_file = write_lines(tmp_path / "plain.txt", ["not a folder"])
    cases = [
        (["--demos=" + str(tmp_path / "missing.jsonl")], "missing.jsonl: cannot read it (No such file"),
        (["--demos=" + str(write_lines(tmp_path / "empty.jsonl", []))], "empty.jsonl: holds no demonstrations"),
        (["--demos=" + str(write_lines(tmp_path / "bad.jsonl", [demo_line(), "{oops"]))],
         "bad.jsonl line 2: not valid JSON"),
        (["--demos=" + str(write_lines(tmp_path / "key.jsonl", [json.dumps({"prompt": "x"})]))],
         'key.jsonl line 1: needs the string fields "prompt" and "response"'),
        (["--demos=" + str(write_lines(tmp_path / "fmt.jsonl", [demo_line(prompt="Hi")]))],
         "fmt.jsonl line 1: the prompt must be a dialogue ending with"),
        (["--demos=" + str(write_lines(tmp_path / "long.jsonl", [demo_line(), demo_line("\n\nHuman:" + " word" * 200 + "\n\nAssistant:")]))],
         "long.jsonl line 2 has "),  # ... tokens, more than the context
        (["--batch_size=4000000"], "needs about"),
        (["--n_layer=two"], "--n_layer='two' is not a valid int"),
        (["--learning_rate=1"], "unknown option --learning_rate"),
    ]
    for extra, message in cases:
        proc = run(*ARGS, f"--out_dir={out}", *extra)
        assert proc.returncode == 2, (extra, proc.stderr[-2000:])
        assert message in proc.stderr and "Traceback" not in proc.stderr, (extra, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert digests(out) == before, extra
    proc = run(*ARGS, f"--out_dir={a_file}/out")
    assert proc.returncode == 2 and "cannot create --out_dir" in proc.stderr and "Traceback" not in proc.stderr


class RunsCode:
    """An object whose unpickling runs a command: what a malicious checkpoint holds."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_a_checkpoint_that_would_run_code_is_refused(run, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "pi_init.pt"
    torch.save({"model": RunsCode(marker)}, evil)
    with pytest.raises(SystemExit) as stop:
        checkpoint.load_checkpoint(str(evil))
    assert stop.value.code == 2 and "is not a safe checkpoint" in capsys.readouterr().err
    assert not marker.exists()
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(evil, out / "pi_init.pt")
    proc = run("--preset=smoke", f"--out_dir={out}")
    assert proc.returncode == 2 and "pi_init.pt is not a safe checkpoint" in proc.stderr
    assert not marker.exists()


def test_a_checkpoint_of_another_model_is_a_clear_error(tmp_path, capsys):
    vocab = data.Vocab.from_texts(["\n\nHuman: What is 2 plus 3?\n\nAssistant: 5."])
    small = GPT(GPTConfig(block_size=16, vocab_size=len(vocab), n_layer=1, n_head=1, n_embd=8))
    wide = GPT(GPTConfig(block_size=16, vocab_size=len(vocab), n_layer=1, n_head=1, n_embd=16))
    path = str(tmp_path / "pi_init.pt")
    checkpoint.save_model(path, small, vocab, {"seed": 0})
    with pytest.raises(SystemExit):
        checkpoint.load_weights(wide, checkpoint.load_checkpoint(path), path, vocab)
    assert "was made for another model config or vocabulary" in capsys.readouterr().err
    other_vocab = data.Vocab.from_texts(["\n\nHuman: Hello\n\nAssistant: Hi."])
    with pytest.raises(SystemExit):
        checkpoint.load_weights(small, checkpoint.load_checkpoint(path), path, other_vocab)
    checkpoint.load_weights(small, checkpoint.load_checkpoint(path), path, vocab)  # the right one loads


def test_a_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = cli.Config(out_dir=str(tmp_path), ckpt_every=2, warmup_steps=1, device="cpu")
    vocab = data.Vocab.from_texts(["\n\nHuman: What is 2 plus 3?\n\nAssistant: 5."])
    model = GPT(GPTConfig(block_size=16, vocab_size=len(vocab), n_layer=1, n_head=1, n_embd=8))
    opt = configure_optimizer(model, 1e-3, 0.0)
    idx = torch.randint(len(vocab), (2, 8))
    ckpt = training.Checkpoint(training.Stage(cfg, vocab, {"toy": 1}), "toy", model=model, opt=opt)
    with pytest.raises(SystemExit):
        for step in ckpt.steps(10):
            loss = model(idx, idx)[1]
            afd.optimizer_step(model, opt, loss * float("nan") if step == 5 else loss, 1e-3, cfg.grad_clip)
            ckpt.log(step, loss)
    err = capsys.readouterr().err
    assert "toy: the loss became nan at step 5" in err and "toy.resume.pt" in err
    kept = torch.load(tmp_path / "toy.resume.pt", weights_only=True)
    assert kept["step"] == 4 and [r["step"] for r in kept["curve"]] == [0, 1, 2, 3]
    assert set(kept["state"]) == {"opt"}  # every named state beside the model


def test_a_resumed_loop_restores_every_named_state_and_ends_as_an_uninterrupted_one(tmp_path, capsys):
    """Checkpoint: a loop killed after its checkpoint at step 4 goes on from there, with the model,
    both optimisers and the RNG restored, and ends with the same weights and curve as one never killed."""
    vocab = data.Vocab.from_texts(["\n\nHuman: What is 2 plus 3?\n\nAssistant: 5."])

    def run(out, kill_at=None):
        cfg = cli.Config(out_dir=str(tmp_path / out), ckpt_every=2, warmup_steps=1, device="cpu")
        os.makedirs(cfg.out_dir, exist_ok=True)
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=16, vocab_size=len(vocab), n_layer=1, n_head=1, n_embd=8, dropout=0.1))
        other = torch.nn.Linear(3, 1)  # a second trained module with its own optimiser (a discriminator)
        opt, other_opt = configure_optimizer(model, 1e-2, 0.0), configure_optimizer(other, 1e-2, 0.0)
        idx = torch.randint(len(vocab), (2, 8))
        ckpt = training.Checkpoint(training.Stage(cfg, vocab, {"toy": 1}), "toy", model=model, opt=opt,
                                   other=other, other_opt=other_opt)
        for step in ckpt.steps(8):
            if step == kill_at:
                return None
            afd.optimizer_step(other, other_opt, other(torch.rand(4, 3)).pow(2).mean(), 1e-2, 1.0)
            loss = model(idx, idx)[1]  # dropout draws from the global RNG, restored on resume
            afd.optimizer_step(model, opt, loss, afd.lr_at(step, 8, 1e-2, cfg), 1.0)
            ckpt.log(step, loss)
        return model, other
    whole, whole_other = run("whole")
    assert run("killed", kill_at=5) is None
    resumed, resumed_other = run("killed")
    assert "[toy] resuming from step 4 of 8" in capsys.readouterr().out
    for a, b in [(whole, resumed), (whole_other, resumed_other)]:
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    curve = lambda out: [json.loads(line)["loss"] for line in (tmp_path / out / "toy.curve.jsonl").read_text().splitlines()]
    assert curve("whole") == curve("killed") and len(curve("whole")) == 8
    assert not (tmp_path / "killed" / "toy.resume.pt").exists()


@pytest.mark.slow
def test_torchrun_two_processes_agree_with_one(finished, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", "train.py", *ARGS, f"--out_dir={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two, one = comparable(out), comparable(finished)
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["policies"][2]["golden_reward"] == 2.5  # the same demonstrations
    rows = [(a, b) for a, b in zip(two["policies"][:2], one["policies"][:2])]
    rows += [(a, b) for a, b in zip(two["best_of_n"], one["best_of_n"]) if a["n"] == 1]
    for a, b in rows:  # different batches and samples, the same distribution
        gap = abs(a["golden_reward"] - b["golden_reward"])
        assert gap <= 3 * (a["golden_reward_stderr"] ** 2 + b["golden_reward_stderr"] ** 2) ** 0.5 + 1e-9
