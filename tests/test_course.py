"""tools/course.py, the instructor's tool of course mode: its source surgery and its bookkeeping (fast),
and a student copy graded by the fast suite (slow)."""
import ast
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

import course
from course import OBJECTIVES, ROOT

SOURCE = '''import functools


@functools.lru_cache()
def sft_loss(model,
             idx, targets):
    """A docstring
    on two lines."""
    x = idx + targets
    return x  # a comment


class LogRatioReward:
    def forward(self, idx, targets, last=None):
        return 0


def after():
    return 2
'''


def source_of(name):
    return (ROOT / (name.split(".")[0] + ".py")).read_text(encoding="utf-8")


def test_a_removed_body_keeps_the_decorators_signature_and_docstring_and_raises():
    stubbed = course.remove_objectives(SOURCE, ["afd.sft_loss", "reward.LogRatioReward.forward"])
    lines = stubbed.splitlines()
    assert lines[:8] == SOURCE.splitlines()[:8]        # through the docstring, byte for byte
    assert lines[9:13] == SOURCE.splitlines()[10:14]  # the class and the method's signature
    assert lines[14:] == SOURCE.splitlines()[15:]     # what follows the method
    assert lines[8].startswith("    raise ") and lines[13].startswith("        raise ")
    namespace = {}
    exec(compile(stubbed, "<stub>", "exec"), namespace)
    with pytest.raises(NotImplementedError) as e:
        namespace["sft_loss"](None, 1, 2)
    assert str(e.value) == ('afd.sft_loss: yours to write (METHOD.md section 2; grade it with: '
                            'python -m pytest -m "not slow" -k sft_loss)')
    with pytest.raises(NotImplementedError, match="reward.LogRatioReward.forward: yours to write"):
        namespace["LogRatioReward"]().forward(1, 2)
    assert namespace["after"]() == 2


def test_every_objective_is_a_def_whose_removal_compiles_and_touches_only_its_body():
    for name in OBJECTIVES:  # a loop, not parametrize: the ids would match `-k <short name>`
        text = source_of(name)
        fn = course.find_def(ast.parse(text), name)
        assert fn is not None, f"{name}: no such def"
        stubbed = course.remove_objectives(text, [name])
        new_fn = course.find_def(ast.parse(stubbed), name)  # it parses, and the def is still there
        assert ast.dump(new_fn.args) == ast.dump(fn.args) and ast.get_docstring(new_fn) == ast.get_docstring(fn)
        assert [ast.dump(d) for d in new_fn.decorator_list] == [ast.dump(d) for d in fn.decorator_list]
        first, last = course.body_range(fn)
        old, new = text.splitlines(keepends=True), stubbed.splitlines(keepends=True)
        assert new[:first - 1] == old[:first - 1] and new[first:] == old[last:], name


