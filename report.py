"""
A run's results as a reader sees them: the markdown tables (also printed at the end of a
run), report.md, and the plot of golden reward against KL (golden_vs_kl.png, with
matplotlib). train.py calls write_report when a run ends, and again on every rerun (from
results.json alone, so an edit here redraws the report without redoing any stage); nothing
here changes a number.
"""
import hashlib
import json
import math
import os
import re
import shlex
from pathlib import Path

from data import EOT
from checkpoint import atomic_write


def write_text(text, path):
    """A text file, written atomically (checkpoint.atomic_write)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def rm_table(results):
    """Markdown: each reward model's held-out accuracies."""
    lines = ["| reward model | held-out acc. (own data) | demo > SFT | chosen > rejected | "
             "golden order of SFT pairs |", "|---|---|---|---|---|"]
    return "\n".join(lines + [f"| {r['name']} | {r['heldout_accuracy']:.3f} | {r['acc_demo_vs_sft']:.3f} | "
                               f"{r['acc_chosen_vs_rejected']:.3f} | {r['acc_golden_sft_pairs']:.3f} |"
                               for r in results["reward_models"]])


def stage_time_table(results):
    """Markdown: the run's wall time by stage, each stage's parts (a reward model, a method, the
    scoring of one reward model's candidates, ...) under it, then the rest of the stage (work
    outside its timed parts), with their shares of the whole run; "" for a run without them."""
    times, total = results.get("stage_times"), results["wall_time_s"]
    if not times:
        return ""
    share = lambda s: f"{100 * s / max(total, 1e-9):.1f}%"
    lines = ["| stage | part | seconds | share of the run |", "|---|---|---:|---:|"]
    for stage in [name for name in times if "/" not in name]:
        parts = {name.split("/", 1)[1]: s for name, s in times.items() if name.startswith(stage + "/")}
        lines.append(f"| {stage} | | {times[stage]:.1f} | {share(times[stage])} |")
        lines += [f"| | {part} | {s:.1f} | {share(s)} |" for part, s in parts.items()]
        if parts:
            rest = times[stage] - sum(parts.values())
            lines.append(f"| | (rest) | {rest:.1f} | {share(rest)} |")
    rest = total - sum(s for name, s in times.items() if "/" not in name)
    lines += [f"| (outside the stages) | | {rest:.1f} | {share(rest)} |", f"| **total** | | {total:.1f} | 100% |"]
    return "\n".join(lines)


def markdown_tables(results):
    """The tables printed at the end of a run: policies, reward models, Best-of-n by n, and where
    the time went (stage_time_table)."""
    lines = ["| policy | golden reward | win rate vs SFT | KL to SFT |", "|---|---|---|---|"]
    for p in results["policies"]:
        kl = (f"{p['kl_to_sft']:.2f} ± {p['kl_to_sft_stderr']:.2f}" if "kl_to_sft" in p
              else "0" if p["name"] == "sft" else "-")
        lines.append(f"| {p['name']} | {p['golden_reward']:.3f} ± {p['golden_reward_stderr']:.3f} | "
                     f"{p['win_rate_vs_sft']:.3f} | {kl} |")
    lines += ["", rm_table(results)]
    if ns := sorted({b["n"] for b in results["best_of_n"]}):
        lines += ["", "Best-of-n golden reward (± standard error) by reward model:", "",
                  "| reward model | " + " | ".join(f"n={n}" for n in ns) + " |",
                  "|---|" + "---|" * len(ns)]
        for rm in dict.fromkeys(b["rm"] for b in results["best_of_n"]):
            cells = [f"{b['golden_reward']:.3f} ± {b['golden_reward_stderr']:.3f}"
                     for b in results["best_of_n"] if b["rm"] == rm]
            lines.append(f"| {rm} | " + " | ".join(cells) + " |")
        first = results["best_of_n"][0]["rm"]  # a reward model: its rows carry KL(pi_BoN || pi_sft)'s bound
        lines.append("| KL bound | " + " | ".join(f"{b['kl_bound']:.2f}" for b in results["best_of_n"]
                                                  if b["rm"] == first) + " |")
    if times := stage_time_table(results):
        lines += ["", "Wall time by stage:", "", times]
    return "\n".join(lines)


