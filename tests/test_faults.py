"""Faults: a run stopped at any file write (a kill, Ctrl-C, a full disk) leaves every output whole
or absent, and the same command then finishes with the results of a run never stopped."""
import collections
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import types
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import checkpoint
import cli
import data
import train
import training
from model import GPT, GPTConfig
from test_gpt2_import import hf_layout, write_safetensors

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--preset=smoke", "--device=cpu"]


class Killed(BaseException):
    """The process ends here (a BaseException: no `except Exception` of the project catches it)."""


def comparable(out_dir):
    """results.json less what differs between equal runs: times, the out dir, and which stages
    were trained or loaded."""
    results = json.loads((Path(out_dir) / "results.json").read_text())
    for key in ("wall_time_s", "stages", "stage_times", "digest"):
        results.pop(key, None)
    results["config"].pop("out_dir")
    return results


def files(out_dir):
    return sorted(p.name for p in Path(out_dir).iterdir())


def curves(out_dir):
    return {p.name: p.read_text() for p in Path(out_dir).glob("*.curve.jsonl")}


def run_in_process(out_dir, monkeypatch, kill_after=None, extra=()):
    """train.main on out_dir (and the extra options) with every rename into it recorded; kill_after(name)
    -> True raises Killed right after that rename, as if the process died there. Returns the names renamed."""
    real_replace, renamed = os.replace, []

    def replace(src, dst):
        real_replace(src, dst)
        if Path(dst).parent == Path(out_dir):
            renamed.append(Path(dst).name)
            if kill_after is not None and kill_after(Path(dst).name):
                raise Killed(Path(dst).name)
    with monkeypatch.context() as m:
        m.setattr(os, "replace", replace)
        try:
            train.main([*ARGS, *extra, f"--out_dir={out_dir}"])
        except Killed:
            pass
    return renamed


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One run never stopped, and the files it renames into place, in order."""
    out = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as monkeypatch:
        renamed = run_in_process(out, monkeypatch)
    return out, renamed


@pytest.mark.slow
@pytest.mark.parametrize("resume_file", ["policy_afd_adversarial.resume.pt", "policy_irft_stage1.resume.pt"])
def test_killed_mid_method_resumes_every_named_state_to_the_same_results(reference, tmp_path, monkeypatch,
                                                                         resume_file):
    """Killed right after a method's loop wrote its resume checkpoint (every 2 steps here), the rerun
    restores every state the loop names (the adversarial discriminator and both optimisers too) and
    ends with the reference's results and curves."""
    out = tmp_path / "out"
    run_in_process(out, monkeypatch, lambda name: name == resume_file, extra=["--ckpt_every=2"])
    assert not (out / "results.json").exists()
    saved = torch.load(out / resume_file, weights_only=True)
    assert saved["step"] == 2 and set(saved["state"]) >= {"opt"}
    if "adversarial" in resume_file:
        assert set(saved["state"]) == {"opt", "disc", "disc_opt"}
    run_in_process(out, monkeypatch, extra=["--ckpt_every=2"])
    resumed, whole = comparable(out), comparable(reference[0])
    resumed["config"].pop("ckpt_every"), whole["config"].pop("ckpt_every")
    assert resumed == whole
    assert curves(out) == curves(reference[0])


@pytest.mark.slow
def test_killed_after_every_write_the_rerun_repairs_and_finishes_the_same(reference, tmp_path, monkeypatch):
    """Kill the run right after each rename of the reference run in turn (every file it writes:
    checkpoints, curves, samples, results, report, plot), rerunning the same command after each,
    until a run finishes; then results.json equals the reference's and every file is there."""
    ref_out, ref_renamed = reference
    assert len(ref_renamed) > 30 and "results.json" in ref_renamed and "report.md" in ref_renamed
    out, left = tmp_path / "out", collections.Counter(ref_renamed)  # kills still to make, per file
    kills = []

    def kill_after(name):
        if left[name] > 0:  # a write the reference makes that no earlier run was killed after
            left[name] -= 1
            kills.append(name)
            return True
        return False
    for attempt in range(len(ref_renamed) + 5):
        before = len(kills)
        run_in_process(out, monkeypatch, kill_after)
        if len(kills) == before:  # finished without a kill
            break
        # whatever a kill leaves: no temporary file, no output half-written
        assert not [f for f in files(out) if f.endswith(".tmp")], kills[-1]
    assert sum(left.values()) == 0, f"never killed after {+left}"
    assert len(kills) == len(ref_renamed)
    assert comparable(out) == comparable(ref_out)
    assert files(out) == files(ref_out)  # every derived file, and no stale resume checkpoint
    assert curves(out) == curves(ref_out)
    assert (out / "report.md").read_text().count("## ") == (ref_out / "report.md").read_text().count("## ")


