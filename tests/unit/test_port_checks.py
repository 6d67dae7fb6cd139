"""`fab health`'s port checks (deploy/plan/health.py port_checks): in production a database or broker port on
a public interface is a FAILURE whatever PUBLISH_INFRA says; loopback and (on a data host) private addresses
pass."""

from __future__ import annotations

import pytest

from deploy.core.settings import load_settings
from deploy.plan.health import parse_listeners, port_checks
from deploy.stack.render import Target
from test_stack import FIXTURES

SS = """LISTEN 0 4096 0.0.0.0:3000 0.0.0.0:*
LISTEN 0 4096 0.0.0.0:3001 0.0.0.0:*
LISTEN 0 4096 0.0.0.0:5000 0.0.0.0:*
LISTEN 0 4096 0.0.0.0:8001 0.0.0.0:*
LISTEN 0 4096 127.0.0.1:6379 0.0.0.0:*
LISTEN 0 4096 127.0.0.1:8086 0.0.0.0:*
"""


def checks(listeners_text: str, kind: str = "production", publish: str = "loopback", alias: str = "web1"):
    settings = load_settings("prod", directory=FIXTURES, overrides={"ENV_KIND": kind, "PUBLISH_INFRA": publish})
    target = Target.of(settings, alias, "10.0.0.11", data_address="10.0.0.11")
    return {c.name: c for c in port_checks(alias, settings, target, parse_listeners(listeners_text))}


@pytest.mark.parametrize("listener,port", [("0.0.0.0:5432", 5432), ("[::]:6379", 6379), ("203.0.113.7:27017", 27017),
                                           ("*:1883", 1883), ("10.0.0.11:8086", 8086)])
def test_a_database_or_broker_port_on_a_public_interface_fails_in_production(listener, port):
    for publish in ("loopback", "all", "none"):  # even PUBLISH_INFRA=all does not make it acceptable
        result = checks(SS + f"LISTEN 0 4096 {listener} 0.0.0.0:*\n", publish=publish)[f"port.{port}"]
        assert result.status == "fail", (publish, result)
        assert "listens on a public interface" in result.detail


def test_loopback_passes_and_all_is_only_a_warning_outside_production():
    result = checks(SS)
    assert result["port.6379"].status == "pass" and result["port.8086"].status == "pass"
    assert result["port.5432"].status == "pass"  # not listening at all
    staging = checks(SS + "LISTEN 0 4096 0.0.0.0:5432 0.0.0.0:*\n", kind="staging", publish="all")["port.5432"]
    assert staging.status == "warn"
    staging = checks(SS + "LISTEN 0 4096 0.0.0.0:5432 0.0.0.0:*\n", kind="staging", publish="loopback")["port.5432"]
    assert staging.status == "fail"


def test_a_data_host_may_publish_on_its_private_address_only():
    settings = load_settings("prod", directory=FIXTURES,
                             overrides={"HOSTS": "db1,web1", "ROLES": "db1=data,web1=app", "TOPOLOGY": "shared"})
    target = Target.of(settings, "db1", "10.0.0.10")
    private = {c.name: c for c in port_checks("db1", settings, target,
                                              parse_listeners("LISTEN 0 4096 10.0.0.10:5432 0.0.0.0:*\n"))}
    assert private["port.5432"].status == "pass"
    public = {c.name: c for c in port_checks("db1", settings, target,
                                             parse_listeners("LISTEN 0 4096 93.184.216.34:5432 0.0.0.0:*\n"))}
    assert public["port.5432"].status == "fail"