def test_an_unknown_name_is_one_line_naming_the_closest(capsys):
    with pytest.raises(SystemExit) as stop:
        course.main(["check", "afd.kl_bound", "afd.sft_los"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err == "course.py: unknown objective 'afd.sft_los' (did you mean afd.sft_loss?)\n"
    with pytest.raises(SystemExit):
        course.main(["student-copy", "unused", "--remove", "td_differences"])
    assert "(did you mean reward.td_differences?)" in capsys.readouterr().err


def test_student_copy_refuses_a_directory_that_is_not_empty(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as stop:
        course.main(["student-copy", str(tmp_path), "--remove", "afd.kl_bound"])
    assert stop.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_student_copy_refuses_an_empty_remove_and_a_destination_inside_the_project(tmp_path, capsys):
    for argv, message in [(["student-copy", str(tmp_path / "a"), "--remove", ""], "names no objective"),
                          (["student-copy", str(tmp_path / "b"), "--remove", " , "], "names no objective"),
                          (["student-copy", str(course.ROOT / "handout"), "--remove", "all"], "is inside the project"),
                          (["student-copy", str(course.ROOT), "--remove", "afd.kl_bound"], "is inside the project")]:
        with pytest.raises(SystemExit) as stop:
            course.main(argv)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not any(tmp_path.iterdir()) and not (course.ROOT / "handout").exists()


def test_check_stops_at_once_when_the_untouched_tree_fails(monkeypatch, capsys):
    runs = []

    def failing_suite(project):
        runs.append(project)
        return {"tests/test_x.py::test_y": "AssertionError"}, "1 failed"
    monkeypatch.setattr(course, "run_fast_suite", failing_suite)
    assert course.check(course.ROOT, ["afd.kl_bound", "afd.sft_loss"]) is False
    out = capsys.readouterr().out
    assert len(runs) == 1 and "MISMATCH: unexpected failures: tests/test_x.py::test_y" in out
    assert "already fails the fast suite" in out and "afd.kl_bound" not in out


def test_every_catalogued_mistake_applies_once_within_its_objectives_body():
    """Each entry of course.MISTAKES changes its own objective's body (and nothing else) and compiles;
    an entry whose text is not in the body, or is there twice, is refused (None). An objective removed
    for a student (its body a stub) has no text to change: its entries are not checked."""
    assert set(course.MISTAKES) == set(OBJECTIVES)
    for name, entries in course.MISTAKES.items():
        path = ROOT / (name.split(".")[0] + ".py")
        text = path.read_text()
        fn = course.find_def(ast.parse(text), name)
        if course.EXCEPTION in ast.get_source_segment(text, fn):
            continue
        for what, old, new in entries:
            mutated = course.with_mistake(text, name, old, new)
            assert mutated is not None and mutated != text, (name, what)
            before, after = text.splitlines(), mutated.splitlines()
            changed = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
            assert changed and fn.lineno <= changed[0] + 1 <= fn.end_lineno, (name, what)
    text = (ROOT / "afd.py").read_text()
    assert course.with_mistake(text, "afd.kl_bound", "not in the body", "x") is None
    assert course.with_mistake(text, "afd.irft_loss", "logp", "x") is None  # there several times


@pytest.mark.slow
def test_mistakes_reports_a_caught_mistake_and_a_missed_one(monkeypatch, capsys):
    """course.mistakes on afd.kl_bound: its catalogue is caught; a harmless rewrite (the same value)
    is reported MISSED, and the run fails."""
    assert course.mistakes(ROOT, ["afd.kl_bound"]) is True
    assert capsys.readouterr().out.count(" caught") == len(course.MISTAKES["afd.kl_bound"])
    monkeypatch.setitem(course.MISTAKES, "afd.kl_bound", [("the same, written otherwise", "(n - 1) / n", "(1 - 1 / n)")])
    assert course.mistakes(ROOT, ["afd.kl_bound"]) is False
    assert "MISSED" in capsys.readouterr().out


def test_every_objective_has_marked_tests_that_its_short_name_selects():
    tests = course.objective_tests(ROOT)
    assert set(tests) == set(OBJECTIVES), "a marker names no objective"
    all_tests = [f"tests/{path.name}::{fn.name}" for path in sorted((ROOT / "tests").glob("test_*.py"))
                 for fn in ast.parse(path.read_text()).body
                 if isinstance(fn, ast.FunctionDef) and fn.name.startswith("test")]
    for name, marked in tests.items():
        short = course.short_name(name)
        assert any(t.startswith("tests/test_objectives.py::") for t in marked), f"{name}: no test in test_objectives.py"
        assert all(t.split("::")[1].startswith(f"test_{short}_") for t in marked), marked
        selected = [t for t in all_tests if short in t.split("::")[1].lower()]  # what -k <short> picks
        assert sorted(selected) == sorted(marked), f"-k {short} selects {selected}"


def test_objective_markers_are_only_decorators_of_test_functions():
    """What course.objective_tests reads: @pytest.mark.objective("name") on a module-level test."""
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text())
        decorators = [d for fn in tree.body if isinstance(fn, ast.FunctionDef) and fn.name.startswith("test")
                      for d in fn.decorator_list if isinstance(d, ast.Call)]
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "objective":
                assert any(d.func is node and course.objective_of(d) for d in decorators), f"{path.name}:{node.lineno}"


def test_the_section_of_each_objective_is_where_method_md_states_it():
    method = (ROOT / "METHOD.md").read_text()
    for name, section in OBJECTIVES.items():
        text = re.search(rf"^## {section}\. .*?(?=^## |\Z)", method, re.S | re.M).group(0)
        assert name.split(".")[1] in text, f"METHOD.md section {section} does not mention {name}"
        fn = course.find_def(ast.parse(source_of(name)), name)
        said = re.findall(r"METHOD\.md section (\d+)", ast.get_docstring(fn) or "")
        assert all(int(n) == section for n in said), f"{name}'s docstring says section {said}"


def test_course_py_holds_no_stub_marker():
    assert "raise " + "NotImplementedError" not in (ROOT / "tools" / "course.py").read_text()


@pytest.mark.slow
def test_a_student_copy_fails_exactly_the_removed_objectives_tests(tmp_path):
    removed = ["afd.kl_bound", "reward.td_differences"]
    copy = tmp_path / "student"
    made = subprocess.run([sys.executable, "tools/course.py", "student-copy", str(copy), "--remove", ",".join(removed)],
                          cwd=ROOT, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    assert (copy / "METHOD.md").read_bytes() == (ROOT / "METHOD.md").read_bytes()
    assert not (copy / ".git").exists() and not any(copy.glob(".venv*"))
    junit = tmp_path / "junit.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-m", "not slow", "-q", "-p", "no:cacheprovider",
                    f"--junitxml={junit}"], cwd=copy, capture_output=True, text=True)
    failures = {case.get("name"): (case.find("failure") if case.find("failure") is not None else case.find("error"))
                for case in ET.parse(junit).iter("testcase")}
    failures = {name: f.get("message", "") + (f.text or "") for name, f in failures.items() if f is not None}
    expected = course.objective_tests(ROOT)
    assert sorted(failures) == sorted(t.split("::")[1] for name in removed for t in expected[name])
    for name in removed:
        for test in expected[name]:
            assert f"{name}: yours to write (METHOD.md section {OBJECTIVES[name]}" in failures[test.split("::")[1]]
        # and the grading command of the message runs exactly these tests (parameter ids included)
        collected = subprocess.run([sys.executable, "-m", "pytest", "-m", "not slow", "-k", course.short_name(name),
                                    "--collect-only", "-q", "-p", "no:cacheprovider"], cwd=copy, capture_output=True,
                                   text=True).stdout.split()
        assert sorted(t.split("[")[0] for t in collected if "::" in t) == sorted(expected[name])
