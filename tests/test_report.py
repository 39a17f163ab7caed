"""What a reader sees: report.md's verdicts, dialogues and rerun command, and progress in a log file."""
import dataclasses
import io
import shlex
import sys

import pytest

import checkpoint
import cli
import parallel
import report

SFT = {"name": "sft", "golden_reward": 1.0, "golden_reward_stderr": 0.3}


@pytest.mark.parametrize("value, stderr, z, verdict", [
    (2.0, 0.4, 2.0, "better"),                  # (2.0 - 1.0) / sqrt(0.4^2 + 0.3^2) = 1 / 0.5
    (0.0, 0.4, -2.0, "worse"),
    (1.9, 0.4, 1.8, "no clear difference"),     # 0.9 / 0.5
])
def test_verdict_is_the_difference_in_standard_errors_at_two(value, stderr, z, verdict):
    got_z, got_verdict = report.difference_from_sft(value, stderr, SFT)
    assert got_z == pytest.approx(z) and got_verdict == verdict


def test_a_prompt_is_shown_as_a_dialogue():
    prompt = "\n\nHuman: Hi, my name is Rosa.\n\nAssistant: Hello Rosa!\n\nHuman: What is my name?\n\nAssistant:"
    assert report.dialogue(prompt, " Rosa.<|endoftext|>").splitlines() == [
        "> **Human:** Hi, my name is Rosa.  ", "> **Assistant:** Hello Rosa!  ",
        "> **Human:** What is my name?  ", "> **Assistant:** Rosa. [end of text]  "]


def test_the_rerun_command_parses_back_to_the_same_config():
    cfg = cli.Config(preset="smoke", seed=3, demos="my demos.jsonl", bf16=False, methods="bon,irft")
    command = report.config_command(dataclasses.asdict(cfg))
    argv = shlex.split(command.replace("\\\n", " "))[2:]  # as a shell reads it, after "python train.py"
    parsed = cli.parse_args(argv + ["--device=cpu", f"--out_dir={cfg.out_dir}"])
    assert {k: v for k, v in dataclasses.asdict(parsed).items() if k != "device"} == \
        {k: v for k, v in dataclasses.asdict(cfg).items() if k != "device"}


def test_progress_in_a_log_file_is_a_line_at_an_interval_not_a_redraw(monkeypatch):
    err = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(parallel, "PROGRESS_EVERY", 0.0)  # a line after every step
    bar = parallel.progress(range(3), desc="pi_sft", total=3)
    for step in bar:
        bar.set_postfix(loss=f"{step:.3f}")
    assert err.getvalue().splitlines()[0].startswith("[pi_sft] 1/3 (33%), loss=0.000, ")
    assert len(err.getvalue().splitlines()) == 3 and "\r" not in err.getvalue()
    err.truncate(0)
    monkeypatch.setattr(parallel, "PROGRESS_EVERY", 3600.0)
    assert list(parallel.progress(range(5), desc="quiet")) == list(range(5)) and err.getvalue() == ""


def test_stage_time_table_lists_stages_their_parts_and_the_rest():
    results = {"wall_time_s": 100.0, "stage_times": {"task": 5.0, "rm": 40.0, "rm/pref": 10.0, "rm/ava_p": 20.0,
                                                      "evaluate": 50.0}}
    lines = report.stage_time_table(results).splitlines()
    assert lines[2:] == ["| task | | 5.0 | 5.0% |", "| rm | | 40.0 | 40.0% |", "| | pref | 10.0 | 10.0% |",
                         "| | ava_p | 20.0 | 20.0% |", "| | (rest) | 10.0 | 10.0% |", "| evaluate | | 50.0 | 50.0% |",
                         "| (outside the stages) | | 5.0 | 5.0% |", "| **total** | | 100.0 | 100% |"]
    assert report.stage_time_table({"wall_time_s": 1.0}) == ""  # a results.json from before the table


