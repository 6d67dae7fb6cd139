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
