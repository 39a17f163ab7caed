"""The command line and one end-to-end run of the whole pipeline (--preset=smoke)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_smoke_pipeline_writes_valid_results(tmp_path):
    out = tmp_path / "out"
    proc = run("--preset=smoke", f"--out_dir={out}", "--device=cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert (results["preset"], results["seed"], results["device"], results["task"]) == ("smoke", 0, "cpu", "synthetic")
    names = [p["name"] for p in results["policies"]]
    assert names == ["init", "sft", "demonstrations", "afd_adversarial", "irl_iterated", "irft", "rl_init_sft",
                     "rl_ava_d"]
    for p in results["policies"][3:]:  # the trained policies: a Monte-Carlo KL to pi_sft
        assert math.isfinite(p["kl_to_sft"]) and p["kl_to_sft_stderr"] >= 0
    for name in ["policy_adversarial", "policy_irl0", "policy_irl1", "policy_irft0", "policy_irft1", "policy_rl_init_sft",
                 "policy_rl_ava_d"]:
        curve = [json.loads(line) for line in (out / f"{name}.curve.jsonl").read_text().splitlines()]
        assert curve and all(math.isfinite(r["loss"]) for r in curve)
        assert ("disc_acc" in curve[0]) == (name == "policy_adversarial")
        assert ("reward" in curve[0]) == ("irft" not in name)
    for p in results["policies"]:
        assert math.isfinite(p["golden_reward"]) and p["golden_reward_stderr"] >= 0
        assert 0 <= p["win_rate_vs_sft"] <= 1
    assert results["policies"][2]["golden_reward"] == 2.5  # the demonstrator is always right
    assert [r["name"] for r in results["reward_models"]] == ["init_sft", "init_demo", "sft_demo", "pref", "logratio",
                                                             "ava_d", "ava_p"]
    assert all(0 <= r["heldout_accuracy"] <= 1 for r in results["reward_models"])
    bon = results["best_of_n"]
    assert {(b["rm"], b["n"]) for b in bon} == {(rm, n) for rm in names_of(results) for n in (1, 2, 4, 8)}
    n1 = {b["golden_reward"] for b in bon if b["n"] == 1}
    assert max(n1) - min(n1) < 1e-9  # best-of-1 is the mean of the candidates, whatever the RM
    assert all(b["kl_bound"] == math.log(b["n"]) - (b["n"] - 1) / b["n"] for b in bon)
    for name in ["pi_init", "pi_sft", "rm_init_sft", "rm_pref", "rm_ava_d", "rm_ava_p"]:
        ckpt = torch.load(out / f"{name}.pt", weights_only=True)
        assert {"model", "model_config", "vocab"} <= set(ckpt)
    # AVA's intermediate rewards: two evaluation responses, one (mean, std) per response token
    shown = results["ava_token_rewards"]
    assert len(shown) == 2 and {row["golden_reward"] >= 2 for row in shown} == {True, False}
    for row in shown:
        assert "".join(text for text, _, _ in row["tokens"]) == row["response"]
        assert all(sigma > 0 for _, _, sigma in row["tokens"])
        assert abs(sum(mu for _, mu, _ in row["tokens"]) - row["sequence_reward"]) < 1e-4
    report = (out / "report.md").read_text()
    assert "| policy |" in report and "## Samples" in report and "## Policy training" in report
    assert "## AVA-d per-token rewards" in report and "| token | mean | std |" in report


def test_methods_option_picks_the_methods(tmp_path):
    out = tmp_path / "out"
    proc = run("--preset=smoke", f"--out_dir={out}", "--device=cpu", "--methods=irft")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert [p["name"] for p in results["policies"]] == ["init", "sft", "demonstrations", "irft"]
    assert results["best_of_n"] == []
    proc = run("--preset=smoke", f"--out_dir={out}", "--methods=bon,ppo")
    assert proc.returncode == 2 and "--methods: unknown ppo" in proc.stderr


def names_of(results):
    return [r["name"] for r in results["reward_models"]]


def test_unknown_option_and_bad_value_are_one_clear_error(tmp_path):
    proc = run("--presett=smoke")
    assert proc.returncode == 2 and "unknown option --presett" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run("--preset=smoke", "--n_layer=two")
    assert proc.returncode == 2 and "--n_layer='two' is not a valid int" in proc.stderr
    proc = run("--preset=smoke", "--bon_n=0")
    assert proc.returncode == 2 and "--bon_n=0 must be at least 1" in proc.stderr
    proc = run("--preset=huge")
    assert proc.returncode == 2 and "unknown preset 'huge'" in proc.stderr
    proc = run("--preset=smoke", "--device=cuda") if not torch.cuda.is_available() else None
    if proc is not None:
        assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr
