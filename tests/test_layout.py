"""The house rules of the code, read from the scripts' source (ast): imports only point down (no cycle among
the top-level scripts, counting imports placed inside functions), no project import hides inside a function,
model.py is the network alone, and what needs no model (preprocess.py) imports no torch."""
import ast
import subprocess
import sys

import pytest
from conftest import REPO

SCRIPTS = sorted(p.stem for p in REPO.glob("*.py"))


def imports_of(name: str) -> tuple[set[str], list[tuple[int, str]]]:
    """The project modules `name`.py imports anywhere (top level or not), and those imported inside a
    function or class body, with their lines."""
    tree = ast.parse((REPO / f"{name}.py").read_text(), f"{name}.py")
    top_level = {id(node) for node in tree.body}
    found, nested = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module.split(".")[0]]
        else:
            continue
        for module in modules:
            if module in SCRIPTS and module != name:
                found.add(module)
                if id(node) not in top_level:
                    nested.append((node.lineno, module))
    return found, nested


GRAPH = {name: imports_of(name)[0] for name in SCRIPTS}


def cycle_from(start: str) -> list[str] | None:
    """A path start -> ... -> start through GRAPH, or None."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in sorted(GRAPH[node]):
            if nxt == start:
                return path + [start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, path + [nxt]))
    return None


def test_the_graph_is_read_from_the_source():
    # the reader sees what is there: train.py is a program on top, model.py at the bottom
    assert {"model", "checkpoint", "config"} <= GRAPH["train"]
    assert GRAPH["model"] == {"tokens"}


@pytest.mark.parametrize("name", SCRIPTS)
def test_imports_point_down_only(name):
    assert cycle_from(name) is None, f"import cycle: {' -> '.join(cycle_from(name))}"


@pytest.mark.parametrize("name", SCRIPTS)
def test_no_project_import_inside_a_function(name):
    assert imports_of(name)[1] == [], f"{name}.py imports a project module inside a function (line, module)"


def test_the_bottom_knows_nothing_above_it():
    assert GRAPH["tokens"] == set() and GRAPH["rules"] == set()
    assert GRAPH["utils"] == set() and GRAPH["config"] <= {"utils", "rules"}
    third_party = set()
    for node in ast.walk(ast.parse((REPO / "model.py").read_text())):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and getattr(node, "level", 0) == 0:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            third_party |= {n.split(".")[0] for n in names}
    assert third_party <= {"__future__", "contextlib", "itertools", "math", "typing", "numpy", "torch",
                           "tokens"}


@pytest.mark.parametrize("script", ["preprocess", "config", "utils", "rules"])
def test_what_needs_no_model_imports_no_torch(script):
    probe = f"import sys; sys.path.insert(0, {str(REPO)!r}); import {script}; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_ci_runs_the_readme_test_command_exactly():
    readme = (REPO / "README.md").read_text()
    tests = readme[readme.index("\n## Tests\n"):]
    command = tests[tests.index("```bash\n") + 8:].splitlines()[0].split("  #")[0].strip()
    assert command.startswith("pip install -r requirements.txt") and "pytest -q -n 2" in command
    assert command in (REPO / ".ci" / "run").read_text().splitlines()
    assert "matplotlib" in (REPO / "requirements.txt").read_text()   # the pictures are there by default


def example_commands(name: str) -> list[tuple[str, list[str]]]:
    """(script, flags) of each `python SCRIPT ...` example in `name`.py's docstring (continued lines joined,
    comments left out)."""
    import re
    text = re.sub(r"\\\n\s*", " ", ast.get_docstring(ast.parse((REPO / f"{name}.py").read_text())) or "")
    return [(script, re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", rest))
            for script, rest in re.findall(r"python3? (\w+)\.py([^#\n]*)", text)]


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_example_commands_of_each_docstring_use_flags_their_script_has(name):
    for script, flags in example_commands(name):
        if not (REPO / f"{script}.py").exists():
            continue
        source = (REPO / f"{script}.py").read_text()
        missing = [flag for flag in flags if f'"{flag}"' not in source and f'"{flag}",' not in source]
        assert not missing, f"{name}.py's example of {script}.py: {missing} is no flag of {script}.py"


def test_preprocess_shows_detection_as_detect_py():
    """Detection is detect.py's (evaluate.py --detect stays for old commands only)."""
    assert [s for s, _ in example_commands("preprocess") if s in ("detect", "evaluate")] == ["detect"]
