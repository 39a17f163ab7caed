"""The command line and one end-to-end run of the whole pipeline (--preset=smoke)."""
import gzip
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
HH_FIXTURE = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-sample.jsonl.gz"
pytestmark = pytest.mark.slow  # each test runs train.py end to end


def test_smoke_pipeline_writes_valid_results(run, tmp_path):
    out = tmp_path / "out"
    proc = run("--preset=smoke", f"--out_dir={out}", "--device=cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert (results["preset"], results["seed"], results["device"], results["task"]) == ("smoke", 0, "cpu", "synthetic")
    names = [p["name"] for p in results["policies"]]
    assert names == ["init", "sft", "demonstrations", "afd_adversarial", "irl_iterated", "irft", "rl_init_sft",
                     "rl_ava_d", "ava_d_direct"]
    for p in results["policies"][3:]:  # the trained policies: a Monte-Carlo KL to pi_sft, not below 0 by 3 SE
        assert p["kl_to_sft_stderr"] > 0 and p["kl_to_sft"] > -3 * p["kl_to_sft_stderr"]
    for name in ["policy_afd_adversarial", "policy_irl_iterated_round0", "policy_irl_iterated_round1",
                 "policy_irft_stage0", "policy_irft_stage1", "policy_rl_init_sft", "policy_rl_ava_d",
                 "policy_ava_d_direct"]:
        curve = [json.loads(line) for line in (out / f"{name}.curve.jsonl").read_text().splitlines()]
        assert curve and all(math.isfinite(r["loss"]) for r in curve)
        assert ("disc_acc" in curve[0]) == (name == "policy_afd_adversarial")
        assert ("reward" in curve[0]) == ("irft" not in name and "ava_d_direct" not in name)
    for k in (0, 1):  # iterated IRL's reward model, one run per round
        assert all((out / f"rm_irl_iterated_round{k}{ext}").exists() for ext in (".pt", ".curve.jsonl"))
    for p in results["policies"]:  # sampled responses vary; the demonstrator's do not
        assert math.isfinite(p["golden_reward"]) and (p["golden_reward_stderr"] > 0) == (p["name"] != "demonstrations")
    win = {p["name"]: p["win_rate_vs_sft"] for p in results["policies"]}
    assert win["sft"] == 0.5  # every response ties with itself
    assert results["policies"][2]["golden_reward"] == 2.5 and win["demonstrations"] > 0.9  # the demonstrator is right
    assert not (out / "run.lock").exists()  # one run per out dir: the lock goes with the run
    assert results["golden_reward"]["kind"] == "program"
    assert [r["name"] for r in results["reward_models"]] == ["init_sft", "init_demo", "sft_demo", "pref", "logratio",
                                                             "ava_d", "ava_p"]
    accuracy = {r["name"]: r for r in results["reward_models"]}  # above chance where smoke trains enough (0.75-0.9 here)
    assert all(accuracy[name]["heldout_accuracy"] >= 0.6 for name in ("init_sft", "init_demo", "sft_demo"))
    assert accuracy["logratio"]["acc_demo_vs_sft"] >= 0.6
    bon = results["best_of_n"]
    selectors = names_of(results) + ["oracle", "majority"] + [f"weighted_{rm}" for rm in names_of(results)]
    assert {(b["rm"], b["n"]) for b in bon} == {(rm, n) for rm in selectors for n in (1, 2, 4, 8)}
    n1 = {b["golden_reward"] for b in bon if b["n"] == 1}
    assert max(n1) - min(n1) < 1e-9  # best-of-1 is the mean of the candidates, whatever the selector
    assert all(b["kl_bound"] == (math.log(b["n"]) if b["rm"] == "majority" or b["rm"].startswith("weighted_")
                                 else math.log(b["n"]) - (b["n"] - 1) / b["n"]) for b in bon)
    oracle = {b["n"]: b["golden_reward"] for b in bon if b["rm"] == "oracle"}
    assert all(b["golden_reward"] <= oracle[b["n"]] + 1e-9 for b in bon if b["rm"] in names_of(results))
    for b in bon:  # the parts of the golden reward add up to it; every kind of prompt is there
        assert sum(b["parts"].values()) == pytest.approx(b["golden_reward"], abs=1e-6)  # float32 sums
        assert set(b["kinds"]) <= {"arithmetic", "fact", "list", "name", "harmful", "benign look-alike"}
        assert ("share_of_ceiling" in b) == (b["n"] > 1 and b["rm"] != "oracle")
    for name in ["pi_init", "pi_sft", "rm_init_sft", "rm_pref", "rm_ava_d", "rm_ava_p"]:
        ckpt = torch.load(out / f"{name}.pt", weights_only=True)
        assert {"model", "model_config", "vocab"} <= set(ckpt)
    # AVA's intermediate rewards: two evaluation responses, one (mean, std) per response token
    shown = results["ava_token_rewards"]
    assert len(shown) == 2 and shown[0]["golden_reward"] > shown[1]["golden_reward"]
    for row in shown:
        assert "".join(text for text, _, _ in row["tokens"]) == row["response"]
        assert all(sigma > 0 for _, _, sigma in row["tokens"])
        assert abs(sum(mu for _, mu, _ in row["tokens"]) - row["sequence_reward"]) < 1e-4
    report = (out / "report.md").read_text()
    assert "| policy |" in report and "## Samples" in report and "## Policy training" in report
    assert "## AVA-d per-token rewards" in report and "| token | mean | std |" in report
    # a report that teaches: how to read it, the command that reruns it, a verdict on every row
    assert report.index("## How to read this report") < report.index("| policy |")
    assert "python train.py --preset=smoke --seed=0" in report and "--bon_n=8" in report
    rows = [line for line in report.splitlines() if line.startswith("| ") and " ± " in line
            and not line.startswith(("| sft |", "| demonstrations |"))]
    assert len(rows) == len(names) - 2 + len(bon)  # every policy but SFT, every Best-of-n entry
    assert all(any(v in row for v in ("| better |", "| worse |", "| no clear difference |")) for row in rows)
    assert "> **Human:**" in report and "\\n\\nHuman" not in report  # prompts as dialogue, not reprs
    assert "- pi_sft: trained 15 steps: loss" in report and "- policy_irft_stage1: trained" in report
    # a log that fits a file: stage lines, no progress-bar redraws
    assert "\r" not in proc.stderr and len(proc.stdout) + len(proc.stderr) < 12_000
    assert "[pi_sft] trained 15 steps: loss" in proc.stdout
    # where the time went: every stage, each reward model and method, each scorer of the candidates
    times = results["stage_times"]
    assert list(times)[:4] == ["task", "pretrain", "sft", "sample"]
    assert {"rm/pref", "rm/ava_p", "policy/irft", "policy/rl_ava_d", "evaluate/score logratio",
            "evaluate/sample candidates"} <= set(times)
    assert sum(times[k] for k in times if "/" not in k) <= results["wall_time_s"]
    assert times["policy"] >= sum(times[k] for k in times if k.startswith("policy/")) - 1e-6
    assert "## Where the time went" in report and "Wall time by stage:" in proc.stdout
    if importlib.util.find_spec("matplotlib"):  # in requirements.txt; the plot is skipped without it
        assert (out / "golden_vs_kl.png").stat().st_size > 10_000
    else:
        assert "matplotlib is not installed" in proc.stdout


def test_methods_option_picks_the_methods(run, tmp_path):
    out = tmp_path / "out"
    proc = run("--preset=smoke", f"--out_dir={out}", "--device=cpu", "--methods=irft")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert [p["name"] for p in results["policies"]] == ["init", "sft", "demonstrations", "irft"]
    assert results["best_of_n"] == []
    proc = run("--preset=smoke", f"--out_dir={out}", "--methods=bon,ppo")
    assert proc.returncode == 2 and "--methods: unknown 'ppo'" in proc.stderr


def names_of(results):
    return [r["name"] for r in results["reward_models"]]


def test_unknown_option_and_bad_value_are_one_clear_error(run, tmp_path):
    proc = run("--presett=smoke")
    assert proc.returncode == 2 and "unknown option --presett" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run("--preset=smoke", "--n_layer=two")
    assert proc.returncode == 2 and "--n_layer='two' is not a valid int" in proc.stderr
    proc = run("--preset=smoke", "--bon_n=0")
    assert proc.returncode == 2 and "--bon_n=0 must be at least 1" in proc.stderr
    proc = run("--preset=huge")
    assert proc.returncode == 2 and "unknown preset 'huge'" in proc.stderr
    proc = run("--preset=smoke", "--task=hh")
    assert proc.returncode == 2 and "--task=hh needs --data_dir=DIR" in proc.stderr
    proc = run("--preset=smoke", "--task=hh", f"--data_dir={tmp_path / 'nowhere'}", f"--out_dir={tmp_path / 'o'}")
    assert proc.returncode == 2 and "HH-RLHF data not found" in proc.stderr and "hh-rlhf" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run("--preset=smoke", f"--init_from={tmp_path / 'no.safetensors'}", f"--out_dir={tmp_path / 'o'}")
    assert proc.returncode == 2 and "--init_from=" in proc.stderr and "Traceback" not in proc.stderr
    proc = run("--preset=smoke", "--device=cuda") if not torch.cuda.is_available() else None
    if proc is not None:
        assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr


def test_hh_smoke_runs_the_whole_pipeline_on_the_fixture(run, tmp_path):
    if not HH_FIXTURE.exists():
        pytest.skip(f"needs the HH-RLHF sample {HH_FIXTURE}, outside the repository (the first 300 "
                    "dialogues of Anthropic HH-RLHF harmless-base/test.jsonl.gz, in ../shared beside the project)")
    lines = gzip.open(HH_FIXTURE, "rt", encoding="utf-8").read().splitlines(keepends=True)
    data_dir = tmp_path / "hh" / "harmless-base"
    data_dir.mkdir(parents=True)
    (data_dir / "train.jsonl").write_text("".join(lines[:200]))  # plain and gzipped, as published
    with gzip.open(data_dir / "test.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(lines[200:]))
    out = tmp_path / "out"
    proc = run("--task=hh", f"--data_dir={tmp_path / 'hh'}", "--preset=smoke", f"--out_dir={out}", "--device=cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "train: hh-rlhf: 200 pairs read, 1 skipped (0 prompt mismatch, 1 empty), 199 kept" in proc.stdout
    assert "test: hh-rlhf: 100 pairs read" in proc.stdout
    assert "prompts lost their earliest turns" in proc.stdout  # long dialogues are counted, not dropped
    assert "[gold] the golden reward is a proxy" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "hh"
    assert [p["name"] for p in results["policies"]][:3] == ["init", "sft", "demonstrations"]
    assert len(results["policies"]) == 9 and len(results["reward_models"]) == 7  # and the 6 trained methods
    assert all(math.isfinite(p["golden_reward"]) for p in results["policies"])
    assert {b["rm"] for b in results["best_of_n"]} == set(names_of(results)) | {"oracle", "majority"} | {
        f"weighted_{rm}" for rm in names_of(results)}
    assert results["golden_reward"]["kind"] == "gold reward model (a proxy)"
    assert "a **proxy**" in (out / "report.md").read_text()
    gold = torch.load(out / "rm_gold.pt", weights_only=True)
    assert gold["stage_config"]["gold_rm_steps"] == 10


def test_init_from_gpt2_safetensors_runs_the_pipeline(run, tmp_path):
    """--init_from=PATH/model.safetensors: pi_init is the given GPT-2 (the full 50257-token
    vocabulary), no pre-training; here a tiny random one in the Hugging Face layout."""
    from model import GPT, GPTConfig
    from test_gpt2_import import hf_layout, write_safetensors
    torch.manual_seed(0)
    tiny = GPT(GPTConfig(block_size=128, vocab_size=50257, n_layer=1, n_head=2, n_embd=16, gelu="tanh"))
    folder = tmp_path / "tiny-gpt2"
    folder.mkdir()
    write_safetensors(folder / "model.safetensors", hf_layout(tiny))
    (folder / "config.json").write_text(json.dumps({"n_head": 2, "n_positions": 128}))
    out = tmp_path / "out"
    proc = run("--preset=smoke", f"--init_from={folder / 'model.safetensors'}", f"--out_dir={out}",
               "--device=cpu", "--methods=irft", "--sft_steps=3", "--rm_steps=2", "--pg_steps=2", "--n_rm=8",
               "--n_heldout=8", "--n_eval=8", "--max_new_tokens=8", "--n_round_samples=4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "pi_init = " in proc.stdout and "vocabulary 50257 of 50257" in proc.stdout
    assert not (out / "pi_init.pt").exists()  # no pre-training
    sft = torch.load(out / "pi_sft.pt", weights_only=True)
    assert sft["model_config"]["n_embd"] == 16 and sft["model_config"]["gelu"] == "tanh"
    assert len(sft["vocab"]) == 50257
    results = json.loads((out / "results.json").read_text())
    assert [p["name"] for p in results["policies"]] == ["init", "sft", "demonstrations", "irft"]
