"""Host tier: what its runs leave on the machine is taken back at the end.

A test that dumps a connection to an outside peer and never restores it
(a refusal at restore is the point of some) leaves its network lock: an
nftables table dropping that 4-tuple, on purpose (engine/netlock.py). Left
on the host, it would silence a later connection that happens to reuse the
same ephemeral ports. The run's controller (xdist's, or the only process)
removes every lock that appeared during the run once all its tests are done;
a worker does not, since another worker's test may be holding one."""

from __future__ import annotations

_before = None


def pytest_sessionstart(session):
    global _before
    if not hasattr(session.config, "workerinput"):
        from engine import netlock
        _before = netlock.held()


def pytest_sessionfinish(session, exitstatus):
    if _before is None or hasattr(session.config, "workerinput"):
        return
    from engine import netlock
    for name in sorted(netlock.held() - _before):
        netlock.unlock(name)
