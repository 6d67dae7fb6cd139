"""The project rule: only deploy/execute/ runs processes or talks SSH (subprocess, paramiko, fabric)."""

from __future__ import annotations

import ast
from pathlib import Path

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
FORBIDDEN = {"subprocess", "paramiko", "fabric"}
# The sample application runs inside the images, not in healthdeploy.
EXEMPT = (DEPLOY / "execute", DEPLOY / "sandbox" / "app")


def test_only_execute_imports_subprocess_paramiko_or_fabric():
    offenders = []
    for path in DEPLOY.rglob("*.py"):
        if any(path.is_relative_to(d) for d in EXEMPT):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.relative_to(DEPLOY.parent)}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert offenders == []


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def test_plan_is_pure():
    """plan/ decides; it never runs anything, so it imports neither execute/ nor any I/O module."""
    offenders = [f"{p.relative_to(DEPLOY.parent)}: {n}" for p in (DEPLOY / "plan").rglob("*.py") for n in _imports(p)
                 if n.startswith("deploy.execute") or n.split(".")[0] in FORBIDDEN | {"socket", "urllib", "http"}]
    assert offenders == []


def test_facts_and_commands_only_build_and_parse():
    offenders = [f"{p.relative_to(DEPLOY.parent)}: {n}" for d in ("facts", "commands", "stack", "core")
                 for p in (DEPLOY / d).rglob("*.py") for n in _imports(p)
                 if n.startswith(("deploy.execute", "deploy.cli")) or n.split(".")[0] in FORBIDDEN | {"socket"}]
    assert offenders == []
