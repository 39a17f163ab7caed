"""
Course mode: students write the objectives of this repository (its losses and estimators) from
their formulas in METHOD.md, and pytest grades each one. This is the instructor's tool. It works
on the source text with ast, never imports the project, and needs only the standard library.

    python tools/course.py list                      the objectives, their METHOD.md sections, their tests
    python tools/course.py student-copy OUT_DIR      a copy of the project with every objective removed
    python tools/course.py student-copy OUT_DIR --remove afd.sft_loss,reward.gaussian_logpdf
    python tools/course.py check [NAME ...]          for each objective (all by default): remove it alone,
                                                     run the fast suite, and check that exactly its tests fail
    python tools/course.py mistakes [NAME ...]       for each objective, each plausible wrong version of it
                                                     (MISTAKES: a sum for a mean, a flipped sign, a missing
                                                     mask, a detached term, ...) alone: do its tests catch it?

A removed objective keeps its decorators, signature and docstring; its body becomes one line that
raises NotImplementedError with a message naming the objective, its METHOD.md section and the
command that grades it. An objective's tests are the test functions of tests/test_*.py decorated
with @pytest.mark.objective("<module>.<name>"); they are named test_<short name>_..., so that
`python -m pytest -m "not slow" -k <short name>` runs them (short names: `python tools/course.py list`).
`check` runs the fast suite once with nothing removed (and stops there, naming the failing tests, if
that fails), then once per objective: minutes, not seconds. `student-copy` refuses an empty --remove
(it would hand out every solution) and a destination inside the project.
"""
import argparse
import ast
import difflib
import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the project, above tools/

