"""
Course mode: students write the objectives of this repository (its losses and estimators) from
their formulas in METHOD.md, and pytest grades each one. This is the instructor's tool. It works
on the source text with ast, never imports the project, and needs only the standard library.

    python tools/course.py list                      the objectives, their METHOD.md sections, their tests
    python tools/course.py student-copy OUT_DIR      a copy of the project with every objective removed
    python tools/course.py student-copy OUT_DIR --remove afd.sft_loss,reward.gaussian_logpdf
    python tools/course.py check [NAME ...]          for each objective (all by default): remove it alone,
                                                     run the fast suite, and check that exactly its tests fail

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
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
