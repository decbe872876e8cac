"""The restart policy rules (docker's), without a daemon."""

from __future__ import annotations

import pytest

from runtimed.errors import InvalidArgument
from runtimed.restart.policy import Backoff, Policy, policy_of, should_restart


def test_parse_and_reject():
    assert Policy.parse("on-failure:3") == Policy("on-failure", 3)
    assert str(Policy.parse("unless-stopped")) == "unless-stopped"
    for bad in ("sometimes", "always:2", "on-failure:x"):
        with pytest.raises(InvalidArgument):
            Policy.parse(bad)


def test_decisions():
    always, unless, fail2 = Policy("always"), Policy("unless-stopped"), Policy("on-failure", 2)
    assert should_restart(always, 0, 10, stopped=False)
    assert not should_restart(always, 0, 0, stopped=True)
    assert should_restart(always, 0, 0, stopped=True, at_boot=True)
    assert not should_restart(unless, 0, 0, stopped=True, at_boot=True)
    assert should_restart(fail2, 1, 1, stopped=False)
    assert not should_restart(fail2, 1, 2, stopped=False)
    assert not should_restart(fail2, 0, 0, stopped=False)
    assert not should_restart(Policy("no"), 1, 0, stopped=False)


def test_containerd_labels_and_bad_labels():
    assert policy_of({"containerd.io/restart.status": "running"}) == Policy("always")
    assert policy_of({"containerd.io/restart.status": "running",
                      "containerd.io/restart.policy": "on-failure:1"}) == Policy("on-failure", 1)
    assert policy_of({"io.runtimed.restart-policy": "bogus"}) == Policy("no")


def test_backoff_doubles_and_resets_after_a_long_run():
    b = Backoff()
    assert [b.next(0.1) for _ in range(4)] == [0.1, 0.2, 0.4, 0.8]
    assert b.next(12.0) == 0.1
    for _ in range(20):
        b.next(0)
    assert b.delay == 60.0


def test_ps_status_while_the_daemon_waits_to_restart():
    from types import SimpleNamespace

    from ctl.commands.containers import _status

    labels = {"io.runtimed.restarting": "true", "io.runtimed.exit-code": "3",
              "io.runtimed.exited-at": "2020-01-01T00:00:00.000000Z"}
    state, text = _status(SimpleNamespace(labels=labels), None)
    assert state == "restarting" and text.startswith("Restarting (3) ")
    state, text = _status(SimpleNamespace(labels={"io.runtimed.exit-code": "3"}), None)
    assert state == "exited" and text.startswith("Exited (3)")