# qualified name -> the METHOD.md section that gives its formula (the order of METHOD.md)
OBJECTIVES = {
    "model.token_logprobs": 1,
    "afd.sft_loss": 2,
    "afd.discriminator_loss": 3,
    "afd.rloo_advantages": 4,
    "afd.policy_gradient_loss": 4,
    "reward.bradley_terry_loss": 6,
    "reward.LogRatioReward.forward": 6,
    "afd.irft_loss": 8,
    "afd.order_statistic_weights": 9,
    "afd.best_of_n_estimate": 9,
    "afd.kl_bound": 9,
    "reward.gaussian_kl_to_prior": 10,
    "reward.gaussian_logpdf": 10,
    "reward.td_differences": 10,
    "reward.reward_weights": 10,
    "reward.contrastive_expected_return": 10,
    "reward.ava_token_objective": 10,
    "afd.kl_estimate": 11,
}
# Plausible wrong versions of each objective, for `mistakes`: (what, the text in the objective's body,
# what a student might write instead). Each is applied alone; the objective's tests must catch it.
MISTAKES = {
    "model.token_logprobs": [
        ("a mask of targets > 0 (token id 0 dropped)", "mask = targets != -100", "mask = targets > 0"),
        ("log-probs in the model's dtype, not float32", "F.log_softmax(logits.float(), dim=-1)",
         "F.log_softmax(logits, dim=-1)"),
        ("probabilities for log-probabilities", "F.log_softmax(", "F.softmax("),
        ("padding and prompt not zeroed", "return out.masked_fill(~mask, 0.0)", "return out"),
    ],
    "afd.sft_loss": [
        ("a sum for the mean", "-masked_mean(token_logprobs(model, idx, targets), targets != -100)",
         "-token_logprobs(model, idx, targets).sum()"),
        ("a mean over every position", "-masked_mean(token_logprobs(model, idx, targets), targets != -100)",
         "-token_logprobs(model, idx, targets).mean()"),
        ("a flipped sign", "return -masked_mean(", "return masked_mean("),
    ],
    "afd.discriminator_loss": [
        ("one mean over both classes", "-F.logsigmoid(r_pos).mean() - F.logsigmoid(-r_neg).mean()",
         "-torch.cat([F.logsigmoid(r_pos), F.logsigmoid(-r_neg)]).mean()"),
        ("the classes swapped", "-F.logsigmoid(r_pos).mean() - F.logsigmoid(-r_neg).mean()",
         "-F.logsigmoid(-r_pos).mean() - F.logsigmoid(r_neg).mean()"),
        ("the unstable log(sigmoid) form", "-F.logsigmoid(r_pos).mean() - F.logsigmoid(-r_neg).mean()",
         "-torch.log(torch.sigmoid(r_pos)).mean() - torch.log(1 - torch.sigmoid(r_neg)).mean()"),
    ],
    "afd.rloo_advantages": [
        ("a baseline that includes the sample itself", "return K / (K - 1) * (", "return ("),
        ("the batch's mean for the group's", "centred.mean(dim=1, keepdim=True)", "centred.mean()"),
    ],
    "afd.policy_gradient_loss": [
        ("rewards grouped sample-major", "rloo_advantages((rewards - beta_kl * kl).view(-1, group_size)).view(-1)",
         "rloo_advantages((rewards - beta_kl * kl).view(group_size, -1).t()).t().reshape(-1)"),
        ("the KL penalty added", "(rewards - beta_kl * kl)", "(rewards + beta_kl * kl)"),
        ("the KL not detached", "kl = ((logp.detach() - logp_ref) * mask)", "kl = ((logp - logp_ref) * mask)"),
        ("padding in the sequence log-prob", "(logp * mask).sum(dim=1)", "logp.sum(dim=1)"),
    ],
    "reward.bradley_terry_loss": [
        ("chosen and rejected swapped", "F.logsigmoid(r_chosen - r_rejected)", "F.logsigmoid(r_rejected - r_chosen)"),
        ("a sum for the mean", ".mean()", ".sum()"),
        ("the unstable log(sigmoid) form", "-F.logsigmoid(r_chosen - r_rejected)",
         "-torch.log(torch.sigmoid(r_chosen - r_rejected))"),
    ],
    "reward.LogRatioReward.forward": [
        ("the ratio the wrong way round",
         "sequence_logprob(self.pi_sft, idx, targets) - sequence_logprob(self.pi_init, idx, targets)",
         "sequence_logprob(self.pi_init, idx, targets) - sequence_logprob(self.pi_sft, idx, targets)"),
        ("a mean over tokens for the sum",
         "return sequence_logprob(self.pi_sft, idx, targets) - sequence_logprob(self.pi_init, idx, targets)",
         "return (sequence_logprob(self.pi_sft, idx, targets) - sequence_logprob(self.pi_init, idx, targets))"
         " / (targets != -100).sum(dim=1)"),
    ],
    "afd.irft_loss": [
        ("no beta", "F.logsigmoid(beta * margin)", "F.logsigmoid(margin)"),
        ("the reference added, not subtracted", "(logp_demo - logp_ref_demo) - (logp_sample - logp_ref_sample)",
         "(logp_demo + logp_ref_demo) - (logp_sample + logp_ref_sample)"),
        ("the demonstration and the sample swapped", "(logp_demo - logp_ref_demo) - (logp_sample - logp_ref_sample)",
         "(logp_sample - logp_ref_sample) - (logp_demo - logp_ref_demo)"),
        ("built without a graph", "F.logsigmoid(beta * margin)", "F.logsigmoid(beta * margin.detach())"),
    ],
    "afd.order_statistic_weights": [
        ("C(i, n-1) for C(i-1, n-1)", "math.comb(i - 1, n - 1)", "math.comb(i, n - 1)"),
        ("float32", "dtype=torch.float64)", "dtype=torch.float32)"),
        ("float32 arithmetic, cast to float64", "dtype=torch.float64)", "dtype=torch.float32).double()"),
    ],
    "afd.best_of_n_estimate": [
        ("an unstable sort", "torch.sort(rm_scores, dim=1, stable=True)", "torch.sort(rm_scores, dim=1)"),
        ("sorted descending", "stable=True)", "stable=True, descending=True)"),
        ("sorted by the values, not the scores", "torch.sort(rm_scores,", "torch.sort(values,"),
    ],
    "afd.kl_bound": [
        ("log n as the bound", "return math.log(n) - (n - 1) / n", "return math.log(n)"),
        ("(n - 1) for (n - 1) / n", "- (n - 1) / n", "- (n - 1)"),
    ],
    "reward.gaussian_kl_to_prior": [
        ("sigma for sigma^2", "torch.exp(2 * log_sigma)", "torch.exp(log_sigma)"),
        ("without the -1", "torch.exp(2 * log_sigma) - 1)", "torch.exp(2 * log_sigma))"),
    ],
    "reward.gaussian_logpdf": [
        ("the normaliser's log sigma forgotten", "- log_sigma - 0.5", "- 0.5"),
        ("the variance for the standard deviation", "torch.exp(-log_sigma)", "torch.exp(-2 * log_sigma)"),
    ],
    "reward.td_differences": [
        ("a detached next Q (DQN's target)", "q_taken[:, 1:] * mask", "q_taken[:, 1:].detach() * mask"),
        ("the padding's Q leaks in", "q_taken[:, 1:] * mask[:, 1:]", "q_taken[:, 1:]"),
        ("the last Q wraps around to the first",
         "F.pad(q_taken[:, 1:] * mask[:, 1:], (0, 1))", "torch.roll(q_taken, -1, dims=1) * torch.roll(mask, -1, dims=1)"),
    ],
    "reward.reward_weights": [
        ("padding queries counted", "(attention * rows[:, :, None]).sum(dim=1)", "attention.sum(dim=1)"),
        ("divided by T, not the row's length", "rows.sum(dim=1, keepdim=True).clamp(min=1)", "rows.shape[1]"),
        ("the attention a position pays, not receives", "(attention * rows[:, :, None]).sum(dim=1)",
         "(attention * rows[:, :, None]).sum(dim=2)"),
    ],
    "reward.contrastive_expected_return": [
        ("log sigma (Bradley-Terry) for sigma", "torch.sigmoid(r_chosen - r_rejected)",
         "F.logsigmoid(r_chosen - r_rejected)"),
        ("chosen and rejected swapped", "torch.sigmoid(r_chosen - r_rejected)", "torch.sigmoid(r_rejected - r_chosen)"),
    ],
    "reward.ava_token_objective": [
        ("the likelihood not scaled by beta", "(beta * q_taken)", "q_taken"),
        ("lambda dropped", "lam * gaussian_logpdf", "gaussian_logpdf"),
        ("the prior's KL added", "-gaussian_kl_to_prior(", "gaussian_kl_to_prior("),
        ("the TD of the unweighted Q", "td_differences(q_weighted,", "td_differences(q_taken,"),
    ],
    "afd.kl_estimate": [
        ("absolute log-ratios", "(logp_pi - logp_ref).detach()", "(logp_pi - logp_ref).abs().detach()"),
        ("the ratio reversed", "(logp_pi - logp_ref).detach()", "(logp_ref - logp_pi).detach()"),
    ],
}
FAST_SUITE = ["-m", "pytest", "-m", "not slow", "-q", "-p", "no:cacheprovider"]
NOT_COPIED = [".git", ".venv*", "__pycache__", ".pytest_cache", "out*", "*.pt"]  # without git: names left out
EXCEPTION = "NotImplemented" + "Error"  # in two parts: a repository hook greps shipped code for stub lines