def curve_names(config):
    """The training runs of each trained method of a run's config, in order (their
    <name>.curve.jsonl files)."""
    runs = {"afd_adversarial": ["policy_afd_adversarial"], "rl_init_sft": ["policy_rl_init_sft"],
            "rl_ava_d": ["policy_rl_ava_d"], "ava_d_direct": ["policy_ava_d_direct"],
            "irl_iterated": [f"policy_irl_iterated_round{k}" for k in range(config["irl_rounds"])],
            "irft": [f"policy_irft_stage{t}" for t in range(config["irft_stages"])]}
    return {m: runs[m] for m in config["methods"].split(",") if m in runs}


def mean(values):
    return sum(values) / len(values)


CURVE_KEYS = {"loss": "loss", "reward": "reward", "kl": "KL to reference", "disc_acc": "discriminator accuracy"}


def first_last(curve, key):
    """"a -> b": the mean of a curve's key over its first 10 steps and over its last 10 (over
    its first and last halves in a run of fewer than 20 steps)."""
    k = max(1, min(10, len(curve) // 2))
    return f"{mean([r[key] for r in curve[:k]]):.3f} -> {mean([r[key] for r in curve[-k:]]):.3f}"


def curve_summary(curve):
    """A training run in one line: each figure of its curve, first 10 steps -> last 10."""
    if not curve:
        return "no steps"
    return ", ".join(f"{label} {first_last(curve, key)}" for key, label in CURVE_KEYS.items() if key in curve[0])


def curves_table(config, out_dir):
    """Markdown: each policy-training run's loss, reward, KL and discriminator accuracy, the
    mean of its first and of its last 10 steps."""
    lines = ["| method | run | steps | " + " | ".join(CURVE_KEYS.values()) + " |", "|---|---|---|---|---|---|---|"]
    for method, names in curve_names(config).items():
        for name in names:
            with open(os.path.join(out_dir, f"{name}.curve.jsonl")) as f:
                curve = [json.loads(line) for line in f]
            cells = [first_last(curve, key) if key in curve[0] else "-" for key in CURVE_KEYS]
            lines.append(f"| {method} | {name} | {len(curve)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def difference_from_sft(value, stderr, sft):
    """(difference in standard errors, verdict) of a golden reward against SFT's:
    z = (value - sft) / sqrt(stderr^2 + stderr_sft^2); better / worse beyond 2 standard errors."""
    z = (value - sft["golden_reward"]) / max(math.hypot(stderr, sft["golden_reward_stderr"]), 1e-12)
    return z, "better" if z >= 2 else "worse" if z <= -2 else "no clear difference"


def verdict_tables(results):
    """Markdown: every policy, then every Best-of-n entry, against SFT with a verdict; with an imperfect
    demonstrator (--demo_error > 0), against the demonstrator too ("above the demonstrator")."""
    sft = next(p for p in results["policies"] if p["name"] == "sft")

    def cells(row):
        if row is sft:
            return f"{row['golden_reward']:.3f} ± {row['golden_reward_stderr']:.3f} | - | (the reference) | 0.500"
        z, verdict = difference_from_sft(row["golden_reward"], row["golden_reward_stderr"], sft)
        return (f"{row['golden_reward']:.3f} ± {row['golden_reward_stderr']:.3f} | "
                f"{row['golden_reward'] - sft['golden_reward']:+.3f} ({z:+.1f} SE) | {verdict} | "
                f"{row['win_rate_vs_sft']:.3f}")
    demo = next((p for p in results["policies"] if p["name"] == "demonstrations"), None)
    imperfect = demo is not None and results["config"].get("demo_error", 0) > 0  # something can be above it

    def vs_demo(row):  # with an imperfect demonstrator: the difference from it, and a verdict at 2 SE
        if not imperfect:
            return ""
        if row is demo:
            return " - | (the demonstrator) |"
        z, verdict = difference_from_sft(row["golden_reward"], row["golden_reward_stderr"], demo)
        word = {"better": "above the demonstrator", "worse": "below the demonstrator"}.get(verdict, verdict)
        return f" {row['golden_reward'] - demo['golden_reward']:+.3f} ({z:+.1f} SE) | {word} |"
    extra, rule = (" vs demonstrator | verdict |", "---|---|") if imperfect else ("", "")
    lines = [f"| policy | golden reward | vs SFT | verdict | win rate vs SFT | KL to SFT |{extra}",
             f"|---|---|---|---|---|---|{rule}"]
    for p in results["policies"]:
        kl = (f"{p['kl_to_sft']:.2f} ± {p['kl_to_sft_stderr']:.2f}" if "kl_to_sft" in p
              else "0" if p["name"] == "sft" else "-")
        lines.append(f"| {p['name']} | {cells(p)} | {kl} |{vs_demo(p)}")
    if results["best_of_n"]:
        lines += ["", f"| Best-of-n with | n | golden reward | vs SFT | verdict | win rate vs SFT | KL bound |{extra}",
                  f"|---|---|---|---|---|---|---|{rule}"]
        lines += [f"| {b['rm']} | {b['n']} | {cells(b)} | {b['kl_bound']:.2f} |{vs_demo(b)}" for b in results["best_of_n"]]
    return "\n".join(lines)


def parts_tables(results):
    """Markdown (built-in task only): each part of the golden reward, and the golden reward by kind
    of prompt, for SFT and for every Best-of-n entry; then each selector's share of the ceiling."""
    sft = next(p for p in results["policies"] if p["name"] == "sft")
    bon = results["best_of_n"]
    if "parts" not in sft or not bon:
        return ""
    lines = []
    for key, title in [("parts", "Each part of the golden reward"), ("kinds", "The golden reward by kind of prompt")]:
        names = list(sft[key])
        lines += [f"{title} (the mean over the evaluation prompts):", "",
                  "| row | n | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names),
                  "| sft (its one sample) | - | " + " | ".join(f"{sft[key][k]:+.3f}" for k in names) + " |"]
        lines += [f"| {b['rm']} | {b['n']} | " + " | ".join(f"{b[key].get(k, float('nan')):+.3f}" for k in names) + " |"
                  for b in bon]
        lines.append("")
    ns = sorted({b["n"] for b in bon if "share_of_ceiling" in b})
    lines += ["Share of the ceiling: (Best-of-n - n=1) / (oracle Best-of-n - n=1), the part of the best possible "
              "gain over a random candidate that each selector gets (negative: it does worse than a random one):", "",
              "| selector | " + " | ".join(f"n={n}" for n in ns) + " |", "|---|" + "---|" * len(ns)]
    for rm in dict.fromkeys(b["rm"] for b in bon if "share_of_ceiling" in b):
        lines.append(f"| {rm} | " + " | ".join(f"{b['share_of_ceiling']:+.2f}" for b in bon
                                               if b["rm"] == rm and "share_of_ceiling" in b) + " |")
    return "\n".join(lines)


def how_to_read(results):
    gold = results["golden_reward"]
    what = (f"the task's own score of a response (`{gold['function']}`, at most {gold.get('max')})"
            if gold["kind"] == "program" else "the gold reward model's score (a proxy, see below)")
    n = results["config"]["n_eval"]
    return "\n".join([
        "## How to read this report", "",
        f"- **golden reward**: {what}, the mean over the {n} evaluation prompts, ± its standard error "
        "(the uncertainty of that mean: two standard errors either side is roughly a 95% interval).",
        "- **vs SFT**: the difference from pi_sft's golden reward, and that difference in standard errors "
        "(`(value - sft) / sqrt(se^2 + se_sft^2)`).",
        "- **verdict**: *better* or *worse* than SFT when the difference is beyond two standard errors, "
        "else *no clear difference*: with this many prompts a smaller gap can be chance.",
        *(["- **vs demonstrator** (the demonstrator is imperfect here, `--demo_error`): the difference from "
            "its golden reward in standard errors; *above the demonstrator* beyond two."]
          if results["config"].get("demo_error", 0) > 0 else []),
        "- **win rate vs SFT**: the share of prompts on which the response beats pi_sft's response to the "
        "same prompt by golden reward (a tie counts half; 0.5 = no better, no worse).",
        "- **KL to SFT**: how far a trained policy moved from pi_sft, a Monte-Carlo estimate of "
        "KL(pi || pi_sft) in nats on its own samples (± standard error).",
        "- **Best-of-n**: draw n responses of pi_sft, keep the one the reward model scores highest. Every n "
        f"is estimated from the same {results['config']['bon_n']} candidates per prompt (the unbiased "
        "order-statistics estimator); **KL bound**: its KL to pi_sft is at most log n - (n-1)/n.",
        "- **oracle** and **majority** (Best-of-n rows): the same candidates picked by the golden reward itself "
        "(the ceiling of any reward model) and by self-consistency, the text most frequent among the n (no "
        "reward model, no labels; estimated over 256 random n-subsets; its KL bound is log n). **Share of the "
        "ceiling**: the part of the oracle's gain over n = 1 that a selector gets.",
        "- **reward models**: *held-out acc.* on held-out pairs of the kind each was trained on; *demo > SFT*: "
        "how often it scores the demonstration above a pi_sft response; *chosen > rejected*: on preference "
        "pairs; *golden order of SFT pairs*: how often it orders two pi_sft responses as the golden reward does "
        "(what Best-of-n needs).", ""])


def config_command(config):
    """The command line that reruns this run: every Config field, grouped a few to a line."""
    args = [f"--{k}={shlex.quote(str(v))}" for k, v in config.items() if k not in ("out_dir", "device")]
    lines = [" ".join(args[i:i + 4]) for i in range(0, len(args), 4)]
    return "python train.py " + " \\\n    ".join(lines)


def dialogue(prompt, response):
    """A prompt and its response as a quoted dialogue (markdown), one line per turn."""
    text = prompt + response.replace(EOT, " [end of text]")
    turns = [t.strip() for t in re.split(r"\n\n(?=Human:|Assistant:)", text) if t.strip()]
    return "\n".join(f"> **{t.split(':', 1)[0]}:**{t.split(':', 1)[1]}  " if ":" in t else f"> {t}  "
                     for t in turns)


def visible(token):
    """A token with its whitespace shown: ␣ for a space, ↵ for a newline."""
    return token.replace(" ", "␣").replace("\n", "↵")


def plot_golden_vs_kl(results, path):
    """Golden reward against KL to pi_sft: a Best-of-n curve per reward model (the KL bound),
    a point per trained policy (Monte-Carlo KL), SFT's level and the task's maximum."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[plot] matplotlib is not installed: skipping golden_vs_kl.png (pip install -r requirements.txt)")
        return False
    fig, ax = plt.subplots(figsize=(9, 5))
    sft = next(p for p in results["policies"] if p["name"] == "sft")
    ax.axhline(sft["golden_reward"], color="0.4", linestyle="--", linewidth=1, label="SFT (n = 1)")
    if results["golden_reward"].get("max") is not None:
        ax.axhline(results["golden_reward"]["max"], color="0.4", linestyle=":", linewidth=1, label="task maximum")
    for rm in dict.fromkeys(b["rm"] for b in results["best_of_n"]):
        rows = [b for b in results["best_of_n"] if b["rm"] == rm]
        style = {"oracle": dict(color="k", linestyle="-."), "majority": dict(color="0.5", linestyle="--")}
        ax.errorbar([b["kl_bound"] for b in rows], [b["golden_reward"] for b in rows],
                    yerr=[b["golden_reward_stderr"] for b in rows], marker=".", markersize=4, linewidth=1,
                    capsize=2, alpha=0.6, label=f"Best-of-n, {rm}" if rm not in style else f"{rm} (of n)",
                    **style.get(rm, {}))
    trained = [p for p in results["policies"] if "kl_to_sft" in p]
    colours = plt.get_cmap("Dark2").colors
    for p, marker, colour in zip(trained, "s^vDPX*ph", colours):
        ax.errorbar([p["kl_to_sft"]], [p["golden_reward"]], yerr=[p["golden_reward_stderr"]],
                    xerr=[p["kl_to_sft_stderr"]], marker=marker, markersize=9, color=colour, markeredgecolor="k",
                    linestyle="none", elinewidth=1.5, capsize=4, zorder=3, label=f"trained: {p['name']}")
    ax.set_xscale("symlog", linthresh=0.1)  # a hacked reward can drive the KL far past BoN's
    ax.set_xlabel("KL to pi_sft (nats, symlog axis; Best-of-n: the bound log n - (n-1)/n)")
    ax.set_ylabel("golden reward (mean ± standard error)")
    ax.set_title(f"Golden reward against KL: preset {results['preset']}, seed {results['seed']}")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return True


def results_digest(results):
    """The sha256 of a run's results less this digest, as JSON with sorted keys: results.json carries it,
    so that a file edited or damaged after the run wrote it is known (read_results)."""
    body = {k: v for k, v in results.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_results(path):
    """(results, None) from a results.json the project wrote, or (None, why not) for a file that is not
    one: absent, not a file, not JSON, or not what the run wrote (its digest does not match)."""
    try:
        results = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None, "it does not exist"
    except IsADirectoryError:
        return None, "it is a folder"
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return None, f"it is not a results file ({type(e).__name__})"
    if not isinstance(results, dict) or results.get("digest") != results_digest(results):
        return None, "it is not what the run wrote (edited or damaged since)"
    return results, None


def write_report(results, out_dir):
    """report.md (and golden_vs_kl.png) in out_dir, from a run's results.json alone."""
    report = [f"# Results: preset `{results['preset']}`, seed {results['seed']}", "",
              f"Device {results['device']}, {results['processes']} process(es), {results['wall_time_s']:.0f} s. "
              "The command that reruns it (any field can be changed; `python train.py --help` says what each does):",
              "", "```", config_command(results["config"]), "```", "", how_to_read(results)]
    gold = results["golden_reward"]
    if gold["kind"] != "program":
        report += [f"The golden reward here is a **proxy**: a reward model trained on {gold['pairs']} preference "
                   f"pairs that no evaluated model saw (from {gold['init_from']}, held-out chosen > rejected "
                   f"accuracy {gold['heldout_accuracy']:.3f}), not human judgement.", ""]
    report += ["## Policies and Best-of-n against SFT", "", verdict_tables(results), "",
               "## Reward models", "", rm_table(results), ""]
    if parts := parts_tables(results):
        report += ["## What each selector moves (built-in task)", "", parts, ""]
    if plot_golden_vs_kl(results, os.path.join(out_dir, "golden_vs_kl.png")):
        report += ["![golden reward against KL](golden_vs_kl.png)", ""]
    if times := stage_time_table(results):
        report += ["## Where the time went", "", "Wall time of each stage of this run, and of its parts: each reward "
                   "model (its training and its held-out scoring), each trained method, and in the evaluation the "
                   "sampling and the scoring of the Best-of-N candidates by each reward model.", "", times, ""]
    if results.get("stages"):
        report += ["## What the run did", "", "Each result trained, sampled or loaded (when up to date), with its "
                   "figures over the first 10 training steps -> the last 10 (halves of a shorter run).", ""]
        report += [f"- {line}" for line in results["stages"]] + [""]
    if curve_names(results["config"]):
        report += ["## Policy training (first 10 steps -> last 10; halves of a shorter run)", "",
                   curves_table(results["config"], out_dir), ""]
    report += ["## AVA-d per-token rewards (posterior mean and std of each response token's reward)", ""]
    for row in results["ava_token_rewards"]:
        report += [dialogue(row["prompt"], row["response"]), "",
                   f"golden reward {row['golden_reward']:+.1f}, sum of means {row['sequence_reward']:+.2f}", "",
                   "| token | mean | std |", "|---|---|---|"]
        report += [f"| `{visible(text)}` | {mu:+.2f} | {sigma:.2f} |" for text, mu, sigma in row["tokens"]] + [""]
    report += ["## Samples (the first evaluation prompts)", ""]
    for name, rows in results.get("examples", {}).items():
        report += [f"### {name}", ""]
        for prompt, response in rows:
            report += [dialogue(prompt, response), ""]
    write_text("\n".join(report), os.path.join(out_dir, "report.md"))


# ----------------------------------------------------------------------------------------
# Several seeds: the README's tables, from the runs' results.json

def over_seeds(values):
    """'mean ± standard error' of one number over seeds (the spread of the seeds, not of the prompts)."""
    m = mean(values)
    se = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1) / len(values)) if len(values) > 1 else 0.0
    return f"{m:.3f} ± {se:.3f}"


def seed_tables(runs):
    """Markdown: the README's tables over seeds, from {seed: results}. Trained policies (golden reward,
    its difference from SFT in standard errors, KL), the verdicts counted over the seeds, the reward
    models' held-out accuracies, Best-of-n by n (mean ± standard error over the seeds), and where each
    selector peaks with its share of the ceiling."""
    seeds = sorted(runs)
    first = runs[seeds[0]]
    names = [p["name"] for p in first["policies"] if p["name"] != "demonstrations"]
    by_name = {s: {p["name"]: p for p in runs[s]["policies"]} for s in seeds}
    lines = ["Trained policies: golden reward ± standard error over the prompts (difference from SFT in standard "
             "errors; Monte-Carlo KL to `pi_sft`):", "",
             "| seed | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for s in seeds:
        sft, cells = by_name[s]["sft"], []
        for name in names:
            p = by_name[s][name]
            cell = f"{p['golden_reward']:.3f} ± {p['golden_reward_stderr']:.3f}"
            if name != "sft":
                z, _ = difference_from_sft(p["golden_reward"], p["golden_reward_stderr"], sft)
                cell += f" ({z:+.1f} SE" + (f", KL {p['kl_to_sft']:.2f})" if "kl_to_sft" in p else ")")
            cells.append(cell)
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines.append(f"| mean ± SE over {len(seeds)} seeds | " + " | ".join(
        over_seeds([by_name[s][n]["golden_reward"] for s in seeds]) for n in names) + " |")
    lines.append("| vs SFT over the seeds (mean difference; better / no clear difference / worse) | " + " | ".join(
        "-" if n == "sft" else
        f"{mean([by_name[s][n]['golden_reward'] - by_name[s]['sft']['golden_reward'] for s in seeds]):+.3f}; " + " / ".join(
            str(sum(difference_from_sft(by_name[s][n]["golden_reward"], by_name[s][n]["golden_reward_stderr"],
                                        by_name[s]["sft"])[1] == v for s in seeds))
            for v in ("better", "no clear difference", "worse")) for n in names) + " |")
    rms = [r["name"] for r in first["reward_models"]]
    rm_of = {s: {r["name"]: r for r in runs[s]["reward_models"]} for s in seeds}
    lines += ["", "Reward models, held-out accuracy on their own kind of pair / demonstration > SFT sample / "
              "golden order of two SFT samples:", "", "| seed | " + " | ".join(rms) + " |", "|---|" + "---|" * len(rms)]
    for s in seeds:
        lines.append(f"| {s} | " + " | ".join(f"{rm_of[s][r]['heldout_accuracy']:.3f} / {rm_of[s][r]['acc_demo_vs_sft']:.3f}"
                                              f" / {rm_of[s][r]['acc_golden_sft_pairs']:.3f}" for r in rms) + " |")
    lines.append("| mean over the seeds | " + " | ".join(
        " / ".join(f"{mean([rm_of[s][r][k] for s in seeds]):.3f}"
                   for k in ("heldout_accuracy", "acc_demo_vs_sft", "acc_golden_sft_pairs")) for r in rms) + " |")
    if not first["best_of_n"]:
        return "\n".join(lines)
    bon = {s: {(b["rm"], b["n"]): b for b in runs[s]["best_of_n"]} for s in seeds}
    selectors = list(dict.fromkeys(b["rm"] for b in first["best_of_n"]))
    ns = sorted({b["n"] for b in first["best_of_n"]})
    lines += ["", f"Best-of-n golden reward, mean ± standard error over the {len(seeds)} seeds:", "",
              "| selector | " + " | ".join(f"n={n}" for n in ns) + " |", "|---|" + "---|" * len(ns)]
    for rm in selectors:
        lines.append(f"| {rm} | " + " | ".join(over_seeds([bon[s][(rm, n)]["golden_reward"] for s in seeds])
                                               for n in ns) + " |")
    lines += ["", "Where each selector peaks (its best n) and its share of the ceiling there, per seed; then the "
              "gain of its best n over n = 1 in standard errors of that estimate:", "",
              "| seed | " + " | ".join(r for r in selectors if r != "oracle") + " |",
              "|---|" + "---|" * (len(selectors) - 1)]
    for s in seeds:
        cells = []
        for rm in [r for r in selectors if r != "oracle"]:
            best = max((bon[s][(rm, n)] for n in ns), key=lambda b: b["golden_reward"])
            gain = best["golden_reward"] - bon[s][(rm, 1)]["golden_reward"]
            share = f"{best['share_of_ceiling']:+.2f}" if "share_of_ceiling" in best else "+0.00"
            cells.append(f"{best['n']}: {share} ({gain / max(best['golden_reward_stderr'], 1e-12):+.1f} SE)")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def vote_tables(runs):
    """Markdown: the README's "When does a learned reward beat self-consistency?" tables, from
    {(demo_error, seed): results}. For each demo_error: every selector's Best-of-n golden reward (the
    mean over the seeds), its share of the ceiling, its difference from majority voting at the same n and the seeds in which it is
    above / below majority by 2 standard errors; the golden reward by kind of prompt at the largest n;
    and every policy and largest-n selector against the demonstrator."""
    lines = []
    for error in sorted({e for e, _ in runs}):
        seeds = sorted(s for e, s in runs if e == error)
        bon = {s: {(b["rm"], b["n"]): b for b in runs[error, s]["best_of_n"]} for s in seeds}
        first = runs[error, seeds[0]]
        selectors = list(dict.fromkeys(b["rm"] for b in first["best_of_n"]))
        ns = sorted({b["n"] for b in first["best_of_n"]})[1:]

        def z(a, b):
            return (a["golden_reward"] - b["golden_reward"]) / max(math.hypot(a["golden_reward_stderr"],
                                                                            b["golden_reward_stderr"]), 1e-12)
        lines += [f"`--demo_error={error}`, seeds {', '.join(map(str, seeds))}: Best-of-n golden reward (mean over "
                  "the seeds) [share of the ceiling] (difference from majority voting at the same n; the seeds in "
                  "which it is above / below majority by 2 standard errors):", "",
                  "| selector | " + " | ".join(f"n={n}" for n in ns) + " |", "|---|" + "---|" * len(ns)]
        for rm in selectors:
            cells = []
            for n in ns:
                rows = [(bon[s][(rm, n)], bon[s][("majority", n)]) for s in seeds]
                cell = f"{mean([a['golden_reward'] for a, _ in rows]):.3f}"
                if "share_of_ceiling" in rows[0][0]:
                    cell += f" [{mean([a['share_of_ceiling'] for a, _ in rows]):+.2f}]"
                if rm != "majority":
                    cell += (f" ({mean([a['golden_reward'] - m['golden_reward'] for a, m in rows]):+.3f}; "
                             f"{sum(z(a, m) >= 2 for a, m in rows)}/{sum(z(a, m) <= -2 for a, m in rows)})")
                cells.append(cell)
            lines.append(f"| {rm} | " + " | ".join(cells) + " |")
        if "kinds" in first["best_of_n"][0]:
            kinds = list(first["best_of_n"][0]["kinds"])
            lines += ["", f"The golden reward by kind of prompt at n={ns[-1]} (mean over the seeds):", "",
                      "| selector | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
            lines += [f"| {rm} | " + " | ".join(f"{mean([bon[s][(rm, ns[-1])]['kinds'][k] for s in seeds]):+.3f}"
                                                for k in kinds) + " |" for rm in selectors]
        demo = {s: next(p for p in runs[error, s]["policies"] if p["name"] == "demonstrations") for s in seeds}
        rows = [(p["name"], {s: next(q for q in runs[error, s]["policies"] if q["name"] == p["name"]) for s in seeds})
                for p in first["policies"] if p["name"] != "demonstrations"]
        rows += [(f"{rm}, n={ns[-1]}", {s: bon[s][(rm, ns[-1])] for s in seeds}) for rm in selectors]
        lines += ["", f"Against the demonstrator (golden reward {mean([demo[s]['golden_reward'] for s in seeds]):.3f}, "
                  "mean over the seeds): the mean difference, and the seeds in which it is above / below the "
                  "demonstrator by 2 standard errors:", "", "| policy or selector | vs demonstrator | above / below |",
                  "|---|---|---|"]
        lines += [f"| {name} | {mean([by_seed[s]['golden_reward'] - demo[s]['golden_reward'] for s in seeds]):+.3f} | "
                  f"{sum(z(by_seed[s], demo[s]) >= 2 for s in seeds)} / {sum(z(by_seed[s], demo[s]) <= -2 for s in seeds)} |"
                  for name, by_seed in rows]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="The README's tables over seeds, from the runs' out dirs.")
    parser.add_argument("--seeds", nargs="+", metavar="OUT_DIR",
                        help="out dirs of `python train.py --seed=S`, one per seed")
    parser.add_argument("--votes", nargs="+", metavar="OUT_DIR",
                        help="out dirs of `python train.py --seed=S --demo_error=E`: the voting tables")
    args = parser.parse_args()
    if not (args.seeds or args.votes):
        parser.exit(2, "error: give --seeds OUT_DIR ... or --votes OUT_DIR ...\n")
    runs = {}
    for out_dir in args.seeds or args.votes:
        results, problem = read_results(Path(out_dir, "results.json"))
        if problem:
            parser.exit(2, f"error: {Path(out_dir, 'results.json')}: {problem}; rerun its `python train.py` command\n")
        runs[results["seed"] if args.seeds else (results["config"].get("demo_error", 0.0), results["seed"])] = results
    print(seed_tables(runs) if args.seeds else vote_tables(runs))
