"""
The reward-model budget study, after Gao, Schulman and Hilton (2022), "Scaling Laws for Reward
Model Overoptimization": every reward model of the pipeline trained at several budgets (its
training steps and its samples per prompt, both times a factor), on the same pi_init and pi_sft,
each then used for Best-of-n on the same candidates; golden reward against the KL bound per
budget, beside the oracle (the golden reward as the scorer) and majority voting, and a fit of
Gao et al.'s form per curve:

    golden(n) - golden(1) = d (alpha - beta d),   d = sqrt(KL bound of n),
    peaking at d* = alpha / (2 beta), i.e. KL* = d*^2 (no peak within reach if beta <= 0).

    python tools/budget.py                                 # preset cpu, factors 1,4,16
    python tools/budget.py --factors=1,2 --preset=smoke    # any train.py option too
    python tools/budget.py --seed=1 --out_dir=out_budget

Each budget is a run of train.py (--methods=bon) in <out_dir>/x<factor>, with its stages and
caches: pi_init and pi_sft are trained once (in x1) and copied to the others, and a rerun loads
whatever is up to date. Writes budget_study.json, budget_study.md and budget_study.png in
--out_dir (default out_budget).
"""
import json
import math
import os
import shutil
import sys
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]  # the project, above tools/
sys.path.insert(0, str(ROOT))

import train  # noqa: E402  (after the sys.path line above)
from cli import die, parse_args  # noqa: E402
from parallel import log  # noqa: E402
from checkpoint import atomic_write  # noqa: E402
from report import write_text  # noqa: E402

SHARED = ["pi_init.pt", "pi_init.curve.jsonl", "pi_sft.pt", "pi_sft.curve.jsonl"]  # the same at every budget


def fit_gao(kl_bounds, gains):
    """Least squares of gains = d (alpha - beta d) on d = sqrt(kl): (alpha, beta, the KL of the
    peak or None if the curve does not clearly bend down). "Clearly": beta above 1e-6 of the
    data's own curvature scale, max |gain| / max d^2, so that a beta that is zero up to rounding
    (a straight line) never gives a peak, whatever the CPU."""
    d = np.sqrt(np.asarray(kl_bounds, dtype=float))
    gains = np.asarray(gains, dtype=float)
    (alpha, beta), *_ = np.linalg.lstsq(np.stack([d, -d ** 2], axis=1), gains, rcond=None)
    scale = np.abs(gains).max() / max(float((d ** 2).max()), 1e-12)
    return float(alpha), float(beta), (float((alpha / (2 * beta)) ** 2) if beta > 1e-6 * scale else None)


def budget_rows(results, factor):
    """One row per reward model (and oracle, majority) of a run: its Best-of-n curve and its fit."""
    bon = results["best_of_n"]
    base = next(b["golden_reward"] for b in bon if b["n"] == 1)
    rows = []
    for rm in dict.fromkeys(b["rm"] for b in bon):
        curve = [b for b in bon if b["rm"] == rm]
        alpha, beta, peak_kl = fit_gao([b["kl_bound"] for b in curve], [b["golden_reward"] - base for b in curve])
        best = max(curve, key=lambda b: b["golden_reward"])
        rows.append({"rm": rm, "factor": factor, "n": [b["n"] for b in curve],
                     "kl_bound": [b["kl_bound"] for b in curve], "golden_reward": [b["golden_reward"] for b in curve],
                     "golden_reward_stderr": [b["golden_reward_stderr"] for b in curve],
                     "alpha": alpha, "beta": beta, "peak_kl": peak_kl, "best_n": best["n"],
                     "best_golden_reward": best["golden_reward"]})
    return rows


def study_table(rows):
    lines = ["| reward model | budget | best n (golden reward) | fit alpha | fit beta | peak of the fit: KL (n) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        peak = ("none (no bend)" if r["peak_kl"] is None else f"{r['peak_kl']:.2f} (n ~ {peak_n(r['peak_kl'])})"
                + (", beyond the data" if r["peak_kl"] > max(r["kl_bound"]) else ""))
        lines.append(f"| {r['rm']} | x{r['factor']} | {r['best_n']} ({r['best_golden_reward']:.3f}) | "
                     f"{r['alpha']:+.3f} | {r['beta']:+.3f} | {peak} |")
    return "\n".join(lines)


def peak_n(kl):
    """The n whose KL bound log n - (n-1)/n is nearest to kl (2^k steps up to 2^12)."""
    return min((2 ** k for k in range(13)), key=lambda n: abs(math.log(n) - (n - 1) / n - kl))