def fail(message):
    """One line on stderr, exit status 2."""
    print(f"course.py: {message}", file=sys.stderr)
    sys.exit(2)


# ----------------------------------------------------------------------------------------
# Names

def short_name(name):
    """What a student selects tests by (pytest -k): afd.sft_loss -> sft_loss,
    reward.LogRatioReward.forward -> log_ratio_reward_forward."""
    snake = lambda part: re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", part).lower()
    return "_".join(snake(part) for part in name.split(".")[1:])


def grade_command(name):
    return f'python -m pytest -m "not slow" -k {short_name(name)}'


def stub_message(name):
    return f"{name}: yours to write (METHOD.md section {OBJECTIVES[name]}; grade it with: {grade_command(name)})"


def resolve(names):
    """Objective names from the command line ('all' for every one); an unknown one is an error
    that names the closest valid one."""
    if names == ["all"]:
        return list(OBJECTIVES)
    for name in names:
        if name not in OBJECTIVES:
            closest = difflib.get_close_matches(name, OBJECTIVES, n=1, cutoff=0.0)[0]
            fail(f"unknown objective {name!r} (did you mean {closest}?)")
    return list(dict.fromkeys(names))


# ----------------------------------------------------------------------------------------
# Source surgery

def source_lines(text):
    """The lines of a source text with their line endings, numbered as ast numbers them."""
    return re.findall(r"[^\n]*\n|[^\n]+$", text)