def test_timed_adds_up_the_time_of_each_block(monkeypatch):
    clock = iter([10.0, 12.5, 20.0, 21.0])
    monkeypatch.setattr(checkpoint.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(checkpoint, "STAGE_TIMES", {})
    for _ in range(2):
        with checkpoint.timed("rm/pref"):
            pass
    assert checkpoint.STAGE_TIMES == {"rm/pref": 3.5}


def fake_run(seed, sft, method, method_se, init_sft_bon, majority_bon):
    """A results.json of a run with one trained method, two reward models' Best-of-n rows skipped but one."""
    policy = lambda name, g, se, **kw: {"name": name, "golden_reward": g, "golden_reward_stderr": se, **kw}
    bon = [{"rm": rm, "n": n, "golden_reward": g, "golden_reward_stderr": 0.1, **({"share_of_ceiling": s} if n > 1 else {})}
           for rm, rows in [("init_sft", init_sft_bon), ("majority", majority_bon), ("oracle", [(1.0, None), (2.0, None)])]
           for n, (g, s) in zip((1, 2), rows)]
    for b in bon:
        if b["rm"] == "oracle":
            b.pop("share_of_ceiling", None)
    rm = {"name": "init_sft", "heldout_accuracy": 0.8, "acc_demo_vs_sft": 0.5 + seed / 10, "acc_golden_sft_pairs": 0.6}
    return {"seed": seed, "policies": [policy("sft", sft, 0.1), policy("demonstrations", 2.5, 0.0),
                                       policy("m", method, method_se, kl_to_sft=0.25)],
            "reward_models": [rm], "best_of_n": bon}


def test_seed_tables_give_each_seed_and_the_mean_and_standard_error_over_seeds():
    runs = {0: fake_run(0, 1.0, 1.5, 0.1, [(1.0, None), (1.2, 0.2)], [(1.0, None), (0.9, -0.1)]),
            1: fake_run(1, 1.2, 1.1, 0.2, [(1.0, None), (1.3, 0.3)], [(1.0, None), (1.1, 0.1)])}
    text = report.seed_tables(runs)
    # seed 0: m is (1.5 - 1.0) / sqrt(0.1^2 + 0.1^2) = +3.5 SE from SFT; seed 1: -0.1 / sqrt(0.05) = -0.4 SE
    assert "| 0 | 1.000 ± 0.100 | 1.500 ± 0.100 (+3.5 SE, KL 0.25) |" in text
    assert "| 1 | 1.200 ± 0.200 | 1.100 ± 0.200 (-0.4 SE, KL 0.25) |" not in text  # sft's stderr is 0.1
    assert "| 1 | 1.200 ± 0.100 | 1.100 ± 0.200 (-0.4 SE, KL 0.25) |" in text
    # over the seeds: m's mean 1.3, standard error |1.5 - 1.1| / 2 = 0.2; SFT's 1.1 ± 0.1
    assert "| mean ± SE over 2 seeds | 1.100 ± 0.100 | 1.300 ± 0.200 |" in text
    assert "| - | +0.200; 1 / 1 / 0 |" in text  # mean difference (0.5 - 0.1) / 2; better on one seed
    assert "| 0 | 0.800 / 0.500 / 0.600 |" in text and "| mean over the seeds | 0.800 / 0.550 / 0.600 |" in text
    assert "| init_sft | 1.000 ± 0.000 | 1.250 ± 0.050 |" in text
    # peaks: init_sft at n = 2 on both seeds, +0.2 over n = 1 in SE of 0.1 = +2.0; majority at n = 1 then n = 2
    assert "| 0 | 2: +0.20 (+2.0 SE) | 1: +0.00 (+0.0 SE) |" in text
    assert "| 1 | 2: +0.30 (+3.0 SE) | 2: +0.10 (+1.0 SE) |" in text


def test_vote_tables_compare_each_selector_with_majority_and_the_demonstrator_seed_by_seed():
    """Two seeds: init_sft at n = 2 is 1.2 and 1.3 against majority's 0.9 and 1.1 (SE 0.1 each): +0.3 /
    +0.2, i.e. +2.1 and +1.4 SE: above majority in one seed. The demonstrator scores 2.5 ± 0 here, so
    the method m (1.5, 1.1) is below it in both."""
    runs = {(0.3, 0): fake_run(0, 1.0, 1.5, 0.1, [(1.0, None), (1.2, 0.2)], [(1.0, None), (0.9, -0.1)]),
            (0.3, 1): fake_run(1, 1.2, 1.1, 0.2, [(1.0, None), (1.3, 0.3)], [(1.0, None), (1.1, 0.1)])}
    text = report.vote_tables(runs)
    assert "`--demo_error=0.3`, seeds 0, 1:" in text
    assert "| init_sft | 1.250 [+0.25] (+0.250; 1/0) |" in text
    assert "| majority | 1.000 [+0.00] |" in text
    assert "| m | -1.200 | 0 / 2 |" in text and "| oracle, n=2 | -0.500 | 0 / 2 |" in text