def killing_run(out, after, extra_env=None):
    """train.py in a child process that dies (os._exit: no clean-up at all) right after `after` is
    renamed into out."""
    hook = ("import os, runpy, sys; real = os.replace\n"
            "def replace(a, b):\n"
            "    real(a, b)\n"
            f"    if os.path.basename(b) == {after!r}: os._exit(137)\n"
            "os.replace = replace; sys.path.insert(0, os.getcwd())\n"
            f"sys.argv = ['train.py', *{[*ARGS, f'--out_dir={out}']!r}]\n"
            "runpy.run_path('train.py', run_name='__main__')\n")
    return subprocess.run([sys.executable, "-c", hook], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_process_killed_after_a_rename_resumes_to_the_same_results(run, reference, tmp_path):
    """The same, with a real process death (no finally, no flush): right after a checkpoint, before
    its resume file is removed."""
    out, after = tmp_path / "out", "pi_sft.pt"
    assert killing_run(out, after).returncode == 137
    assert (out / after).exists()
    proc = run(*ARGS, f"--out_dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert comparable(out) == comparable(reference[0])
    assert files(out) == files(reference[0]) and curves(out) == curves(reference[0])


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_the_rerun_goes_on(run, tmp_path):
    out = tmp_path / "out"
    # a shell's background job starts with SIGINT ignored, and Python then keeps it ignored: the child
    # gets the default disposition, as a command typed at a terminal has
    proc = subprocess.Popen([sys.executable, "train.py", *ARGS, f"--out_dir={out}", "--methods=bon"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (out / "pi_sft.pt").exists() and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("interrupted: finished stages and the last checkpoint are kept")
    assert not [f for f in files(out) if f.endswith(".tmp")]
    proc = run(*ARGS, f"--out_dir={out}", "--methods=bon")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[pi_sft] loaded" in proc.stdout and (out / "report.md").exists()


def limit_file_size(limit):
    """For a child process: files may not grow past `limit` bytes (writes fail with EFBIG, the
    signal that would kill the process is ignored): a disk that fills up, without root."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow
def test_a_write_that_fails_is_one_line_and_leaves_earlier_files_unchanged(run, reference, tmp_path):
    """The first checkpoint that does not fit stops the run with one line naming the file; no
    temporary file is left, nothing written before changes, and with room again the same command
    finishes the run."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "train.py", *ARGS, f"--out_dir={out}", "--methods=bon"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size(60_000))
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot write {out}/") and "could not be written in full" in last
    assert "run the same command again" in last
    assert not [f for f in files(out) if f.endswith(".tmp")]
    kept = {f: (out / f).read_bytes() for f in files(out)}
    proc = run(*ARGS, f"--out_dir={out}", "--methods=bon")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name, content in kept.items():  # what was whole before is reused as it was
        if name.endswith(".pt") and not name.endswith(".resume.pt"):
            assert (out / name).read_bytes() == content, name


# ----------------------------------------------------------------------------------------
# Mistakes: one line naming the input and the fix, a non-zero status, and no file changed

def write_hh_dir(folder, train_lines, test_lines):
    (folder / "harmless-base").mkdir(parents=True)
    (folder / "harmless-base" / "train.jsonl").write_text("".join(train_lines))
    (folder / "harmless-base" / "test.jsonl").write_text("".join(test_lines))
    return folder


def hh_lines(n, tag):
    return [json.dumps({"chosen": f"\n\nHuman: question {tag} {i}?\n\nAssistant: yes {i}",
                        "rejected": f"\n\nHuman: question {tag} {i}?\n\nAssistant: no"}) + "\n" for i in range(n)]


def bad_inputs(tmp):
    """(options, what the one line must say, exit status) for mistakes of every class."""
    (tmp / "eot.jsonl").write_text(json.dumps({"prompt": "\n\nHuman: say <|endoftext|>\n\nAssistant:",
                                               "response": " ok"}) + "\n")
    (tmp / "weights").mkdir()
    gpt = GPT(GPTConfig(block_size=128, vocab_size=50257, n_layer=1, n_head=2, n_embd=8, gelu="tanh"))
    write_safetensors(tmp / "weights" / "model.safetensors", hf_layout(gpt))
    (tmp / "weights" / "config.json").write_text("{not json")
    many = write_hh_dir(tmp / "hh_many", hh_lines(300, "train"), hh_lines(80, "test"))
    few = write_hh_dir(tmp / "hh_few", hh_lines(5, "train"), hh_lines(5, "test"))
    corrupt = tmp / "hh_corrupt" / "harmless-base"
    corrupt.mkdir(parents=True)
    for split in ("train", "test"):
        (corrupt / f"{split}.jsonl.gz").write_bytes(__import__("gzip").compress(bytes(range(256))))
    return [
        (["--temperature=nan"], "--temperature=nan must be at least 0", 2),
        (["--device=tpu"], "--device='tpu': choose auto, cpu, cuda, cuda:N or mps", 2),
        (["--device=mps"], "--device=mps but the Apple-silicon GPU is not available here", 2),
        (["--pref_noise_temp=0"], "--pref_noise_temp=0.0 must be positive", 2),
        (["--dropout=1.5"], "--dropout=1.5 must be in [0, 1)", 2),
        (["--multi_turn_prob=-0.1"], "--multi_turn_prob=-0.1 must be a probability", 2),
        (["--grad_clip=nan"], "--grad_clip=nan must be positive", 2),
        (["--seed=99999999999999999999"], "--seed=99999999999999999999 is too large", 2),
        (["--batch_size=1"], "--batch_size=1 must be at least 2", 2),
        (["--max_new_tokens=128"], "--max_new_tokens=128 leaves no room for a prompt in --block_size=128", 2),
        (["--bon_n=1000000"], "lower --bon_n or --n_eval", 2),
        ([f"--demos={tmp / 'eot.jsonl'}"], f"{tmp / 'eot.jsonl'} line 1: the prompt holds the text '<|endoftext|>'", 2),
        ([f"--init_from={tmp / 'weights'}"], "config.json is not a readable JSON file", 2),
        (["--task=hh", f"--data_dir={many}", "--block_size=24", "--max_new_tokens=20"],
         "--block_size=24 less --max_new_tokens=20 leaves 4 tokens for a prompt", 2),
        (["--task=hh", f"--data_dir={few}"], "not enough distinct prompts for the demo, rm", 2),
        (["--task=hh", f"--data_dir={tmp / 'hh_corrupt'}"], "its gunzipped content is not UTF-8 text (a corrupt file?)", 2),
    ]


@pytest.mark.slow
def test_mistakes_are_one_line_with_the_fix_and_change_no_file(reference, tmp_path, capsys):
    """train.cli as the command line calls it (in this process, for speed: an exception other than
    the exit would fail the test as a traceback would fail the command)."""
    out = tmp_path / "out"
    run_files = {f: (reference[0] / f).read_bytes() for f in files(reference[0])}
    out.mkdir()
    for name, content in run_files.items():  # a finished run the mistakes must not touch
        (out / name).write_bytes(content)
    for options, message, status in bad_inputs(tmp_path):
        with pytest.raises(SystemExit) as exit_:
            train.cli([*ARGS, f"--out_dir={out}", *options])
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == status, (options, lines)
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (options, lines)
        assert {f: (out / f).read_bytes() for f in files(out)} == run_files, options


def test_a_nan_names_its_cause_and_the_option_to_change(tmp_path):
    """The starting weights, the first batch, or a run that diverged (and its learning rate)."""
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(block_size=8, vocab_size=10, n_layer=1, n_head=1, n_embd=4))
    nan = torch.tensor(float("nan"))
    diverged = training.not_finite("rm_init_sft", "loss", nan, 7, 0, gpt, str(tmp_path / "none.pt"))
    assert diverged == "rm_init_sft: the loss became nan at step 7; training diverged: lower --rm_lr (or --grad_clip)"
    assert "lower --pretrain_lr" in training.not_finite("pi_init", "loss", nan, 3, 0, gpt, "x")
    assert "lower --pg_lr" in training.not_finite("policy_irft_stage0", "gradient norm", nan, 3, 0, gpt, "x")
    first = training.not_finite("pi_sft", "loss", nan, 0, 0, gpt, "x")
    assert "on the first batch, before any update" in first and "learning rate" in first.split(":")[-1]
    with torch.no_grad():
        gpt.transformer.h[0].mlp.c_fc.weight[0, 0] = float("inf")
    weights = training.not_finite("pi_sft", "loss", nan, 5, 5, gpt, "x")
    assert "the weights it starts from hold NaN or infinite values (transformer.h.0.mlp.c_fc.weight)" in weights
    assert "lower" not in weights


def test_a_checkpoint_with_nan_weights_is_refused(capsys):
    gpt = GPT(GPTConfig(block_size=8, vocab_size=3, n_layer=1, n_head=1, n_embd=4))
    vocab = types.SimpleNamespace(ids=[0, 1, 2])
    state = {"model": {k: v.clone() for k, v in gpt.state_dict().items()}, "model_config": asdict(gpt.config),
             "vocab": vocab.ids}
    checkpoint.load_weights(gpt, state, "ok.pt", vocab)  # fine as it is
    state["model"]["transformer.ln_f.weight"][0] = float("nan")
    with pytest.raises(SystemExit) as e:
        checkpoint.load_weights(gpt, state, "bad.pt", vocab)
    assert e.value.code == 2
    assert capsys.readouterr().err == ("error: bad.pt holds NaN or infinite weights (transformer.ln_f.weight); "
                                       "delete it and run again\n")


def test_files_in_the_out_dir_that_are_not_ours_are_refused_or_redone(tmp_path, capsys):
    torch.save(torch.zeros(3), tmp_path / "pi_init.pt")  # a safe file, but not a checkpoint
    with pytest.raises(SystemExit) as e:
        checkpoint.load_checkpoint(str(tmp_path / "pi_init.pt"))
    assert e.value.code == 2 and "holds a Tensor, not a checkpoint of this project; delete it" in capsys.readouterr().err
    (tmp_path / "results.json").write_text("[1, 2]")  # JSON, but not results: redone, not trusted
    cfg = cli.parse_args(["--preset=smoke", f"--out_dir={tmp_path}"])
    assert train.saved_results(cfg) is None


@pytest.mark.slow
@pytest.mark.parametrize("edit", ["a golden reward made 99", "a golden reward made NaN", "a key removed",
                                  "a number made a string", "cut short"])
def test_a_results_file_edited_after_the_run_is_redone_not_drawn(reference, tmp_path, capsys, edit):
    """results.json carries the digest of what the run wrote: a file edited or damaged since is not
    drawn into report.md (no verdict from a made-up value, no traceback); the rerun says so in one
    line, redoes the evaluation from the checkpoints and writes the reference's results again."""
    out = tmp_path / "out"
    shutil.copytree(reference[0], out)
    path = out / "results.json"
    results = json.loads(path.read_text())
    if edit == "a golden reward made 99":
        results["policies"][3]["golden_reward"] = 99.0
    elif edit == "a golden reward made NaN":
        results["policies"][3]["golden_reward"] = float("nan")
    elif edit == "a key removed":
        del results["best_of_n"]
    elif edit == "a number made a string":
        results["wall_time_s"] = "fast"
    text = json.dumps(results, indent=2)
    path.write_text(text[:len(text) // 2] if edit == "cut short" else text)
    train.main([*ARGS, f"--out_dir={out}"])
    logged = capsys.readouterr().out
    assert f"[evaluate] {path}: " in logged and "redoing the evaluation" in logged
    assert "[policy_irft_stage1] loaded" in logged  # the checkpoints, not the runs, are reused
    assert comparable(out) == comparable(reference[0])
    assert "99.000" not in (out / "report.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["report.md", "results.json"])
def test_an_output_path_that_is_a_folder_is_one_line_and_the_fix(reference, tmp_path, capsys, name):
    out = tmp_path / "out"
    shutil.copytree(reference[0], out)
    (out / name).unlink()
    (out / name).mkdir()
    with pytest.raises(SystemExit) as e:
        train.cli([*ARGS, f"--out_dir={out}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert f"{out / name} is a folder or special file, not a file the project wrote; move it away" in err
    assert (out / name).is_dir()


def test_atomic_write_refuses_a_folder_or_a_link_in_the_way(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "target").write_text("kept")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    for name, kind in [("folder", "folder"), ("link", "link")]:
        with pytest.raises(checkpoint.WriteError, match=f"it is a {kind}, not a file the project wrote; move it away"):
            checkpoint.atomic_write(str(tmp_path / name), lambda tmp: Path(tmp).write_text("new"))
    assert (tmp_path / "target").read_text() == "kept" and sorted(p.name for p in tmp_path.iterdir()) == \
        ["folder", "link", "target"]  # nothing written, no temporary file left


def test_demonstrations_holding_evaluation_prompts_stop_the_run_or_are_dropped(tmp_path, capsys):
    """--demos with two of the evaluation prompts (one twice): one line naming the count, the split, the
    file and the fix, before any work; with --drop_leaks=true the three rows are dropped and counted."""
    cfg = cli.parse_args(["--preset=smoke"])
    task = data.build_task(cfg.seed, cfg.n_pretrain, cfg.n_demo, cfg.n_rm, cfg.n_heldout, cfg.n_eval,
                                 cfg.multi_turn_prob, cfg.pref_noise_temp)
    rows = [(p, " Fine.") for p, _ in task.demos[:5]] + [(task.eval_prompts[0], " 7.")] * 2 + \
        [(task.eval_prompts[3], " No.")]
    demos = tmp_path / "demos.jsonl"
    demos.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in rows))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        train.cli(["--preset=smoke", "--device=cpu", f"--out_dir={out}", f"--demos={demos}"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert "2 training prompts are also held-out or evaluation prompts: 2 in the demonstrations split" in err
    assert f"(--demos={demos})" in err and "--drop_leaks=true" in err
    assert not out.exists() or not list(out.iterdir())
    cfg = cli.parse_args(["--preset=smoke", "--device=cpu", f"--out_dir={out}", f"--demos={demos}",
                            "--drop_leaks=true"])
    task, _, splits = train.stage_task(cfg)
    assert len(task.demos) == 5 and not set(p for p, _ in task.demos) & set(task.eval_prompts)
    assert "--drop_leaks: dropped 3 demonstrations rows" in capsys.readouterr().out


def test_one_run_per_out_dir_a_live_lock_refuses_a_stale_one_is_taken_over(tmp_path, capsys):
    lock = tmp_path / "run.lock"
    with checkpoint.out_dir_lock(str(tmp_path)):  # a run holds it while it runs, and removes it after
        assert lock.read_text().split() == [str(os.getpid())]
    assert not lock.exists()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # another process, alive: one line naming it, and its lock stays
        lock.write_text(f"{sleeper.pid}\n")
        with pytest.raises(SystemExit) as stop:
            train.cli(["--preset=smoke", "--device=cpu", f"--out_dir={tmp_path}"])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"another run (process {sleeper.pid}) is using --out_dir={tmp_path}" in err
        assert lock.read_text().split() == [str(sleeper.pid)] and sorted(os.listdir(tmp_path)) == ["run.lock"]
    finally:
        sleeper.kill()
        sleeper.wait()
    for stale in (f"{sleeper.pid}\n", "not a pid\n", ""):  # its process is gone, or the file says nothing
        lock.write_text(stale)
        with checkpoint.out_dir_lock(str(tmp_path)):
            assert lock.read_text().split() == [str(os.getpid())]
        assert not lock.exists()


def test_the_lock_is_released_when_the_run_fails_or_is_interrupted(tmp_path):
    for error in (KeyboardInterrupt, RuntimeError):
        with pytest.raises(error):
            with checkpoint.out_dir_lock(str(tmp_path)):
                raise error()
        assert not (tmp_path / "run.lock").exists()