def plot_study(rows, path, title):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[budget] matplotlib is not installed: no plot (pip install -r requirements.txt)")
        return False
    rms = [rm for rm in dict.fromkeys(r["rm"] for r in rows) if rm not in ("oracle", "majority")]
    cols = 3
    fig, axes = plt.subplots(math.ceil(len(rms) / cols), cols, figsize=(4 * cols, 3.2 * math.ceil(len(rms) / cols)),
                             sharex=True, sharey=True, squeeze=False)
    reference = {r["rm"]: r for r in rows if r["rm"] in ("oracle", "majority")}
    for ax, rm in zip(axes.flat, rms):
        for name, style in [("oracle", dict(color="k", linestyle="-.")), ("majority", dict(color="0.5", linestyle="--"))]:
            if name in reference:
                ax.plot(reference[name]["kl_bound"], reference[name]["golden_reward"], label=name, linewidth=1, **style)
        for r in [r for r in rows if r["rm"] == rm]:
            line = ax.errorbar(r["kl_bound"], r["golden_reward"], yerr=r["golden_reward_stderr"], marker=".",
                               capsize=2, linewidth=1, label=f"x{r['factor']}")
            base = r["golden_reward"][0]
            d = np.linspace(0, math.sqrt(max(r["kl_bound"])), 50)
            ax.plot(d ** 2, base + d * (r["alpha"] - r["beta"] * d), color=line[0].get_color(), linestyle=":",
                    linewidth=1)
        ax.set_title(rm, fontsize=9)
    for ax in axes.flat[len(rms):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("KL bound of Best-of-n (nats)")
    for ax in axes[:, 0]:
        ax.set_ylabel("golden reward")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title + " (dotted: the fit d (alpha - beta d))", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return True


def main(argv):
    factors = [1, 4, 16]
    if given := [a for a in argv if a.startswith("--factors")]:
        try:
            factors = [int(f) for f in given[-1].split("=", 1)[1].split(",")]
            assert factors and all(f >= 1 for f in factors)
        except (IndexError, ValueError, AssertionError):
            die(f"{given[-1]!r}: give --factors=1,4,16 (whole numbers >= 1)")
    argv = [a for a in argv if not a.startswith("--factors")]
    cfg = parse_args(argv)  # the base config, validated once
    out_dir = cfg.out_dir if any(a.startswith("--out_dir") for a in argv) else "out_budget"
    rows = []
    for factor in factors:
        run_dir = os.path.join(out_dir, f"x{factor}")
        os.makedirs(run_dir, exist_ok=True)
        first = os.path.join(out_dir, f"x{factors[0]}")
        for name in SHARED:  # pi_init and pi_sft do not depend on the reward-model budget
            if run_dir != first and os.path.exists(os.path.join(first, name)) and \
                    not os.path.exists(os.path.join(run_dir, name)):
                atomic_write(os.path.join(run_dir, name), partial(shutil.copyfile, os.path.join(first, name)))
        log(f"[budget] x{factor}: rm_steps {cfg.rm_steps * factor}, n_rm_samples {cfg.n_rm_samples * factor}")
        results = train.main(argv + [f"--out_dir={run_dir}", "--methods=bon", f"--rm_steps={cfg.rm_steps * factor}",
                                     f"--n_rm_samples={cfg.n_rm_samples * factor}"],
                             host_fix=f"lower --factors (x{factor} makes --n_rm_samples {cfg.n_rm_samples * factor}), "
                                      f"or --bon_n or --n_eval")
        rows += [r for r in budget_rows(results, factor)  # the same candidates: one oracle, one majority
                 if factor == factors[0] or r["rm"] not in ("oracle", "majority")]
    rows.sort(key=lambda r: (r["rm"] in ("oracle", "majority"), r["rm"], r["factor"]))
    title = f"Reward-model budget study: preset {cfg.preset}, seed {cfg.seed}"
    write_text(json.dumps({"factors": factors, "config": asdict(cfg), "rows": rows}, indent=2),
               os.path.join(out_dir, "budget_study.json"))
    drawn = plot_study(rows, os.path.join(out_dir, "budget_study.png"), title)
    write_text("\n".join([f"# {title}", "", f"Budgets: x{', x'.join(map(str, factors))} of the preset's "
                          f"rm_steps ({cfg.rm_steps}) and n_rm_samples ({cfg.n_rm_samples}).", "",
                          study_table(rows), ""] + (["![budget study](budget_study.png)", ""] if drawn else [])),
               os.path.join(out_dir, "budget_study.md"))
    print(study_table(rows))
    print(f"[budget] wrote {out_dir}/budget_study.json, budget_study.md" + (", budget_study.png" if drawn else ""))


if __name__ == "__main__":
    train.cli(sys.argv[1:], main)