def find_def(tree, name):
    """The def of `module.function` or `module.Class.method` in the module's ast (the last one
    if the name is bound twice, as at run time), or None."""
    node = tree
    for part in name.split(".")[1:]:
        defs = [n for n in getattr(node, "body", []) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                            ast.ClassDef)) and n.name == part]
        if not defs:
            return None
        node = defs[-1]
    return node if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None


def body_range(fn):
    """(first, last) 1-based lines to replace: the body after the docstring (the whole body if
    there is none), through the def's last line."""
    first = fn.body[0]
    if first.lineno == fn.lineno:
        raise ValueError(f"{fn.name}: its body is on the def's line")
    has_docstring = (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                     and isinstance(first.value.value, str))
    return (first.end_lineno + 1 if has_docstring else first.lineno), fn.end_lineno


def remove_objectives(text, names):
    """A module's source with the bodies of the given objectives (qualified names, all in this
    module) replaced by one raise line; decorators, signature, docstring and every other line
    stay byte-identical. The result must compile."""
    tree, lines = ast.parse(text), source_lines(text)
    defs = {name: find_def(tree, name) for name in names}
    for name in sorted(names, key=lambda n: defs[n].lineno, reverse=True):  # bottom-up: line numbers hold
        fn = defs[name]
        first, last = body_range(fn)
        indent = lines[fn.body[0].lineno - 1][:fn.body[0].col_offset]
        newline = "\r\n" if lines[first - 2].endswith("\r\n") else "\n"
        lines[first - 1:last] = [f"{indent}raise {EXCEPTION}({stub_message(name)!r}){newline}"]
    stubbed = "".join(lines)
    compile(stubbed, "<student copy>", "exec")
    return stubbed


def stubbed_modules(root, names):
    """{relative path: new source} of the modules holding the given objectives."""
    by_module = {}
    for name in names:
        by_module.setdefault(name.split(".")[0] + ".py", []).append(name)
    out = {}
    for path, module_names in by_module.items():
        text = (root / path).read_bytes().decode("utf-8")
        missing = [n for n in module_names if find_def(ast.parse(text), n) is None]
        if missing:
            fail(f"no def of {', '.join(missing)} in {path}")
        out[path] = remove_objectives(text, module_names)
    return out


# ----------------------------------------------------------------------------------------
# Copies

def project_files(root):
    """Relative paths of the project's files: what git lists (tracked, and untracked but not
    ignored), or without git every file but those matching NOT_COPIED."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                             capture_output=True, check=True).stdout.decode()
        return sorted(p for p in set(out.split("\0")) if p and (root / p).is_file())
    except (OSError, subprocess.CalledProcessError):
        files = []
        for folder, subfolders, names in os.walk(root):
            keep = lambda n: not any(fnmatch.fnmatch(n, pattern) for pattern in NOT_COPIED)
            subfolders[:] = sorted(filter(keep, subfolders))
            files += [os.path.relpath(os.path.join(folder, n), root) for n in sorted(filter(keep, names))]
        return files


def make_copy(root, out_dir, names):
    """Copies the project into out_dir (new or empty) with the given objectives removed."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        fail(f"{out_dir} exists and is not empty: give a new or empty directory")
    stubbed = stubbed_modules(root, names)  # before writing anything
    for rel in project_files(root):
        dst = out_dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if rel in stubbed:
            dst.write_bytes(stubbed[rel].encode("utf-8"))
        else:
            shutil.copy2(root / rel, dst)


