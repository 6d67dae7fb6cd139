"""Fabric glue: run each healthdeploy task once for all ``-H`` hosts instead of once per host.

Fabric's own executor calls a task per host, which cannot stop at the first failed host, order the
primary host first, or migrate exactly once. ``fabric.yaml`` selects this executor.
"""

from __future__ import annotations

from fabric.executor import Executor


class FleetExecutor(Executor):
    def expand_calls(self, calls, apply_hosts=True):
        if apply_hosts:  # the top-level call; Fabric recurses for pre/post tasks with apply_hosts=False
            host_str = self.core[0].args.hosts.value
            hosts = [h.strip() for h in host_str.split(",") if h.strip()] if host_str else []
            # `fab -H x exec backend -- cmd`: the words after -- belong to our exec task, not to
            # Fabric's anonymous per-host command.
            remainder = self.core.remainder
            self.core.remainder = ""
            self.config.load_overrides({"healthdeploy": {"hosts": hosts, "remainder": remainder}}, merge=True)
        return super().expand_calls(calls, apply_hosts=False)


def cli_hosts(context) -> list[str]:
    try:
        return list(context.config.healthdeploy.hosts)
    except AttributeError:
        return []


def remainder(context) -> str:
    try:
        return context.config.healthdeploy.remainder or ""
    except AttributeError:
        return ""


def remainder_words(argv: list[str] | None = None) -> list[str]:
    """The words after ``--`` exactly as the operator's shell split them (Fabric's remainder is one string
    joined with spaces, which loses the quoting)."""
    import sys

    argv = sys.argv if argv is None else argv
    return list(argv[argv.index("--") + 1:]) if "--" in argv else []
