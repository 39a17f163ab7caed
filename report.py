"""
A run's results as a reader sees them: the markdown tables (also printed at the end of a
run), report.md, and the plot of golden reward against KL (golden_vs_kl.png, with
matplotlib). train.py calls write_report when a run ends; nothing here changes a number.
"""
import json
import os
from pathlib import Path

from afd import kl_bound
from model import atomic_write


def write_text(text, path):
    """A text file, written atomically (model.atomic_write)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def markdown_tables(results):
    lines = ["| policy | golden reward | win rate vs SFT | KL to SFT |", "|---|---|---|---|"]
    for p in results["policies"]:
        kl = (f"{p['kl_to_sft']:.2f} ± {p['kl_to_sft_stderr']:.2f}" if "kl_to_sft" in p
              else "0" if p["name"] == "sft" else "-")
        lines.append(f"| {p['name']} | {p['golden_reward']:.3f} ± {p['golden_reward_stderr']:.3f} | "
                     f"{p['win_rate_vs_sft']:.3f} | {kl} |")
    lines += ["", "| reward model | held-out acc. (own data) | demo > SFT | chosen > rejected | "
              "golden order of SFT pairs |", "|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['heldout_accuracy']:.3f} | {r['acc_demo_vs_sft']:.3f} | "
              f"{r['acc_chosen_vs_rejected']:.3f} | {r['acc_golden_sft_pairs']:.3f} |"
              for r in results["reward_models"]]
    ns = sorted({b["n"] for b in results["best_of_n"]})
    if not ns:
        return "\n".join(lines)
    lines += ["", "Best-of-n golden reward (± standard error) by reward model:", "",
              "| reward model | " + " | ".join(f"n={n}" for n in ns) + " |",
              "|---|" + "---|" * len(ns)]
    for rm in dict.fromkeys(b["rm"] for b in results["best_of_n"]):
        cells = [f"{b['golden_reward']:.3f} ± {b['golden_reward_stderr']:.3f}"
                 for b in results["best_of_n"] if b["rm"] == rm]
        lines.append(f"| {rm} | " + " | ".join(cells) + " |")
    lines.append("| KL bound | " + " | ".join(f"{kl_bound(n):.2f}" for n in ns) + " |")
    return "\n".join(lines)


def curve_names(config):
    """The training runs of each trained method of a run's config, in order (their
    <name>.curve.jsonl files)."""
    runs = {"afd_adversarial": ["policy_afd_adversarial"], "rl_init_sft": ["policy_rl_init_sft"],
            "rl_ava_d": ["policy_rl_ava_d"],
            "irl_iterated": [f"policy_irl_iterated_round{k}" for k in range(config["irl_rounds"])],
            "irft": [f"policy_irft_stage{t}" for t in range(config["irft_stages"])]}
    return {m: runs[m] for m in config["methods"].split(",") if m in runs}


def mean(values):
    return sum(values) / len(values)


def curves_table(config, out_dir):
    """Markdown: each policy-training run's loss, reward, KL and discriminator accuracy, the
    mean of its first and of its last 10 steps."""
    lines = ["| method | run | steps | loss | reward | KL to reference | discriminator accuracy |",
             "|---|---|---|---|---|---|---|"]
    for method, names in curve_names(config).items():
        for name in names:
            with open(os.path.join(out_dir, f"{name}.curve.jsonl")) as f:
                curve = [json.loads(line) for line in f]
            cell = lambda key: (f"{mean([r[key] for r in curve[:10]]):.3f} -> "
                                f"{mean([r[key] for r in curve[-10:]]):.3f}" if key in curve[0] else "-")
            lines.append(f"| {method} | {name} | {len(curve)} | {cell('loss')} | {cell('reward')} | "
                         f"{cell('kl')} | {cell('disc_acc')} |")
    return "\n".join(lines)


def plot_golden_vs_kl(results, path):
    """Golden reward against KL to pi_sft: a Best-of-n curve per reward model (the KL bound)
    and a point per trained policy (Monte-Carlo KL). Needs matplotlib (optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[plot] matplotlib is not installed: skipping golden_vs_kl.png (pip install matplotlib)")
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for rm in dict.fromkeys(b["rm"] for b in results["best_of_n"]):
        rows = [b for b in results["best_of_n"] if b["rm"] == rm]
        ax.errorbar([b["kl_bound"] for b in rows], [b["golden_reward"] for b in rows],
                    yerr=[b["golden_reward_stderr"] for b in rows], marker=".", capsize=2, label=f"BoN {rm}")
    points = [p for p in results["policies"] if "kl_to_sft" in p or p["name"] == "sft"]
    for p, marker in zip(points, "s^vD<>ph*"):  # black markers: policies; colours: BoN curves
        ax.errorbar([p.get("kl_to_sft", 0.0)], [p["golden_reward"]], yerr=[p["golden_reward_stderr"]],
                    xerr=[p.get("kl_to_sft_stderr", 0.0)], marker=marker, color="k", linestyle="none",
                    capsize=2, label=p["name"])
    ax.set_xscale("symlog", linthresh=0.1)  # a hacked reward can drive the KL far past BoN's
    ax.set_xlabel("KL to pi_sft (nats, symlog axis; BoN: the bound log n - (n-1)/n)")
    ax.set_ylabel("golden reward")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return True


def write_report(results, examples, out_dir):
    """report.md (and golden_vs_kl.png) in out_dir from a run's results and sampled examples."""
    report = [f"# Results: preset `{results['preset']}`, seed {results['seed']}, device {results['device']}, "
              f"{results['wall_time_s']:.0f} s", ""]
    gold = results["golden_reward"]
    if gold["kind"] != "program":
        report += [f"The golden reward here is a **proxy**: a reward model trained on {gold['pairs']} preference "
                   f"pairs that no evaluated model saw (from {gold['init_from']}, held-out chosen > rejected "
                   f"accuracy {gold['heldout_accuracy']:.3f}), not human judgement.", ""]
    report += [markdown_tables(results), ""]
    if curve_names(results["config"]):
        report += ["## Policy training (first 10 steps -> last 10 steps)", "",
                   curves_table(results["config"], out_dir), ""]
    if plot_golden_vs_kl(results, os.path.join(out_dir, "golden_vs_kl.png")):
        report += ["![golden reward against KL](golden_vs_kl.png)", ""]
    report += ["## AVA-d per-token rewards (posterior mean and std of each response token's reward)", ""]
    for row in results["ava_token_rewards"]:
        report += [f"`{row['prompt']!r}` -> golden reward {row['golden_reward']:+.1f}, "
                   f"sum of means {row['sequence_reward']:+.2f}", "", "| token | mean | std |", "|---|---|---|"]
        report += [f"| `{text!r}` | {mu:+.2f} | {sigma:.2f} |" for text, mu, sigma in row["tokens"]] + [""]
    report += ["## Samples", ""]
    for name, rows in examples.items():
        report += [f"### {name}", ""] + [f"- `{p!r}` -> `{r!r}`" for p, r in rows] + [""]
    write_text("\n".join(report), os.path.join(out_dir, "report.md"))
