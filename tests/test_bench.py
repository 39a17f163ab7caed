"""tools/bench.py at a toy size: it runs, checks its own token counts, and writes the JSON the README's
Performance table comes from (no speed is asserted: timings belong to the benchmark, not the tests)."""
import json
import sys

import pytest

import bench

pytestmark = pytest.mark.slow  # runs the benchmark (against transformers when installed)

TINY = ["--sizes=1x64", "--reps=1", "--warmup=0", "--slow_reps=1", "--prompts=2", "--prompt_len=5",
        "--samples=3", "--new_tokens=4", "--batch=2", "--score_prompts=2", "--score_batch=4", "--seq_len=16",
        "--block_size=32", "--vocab_size=50", "--peak_n=256"]


def run_bench(tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench.json"
    monkeypatch.setattr(sys, "argv", ["bench.py", *TINY, f"--out={out}"])
    bench.main()
    return json.loads(out.read_text()), capsys.readouterr().out


def test_bench_against_transformers(tmp_path, monkeypatch, capsys):
    if bench.transformers is None:
        pytest.skip("needs transformers: pip install -r requirements-dev.txt")
    result, printed = run_bench(tmp_path, monkeypatch, capsys)
    size = result["results"][0]
    assert size["max_logit_diff"] < 1e-4  # the same weights on both sides
    assert set(size["sampling"]) == {"ours", "hf", "draws-ours", "draws-hf", "no-cache"}
    assert all(r["tokens"] == 2 * 3 * 4 and r["tok_per_s"] > 0 for r in size["sampling"].values())
    assert set(size["training"]) == {"ours", "hf"}
    assert all(0 < r["mfu"] for r in size["training"].values())
    assert set(size["scoring"]) == {"ours", "plain", "hf"}  # 2 prompts x 3 candidates, the same scores on every side
    assert all(r["tokens"] == 2 * 3 and r["tok_per_s"] > 0 and r["max_diff_vs_plain"] < 1e-4
               for r in size["scoring"].values())
    assert "| 1 x 64 (1 heads) |" in printed and "ours / HF" in printed and "ours / plain" in printed


def test_bench_without_transformers_measures_ours_only(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "transformers", None)
    result, printed = run_bench(tmp_path, monkeypatch, capsys)
    size = result["results"][0]
    assert set(size["sampling"]) == {"ours", "draws-ours", "no-cache"}
    assert set(size["training"]) == {"ours"}
    assert set(size["scoring"]) == {"ours", "plain"} and size["scoring"]["ours"]["max_diff_vs_plain"] < 1e-4
    assert "transformers is not installed" in printed
