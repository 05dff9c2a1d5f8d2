"""The package layering: a lower layer never imports a higher one.

core (kd.core, kd.v1)  <-  teacher_server, cache  <-  student_trainer  <-  app (CLI, benches, demos).
The server and the cache never import each other. Imports are read from the
source with ``ast`` (also those inside functions), so a lazy import up the
stack fails here as well.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {
    "kd.cache": ROOT / "cache",
    "kd.teacher_server": ROOT / "teacher_server",
    "kd.student_trainer": ROOT / "student_trainer",
    "kd": ROOT / "kd",
}
LAYER = {"kd.core": 0, "kd.v1": 0, "kd.teacher_server": 1, "kd.cache": 1, "kd.student_trainer": 2}
APP = 3  # every other kd module: cli, bench, demos, precompute, chain, models
# Pairs on the same layer that must not import each other.
SIBLINGS = {("kd.teacher_server", "kd.cache"), ("kd.cache", "kd.teacher_server")}


def _package_of(module: str) -> str:
    for pkg in LAYER:
        if module == pkg or module.startswith(pkg + "."):
            return pkg
    return "kd"


def _layer(module: str) -> int:
    pkg = _package_of(module)
    if module == "kd" or module == "kd.__version__":  # the root holds only the version
        return 0
    return LAYER.get(pkg, APP)


def _modules() -> list[tuple[str, Path]]:
    out = []
    for prefix, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out.append((".".join([prefix, *parts]), path))
    return out


def _imports(module: str, path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_pkg else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from kd import cli` imports kd.cli
            found += [f"kd.{a.name}" for a in node.names] if target == "kd" else [target]
    return [m for m in found if m == "kd" or m.startswith("kd.")]


def _violations() -> list[str]:
    bad = []
    for module, path in _modules():
        here, pkg = _layer(module), _package_of(module)
        for target in _imports(module, path):
            if target == "kd":
                continue
            there = _layer(target)
            if there > here:
                bad.append(f"{module} (layer {here}) imports {target} (layer {there})")
            elif (pkg, _package_of(target)) in SIBLINGS:
                bad.append(f"{module} imports its sibling {target}")
    return bad


def test_no_layer_imports_a_higher_one() -> None:
    assert _violations() == []


def test_the_walker_sees_an_upward_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check itself can fail: a core module that imports the server is reported."""
    core = tmp_path / "kd" / "core"
    core.mkdir(parents=True)
    (core / "bad.py").write_text("def f():\n    from kd.teacher_server import loading\n")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "x.py").write_text("from ..teacher_server import client\n")
    monkeypatch.setitem(FOLDERS, "kd", tmp_path / "kd")
    monkeypatch.setitem(FOLDERS, "kd.cache", tmp_path / "cache")
    monkeypatch.setitem(FOLDERS, "kd.teacher_server", tmp_path / "none")
    monkeypatch.setitem(FOLDERS, "kd.student_trainer", tmp_path / "none")
    assert sorted(_violations()) == [
        "kd.cache.x imports its sibling kd.teacher_server",
        "kd.core.bad (layer 0) imports kd.teacher_server (layer 1)",
    ]


def test_a_cache_folder_in_the_working_directory_does_not_shadow_kd(tmp_path: Path) -> None:
    """``python -m kd`` in a directory that holds ``cache/`` and ``teacher_server/`` folders."""
    import os
    import subprocess
    import sys

    for name in ("cache", "teacher_server", "student_trainer"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("raise ImportError('shadowed')\n")
    code = "import kd.cache.store, kd.teacher_server.client, kd.student_trainer.sources; print('ok')"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