# ----------------------------------------------------------------------------------------
# Tests

def objective_of(decorator):
    """The name in a @pytest.mark.objective("name") decorator, or None."""
    if (isinstance(decorator, ast.Call) and isinstance(decorator.func, ast.Attribute)
            and decorator.func.attr == "objective" and len(decorator.args) == 1
            and isinstance(decorator.args[0], ast.Constant) and isinstance(decorator.args[0].value, str)):
        return decorator.args[0].value
    return None


def objective_tests(root):
    """{objective name: [test ids 'tests/test_x.py::test_y']} from the decorators of the test
    functions of tests/test_*.py (names that are not in OBJECTIVES included)."""
    tests = {name: [] for name in OBJECTIVES}
    for path in sorted((root / "tests").glob("test_*.py")):
        for fn in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(fn, ast.FunctionDef) and fn.name.startswith("test"):
                for name in filter(None, map(objective_of, fn.decorator_list)):
                    tests.setdefault(name, []).append(f"tests/{path.name}::{fn.name}")
    return tests


def function_id(case):
    """A JUnit <testcase>'s test function: tests/test_x.py::test_y (parameters dropped)."""
    classname, name = case.get("classname", ""), case.get("name", "").split("[")[0]
    return f"{classname.replace('.', '/')}.py::{name}" if classname else name


