"""The checkout's ssh_config/known_hosts list every running sandbox host and testbed node, whichever worker
wrote last (pytest-xdist workers bring up sandbox hosts and testbed nodes at the same time)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from deploy.sandbox import hosts, netns


@dataclass
class FakeTarget:
    name: str
    address: str


def test_a_writer_that_listed_before_another_came_up_does_not_drop_its_entries(tmp_path, monkeypatch):
    sandbox_host, node = FakeTarget("sandbox5", "127.0.0.6"), FakeTarget("node4", "10.251.0.5")
    running_nodes: list = []
    listing = threading.Event()

    seen_by_first: list = []

    def running_hosts(state_dir):
        if threading.current_thread().name == "sandbox-up":
            seen_by_first[:] = list(running_nodes)  # what runs when it looks: no node yet
            listing.set()
            time.sleep(0.5)  # the testbed worker brings its node up and writes meanwhile
        return [sandbox_host]

    def nodes():
        return list(seen_by_first if threading.current_thread().name == "sandbox-up" else running_nodes)

    monkeypatch.setattr(hosts, "running_hosts", running_hosts)
    monkeypatch.setattr(netns, "running_nodes", nodes)
    monkeypatch.setattr(hosts, "ssh_config", lambda targets, state_dir: "".join(f"Host {t.name}\n" for t in targets))
    monkeypatch.setattr(hosts, "known_hosts_lines", lambda targets, state_dir: [f"{t.address} key" for t in targets])

    def testbed_up():
        listing.wait(5)
        running_nodes.append(node)
        hosts.write_client_files(tmp_path)

    first = threading.Thread(target=lambda: hosts.write_client_files(tmp_path), name="sandbox-up")
    second = threading.Thread(target=testbed_up, name="testbed-up")
    first.start()
    second.start()
    first.join(10)
    second.join(10)
    assert (tmp_path / "ssh_config").read_text() == "Host node4\nHost sandbox5\n"
    assert (tmp_path / "known_hosts").read_text() == "10.251.0.5 key\n127.0.0.6 key\n"


def test_workers_starting_at_once_share_one_client_key(tmp_path):
    """On a fresh clone every worker asks for the client key at once: one key, authorised as it is."""
    seen: list[str] = []
    errors: list[BaseException] = []

    def ask():
        try:
            seen.append(hosts.ensure_client_key(tmp_path).read_text())
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors and len(seen) == 6
    assert len(set(seen)) == 1, "two workers made two keys"
    assert (tmp_path / "authorized_keys").read_text() == seen[0] == (tmp_path / "id_ed25519.pub").read_text()
