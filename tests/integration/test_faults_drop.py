"""Deploys broken on purpose, its SSH connection dropped, at each of the 8 phase boundaries of fault_suite.POINTS, under HTTP
load through the gateway (real sshd, Docker, PostgreSQL, nginx). The suite prints its table (point, action,
requests sent, failed, recovery) at the end; see fault_suite.py for what each case checks.
"""

from __future__ import annotations

import pytest

from fault_suite import POINTS, print_table, run_case, start_env

TABLE: list[tuple] = []


@pytest.fixture(scope="module")
def env(sandbox_hosts, tmp_path_factory):
    from sandbox_env import _cleanup

    env = start_env(tmp_path_factory, "fltd")
    yield env
    _cleanup(env)
    print_table(TABLE)


@pytest.mark.parametrize("point,changed", POINTS, ids=[p for p, _ in POINTS])
def test_a_deploy_cut_at_any_point_leaves_the_old_release_and_the_next_deploy_works(env, point, changed):
    run_case(env, point, changed, "drop", TABLE)
