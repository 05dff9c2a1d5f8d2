"""Every test that starts torchrun ranks carries the ``serial`` marker, which ``make test`` runs alone
after the two-worker part: a gloo rank once aborted at its exit ("terminate called without an active
exception") beside the other worker's tests (session 15). A test starts torchrun when its body, or a
module-level helper it calls (at any depth), holds the string ``torch.distributed.run`` or ``torchrun``
(docstrings aside). The test files are read with ``ast``, none imported."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _starts_torchrun(node: ast.AST) -> bool:
    """A string constant naming the launcher (its module, its command or a command line with it)."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
            text = sub.value
            if "torch.distributed.run" in text or text == "torchrun" or text.startswith("torchrun "):
                return True
    return False


def _body_without_docstring(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[ast.stmt]:
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        return body[1:]
    return body


def _is_serial_mark(node: ast.expr) -> bool:
    """``pytest.mark.serial`` (or ``mark.serial``), alone or inside a list/tuple of marks."""
    if isinstance(node, (ast.List, ast.Tuple)):
        return any(_is_serial_mark(e) for e in node.elts)
    return isinstance(node, ast.Attribute) and node.attr == "serial"


def torchrun_tests_without_the_marker(path: Path) -> list[str]:
    """The names of ``path``'s test functions that start torchrun and are not marked serial."""
    tree = ast.parse(path.read_text(), filename=str(path))
    module_serial = any(
        isinstance(s, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in s.targets)
        and _is_serial_mark(s.value)
        for s in tree.body
    )  # fmt: skip
    functions = {s.name: s for s in tree.body if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef))}

    def calls(fn: ast.AST) -> set[str]:
        return {n.func.id for n in ast.walk(fn) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}

    launching: set[str] = set()
    # A helper launches if it holds the launcher's name or calls one that launches: repeat until no change.
    changed = True
    while changed:
        changed = False
        for name, fn in functions.items():
            if name in launching:
                continue
            body = ast.Module(body=_body_without_docstring(fn), type_ignores=[])
            if _starts_torchrun(body) or calls(body) & launching:
                launching.add(name)
                changed = True
    missing = []
    for name in sorted(launching):
        fn = functions[name]
        if not name.startswith("test_") or module_serial:
            continue
        if not any(_is_serial_mark(d.func if isinstance(d, ast.Call) else d) for d in fn.decorator_list):
            missing.append(name)
    return missing


def test_every_test_that_starts_torchrun_is_marked_serial() -> None:
    files = [p for p in sorted(TESTS.glob("test_*.py")) if p.name != Path(__file__).name]  # its samples aside
    missing = {p.name: m for p in files if (m := torchrun_tests_without_the_marker(p))}
    assert not missing, f"tests that start torchrun need @pytest.mark.serial: {missing}"


def test_the_guard_finds_torchrun_started_directly_and_through_a_helper(tmp_path: Path) -> None:
    """The guard itself: a command list, a helper two calls away and a shell line are found; a marked
    test, a module marked serial and a docstring that only mentions torchrun are not."""
    path = tmp_path / "test_sample.py"
    path.write_text(
        '''
import subprocess, sys
import pytest

def _launch(*args):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", *args])

def _twice(*args):
    _launch(*args)
    _launch(*args)

def test_direct():
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "x.py"])

def test_through_helpers():
    _twice("x.py")

def test_shell_line():
    subprocess.run("torchrun --nproc-per-node 2 x.py", shell=True)

@pytest.mark.serial
def test_marked():
    _launch("x.py")

def test_only_mentions():
    """Like torchrun, but one process: torch.distributed.run is not started."""
    subprocess.run([sys.executable, "x.py"])
'''
    )
    assert torchrun_tests_without_the_marker(path) == ["test_direct", "test_shell_line", "test_through_helpers"]
    path.write_text(path.read_text().replace("import pytest\n", "import pytest\npytestmark = [pytest.mark.serial]\n"))
    assert torchrun_tests_without_the_marker(path) == []