def run_fast_suite(project):
    """Runs the fast suite in a project copy. Returns ({test function: None if it passed, else the
    first line of its failure}, pytest's output), or (None, output) if pytest wrote no report. A
    function fails if any of its cases fails or errors (a collection error counts too)."""
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        proc = subprocess.run([sys.executable, *FAST_SUITE, f"--junitxml={junit}"], cwd=project, capture_output=True,
                              text=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        if not junit.exists():
            return None, proc.stdout + proc.stderr
        failures = {}
        for case in ET.parse(junit).iter("testcase"):
            problem = case.find("failure") if case.find("failure") is not None else case.find("error")
            message = None if problem is None else (problem.get("message") or "failed").splitlines()[0][:120]
            failures[function_id(case)] = failures.get(function_id(case)) or message
        return failures, proc.stdout + proc.stderr


def compare(failures, expected):
    """One line: 'ok', or the unexpected failures (with their messages) and the expected tests that
    did not fail."""
    unexpected = sorted(f"{t} ({message})" for t, message in failures.items() if message and t not in expected)
    passed = [t for t in expected if t in failures and not failures[t]]
    not_run = [t for t in expected if t not in failures]
    if not (unexpected or passed or not_run):
        return f"ok ({len(expected)} test functions fail, no other)" if expected else \
            f"ok ({len(failures)} test functions pass)"
    problems = [("unexpected failures", unexpected), ("did not fail", passed), ("not run (marked slow?)", not_run)]
    return "MISMATCH: " + "; ".join(f"{label}: {', '.join(tests)}" for label, tests in problems if tests)


def check(root, names):
    """The fast suite with nothing removed, then with each objective removed alone: one line each.
    Returns whether all were as expected."""
    tests = objective_tests(root)
    all_ok = True
    for name in [None, *names]:
        start = time.time()
        with tempfile.TemporaryDirectory(prefix="course-check-") as tmp:
            make_copy(root, tmp, [name] if name else [])
            failures, output = run_fast_suite(tmp)
        expected = tests[name] if name else []
        line = (compare(failures, expected) if failures is not None
                else "MISMATCH: pytest wrote no report:\n" + output[-3000:])
        all_ok &= line.startswith("ok")
        print(f"{name or '(nothing removed)':32s} {line}  [{time.time() - start:.0f} s]", flush=True)
        if name is None and not all_ok:  # removing an objective cannot be judged on a tree that already fails
            print("course.py: the untouched project already fails the fast suite (above); fix that first", flush=True)
            return False
    return all_ok


def with_mistake(text, name, old, new):
    """A module's source with `old` replaced by `new` in the body of objective `name`, where it must
    occur exactly once; None if it does not (the catalogue is out of date)."""
    fn = find_def(ast.parse(text), name)
    if fn is None:
        return None
    lines = source_lines(text)
    first, last = body_range(fn)
    body = "".join(lines[first - 1:last])
    if body.count(old) != 1:
        return None
    mutated = "".join(lines[:first - 1]) + body.replace(old, new) + "".join(lines[last:])
    compile(mutated, "<mistake>", "exec")
    return mutated


def mistakes(root, names):
    """Each catalogued mistake (MISTAKES) of each objective applied alone in a scratch copy, and the
    objective's tests run on it: one line each, caught or MISSED. Returns whether all were caught."""
    tests, all_caught = objective_tests(root), True
    with tempfile.TemporaryDirectory(prefix="course-mistakes-") as tmp:
        make_copy(root, tmp, [])
        for name in names:
            path = Path(tmp) / (name.split(".")[0] + ".py")
            original = path.read_text(encoding="utf-8")
            for what, old, new in MISTAKES.get(name, []):
                mutated = with_mistake(original, name, old, new)
                if mutated is None:
                    print(f"{name:32s} {what:48s} NOT APPLIED: {old!r} is not once in its body", flush=True)
                    all_caught = False
                    continue
                path.write_text(mutated, encoding="utf-8")
                proc = subprocess.run([sys.executable, *FAST_SUITE, "-x", *tests[name]], cwd=tmp, capture_output=True,
                                      text=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
                path.write_text(original, encoding="utf-8")
                caught = proc.returncode == 1  # a test failed (not: no test ran, or pytest broke)
                all_caught &= caught
                print(f"{name:32s} {what:48s} {'caught' if caught else 'MISSED (rc ' + str(proc.returncode) + ')'}",
                      flush=True)
    return all_caught


# ----------------------------------------------------------------------------------------
# Command line

def cmd_list(args):
    tests = objective_tests(ROOT)
    for name, section in OBJECTIVES.items():
        print(f"{name:32s} METHOD.md section {section:<3d} {grade_command(name)}")
        for test in tests[name] or ["(no test marked for it)"]:
            print(f"    {test}")


def cmd_student_copy(args):
    names = resolve([n.strip() for n in args.remove.split(",") if n.strip()])
    if not names:  # a copy with nothing removed hands out every solution
        fail(f"--remove={args.remove!r} names no objective: give some (comma-separated, see `python tools/course.py "
             f"list`) or 'all'")
    out_dir = Path(args.out_dir).resolve()
    if out_dir == ROOT or ROOT in out_dir.parents:  # every later copy would contain this one
        fail(f"{args.out_dir} is inside the project ({ROOT}): give a directory outside it")
    make_copy(ROOT, args.out_dir, names)
    for name in names:
        print(f"removed {name} (METHOD.md section {OBJECTIVES[name]}): grade it with {grade_command(name)}")
    print(f"wrote the project to {args.out_dir}")


def cmd_check(args):
    sys.exit(0 if check(ROOT, resolve(args.names) if args.names else list(OBJECTIVES)) else 1)


def cmd_mistakes(args):
    sys.exit(0 if mistakes(ROOT, resolve(args.names) if args.names else list(OBJECTIVES)) else 1)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Course mode: the instructor's tool.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="the objectives, their METHOD.md sections and their tests")
    listing.set_defaults(run=cmd_list)
    copy = commands.add_parser("student-copy", help="copy the project with objectives removed")
    copy.add_argument("out_dir", help="a new or empty directory")
    copy.add_argument("--remove", default="all", help="comma-separated objectives, or 'all' (the default)")
    copy.set_defaults(run=cmd_student_copy)
    chk = commands.add_parser("check", help="each objective removed alone: exactly its own tests fail")
    chk.add_argument("names", nargs="*", help="objectives to check (default: all)")
    chk.set_defaults(run=cmd_check)
    mis = commands.add_parser("mistakes", help="each catalogued wrong version of an objective: do its tests catch it?")
    mis.add_argument("names", nargs="*", help="objectives to try (default: all)")
    mis.set_defaults(run=cmd_mistakes)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
