"""The etcd ownership arbiter against real etcd clusters (no mocks).

Leases are 1 s (the minimum etcd grants with the helper's 50/500 ms timing) unless a
test needs more room, so expiries take about a second.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import etcd3gw
import pytest
import trio
from etcd3gw.lease import Lease

from tremus.arbiters import (
    ArbiterUnreachable,
    ArbiterURLError,
    Endpoint,
    EtcdOwnership,
    Ownership,
    OwnershipError,
    OwnershipLost,
    OwnershipRefused,
    open_arbiter,
    parse_arbiter_url,
)
from tremus.testing.etcd import EtcdCluster, FreezableProxy, require_etcd

_no_etcd = require_etcd()
needs_etcd = pytest.mark.skipif(_no_etcd is not None, reason=_no_etcd or "")


# --- URLs (no etcd needed) -----------------------------------------------------------------


def test_parse_cluster_urls() -> None:
    target = parse_arbiter_url("etcd://10.0.0.1:2379,etcd-b:2380,[::1]:23790,solo")
    assert target.protocol == "http"
    assert target.endpoints == (
        Endpoint("10.0.0.1", 2379),
        Endpoint("etcd-b", 2380),
        Endpoint("::1", 23790),
        Endpoint("solo", 2379),
    )
    assert str(target.endpoints[2]) == "[::1]:23790"
    tls = parse_arbiter_url("etcd+https://a:1/?ca=/x/ca.pem&cert=/x/c.pem&key=/x/k.pem")
    assert (tls.protocol, tls.ca_cert, tls.cert_cert, tls.cert_key) == (
        "https", "/x/ca.pem", "/x/c.pem", "/x/k.pem")


@pytest.mark.parametrize(
    ("url", "names"),
    [
        ("http://a:2379", "'http'"),
        ("a:2379", "expected etcd://"),
        ("etcd://", "no endpoint"),
        ("etcd://a:2379,,b:2379", "empty endpoint"),
        ("etcd://a:notaport", "'notaport'"),
        ("etcd://a:70000", "'70000'"),
        ("etcd://a:2379/prefix", "no path"),
        ("etcd://user@a:2379", "credentials"),
        ("etcd://[::1:2379", "'[::1:2379'"),
        ("etcd://::1:2379", "bracket IPv6"),
        ("etcd://a:1,a:1", "twice"),
        ("etcd://a:1?ca=/x", "etcd+https"),
        ("etcd+https://a:1?bogus=1", "'bogus'"),
        ("etcd+https://a:1?cert=/c", "together"),
    ],
)
def test_malformed_urls_name_the_bad_part(url: str, names: str) -> None:
    with pytest.raises(ArbiterURLError, match=re.escape(names)):
        open_arbiter(url, key="g", me="a")
    assert issubclass(ArbiterURLError, ValueError)
    assert issubclass(ArbiterURLError, OwnershipError)


def test_implements_the_protocol() -> None:
    side = open_arbiter("etcd://127.0.0.1:1", key="g", me="a", lease_ttl=1.5)
    assert isinstance(side, Ownership)
    assert (side.key, side.me, side.url) == ("g", "a", "etcd://127.0.0.1:1")
    assert side.lease_ttl == 2.0  # whole seconds, rounded up
    assert not side.may_release()


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[EtcdCluster]:
    """A three-member cluster shared by the tests that do not break it."""
    if _no_etcd:
        pytest.skip(_no_etcd)
    with EtcdCluster(3) as shared:
        yield shared


@pytest.fixture
def key() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def sides(cluster: EtcdCluster, key: str) -> AsyncIterator[dict[str, EtcdOwnership]]:
    """Three sides of one guest: A (the primary), B (its backup), C (a stranger)."""
    handles = {me: open_arbiter(cluster.url, key=key, me=me, lease_ttl=1) for me in "ABC"}
    try:
        yield handles
    finally:
        for handle in handles.values():
            await handle.aclose()


async def _gone(observer: EtcdOwnership, *, timeout: float) -> float:
    """Wait until the owner key is gone; returns when (time.monotonic())."""
    with trio.fail_after(timeout):
        while (await observer.inspect()).owner is not None:
            await trio.sleep(0.05)
    return time.monotonic()


async def _held_throughout(side: EtcdOwnership, seconds: float) -> None:
    """``may_release()`` stays true (sampled every 20 ms) and ``lost`` stays clear."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert side.may_release(), side.lost_reason
        assert not side.lost.is_set(), side.lost_reason
        await trio.sleep(0.02)


# --- the protocol on a healthy cluster ------------------------------------------------------


@needs_etcd
async def test_acquire_keep_and_may_release(sides: dict[str, EtcdOwnership]) -> None:
    a, observer = sides["A"], sides["C"]
    assert not a.may_release()
    await a.acquire(wait=1)
    assert a.lease_ttl == 1.0  # the minimum etcd grants with 50/500 ms timing
    assert a.may_release()
    record = await observer.inspect()
    assert (record.owner, record.owner_lease, record.standby) == ("A", a.lease_id, None)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.keep)
        await _held_throughout(a, 2 * a.lease_ttl)  # past one TTL: renewed
        nursery.cancel_scope.cancel()
    # Without renewals the promise runs out before the lease can expire on the server.
    with trio.fail_after(a.lease_ttl):
        while a.may_release():
            await trio.sleep(0.02)
    assert (await observer.inspect()).owner == "A"  # etcd still has it: we were early
    await _gone(observer, timeout=3)
    assert not a.lost.is_set()  # nobody ran keep(): nothing to report


@needs_etcd
async def test_second_owner_refused_while_the_first_holds(
        sides: dict[str, EtcdOwnership]) -> None:
    a, b = sides["A"], sides["B"]
    await a.acquire(wait=0)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.keep)
        t0 = time.monotonic()
        with pytest.raises(OwnershipRefused, match="owned by A"):
            await b.acquire(wait=1.5)  # longer than a TTL: A's renewals keep it
        assert time.monotonic() - t0 >= 1.5
        assert not b.may_release()
        # A graceful end frees it at once (no waiting for an expiry).
        await a.designate("B")
        nursery.cancel_scope.cancel()
    await a.resign()
    assert not a.may_release()
    record = await b.inspect()
    assert (record.owner, record.standby) == (None, None)
    with trio.fail_after(0.5):
        await b.acquire(wait=0)
    assert b.may_release()
    await b.resign()


@needs_etcd
async def test_acquire_waits_for_an_expiring_owner(sides: dict[str, EtcdOwnership]) -> None:
    a, b = sides["A"], sides["B"]
    await a.acquire(wait=0)
    await a.designate("C")
    # A "crashes" (never renews): B gets it once A's lease expired, within the wait.
    t0 = time.monotonic()
    await b.acquire(wait=5)
    assert 0.3 < time.monotonic() - t0 < 3
    record = await b.inspect()
    # A fresh owner starts without the previous owner's standby.
    assert (record.owner, record.owner_lease, record.standby) == ("B", b.lease_id, None)
    with pytest.raises(OwnershipRefused, match="standby is none"):
        await sides["C"].take_over(wait=0)


@needs_etcd
async def test_designated_standby_takes_over_when_the_owner_stops(
        sides: dict[str, EtcdOwnership]) -> None:
    a, b, c = sides["A"], sides["B"], sides["C"]
    await a.acquire(wait=0)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.keep)
        await a.designate("B")
        assert (await c.inspect()).standby == "B"
        # The owner holds it: the standby waits, then is refused.
        with pytest.raises(OwnershipRefused, match="A still holds"):
            await b.take_over(wait=0.3)
        # Someone not designated is refused at once.
        t0 = time.monotonic()
        with pytest.raises(OwnershipRefused, match="standby is B"):
            await c.take_over(wait=5)
        assert time.monotonic() - t0 < 1
        nursery.cancel_scope.cancel()  # A stops renewing
    t0 = time.monotonic()
    await b.take_over(wait=5)
    assert time.monotonic() - t0 < 3
    record = await c.inspect()
    assert (record.owner, record.owner_lease, record.standby) == ("B", b.lease_id, None)
    # The stale owner learns it at its next guarded change.
    with pytest.raises(OwnershipLost, match="owner: B"):
        await a.designate("C")
    with pytest.raises(OwnershipLost):
        await a.drop_standby()
    assert not a.may_release()
    # The new owner keeps its lease like any owner, and runs the record now.
    async with trio.open_nursery() as nursery:
        await nursery.start(b.keep)
        await b.designate("C")
        await _held_throughout(b, 2 * b.lease_ttl)
        nursery.cancel_scope.cancel()
    assert (await c.inspect()).standby == "C"
    await b.resign()
    assert (await c.inspect()).owner is None


@needs_etcd
async def test_drop_standby_refuses_any_later_take_over(sides: dict[str, EtcdOwnership]) -> None:
    a, b, observer = sides["A"], sides["B"], sides["C"]
    await a.acquire(wait=0)
    await a.designate("B")
    await a.drop_standby()
    await a.drop_standby()  # idempotent
    assert (await observer.inspect()).standby is None
    # A stops renewing here. B is refused at once, not after waiting for the expiry...
    t0 = time.monotonic()
    with pytest.raises(OwnershipRefused, match="standby is none.*without this backup"):
        await b.take_over(wait=5)
    assert time.monotonic() - t0 < 1
    # ...and still after the lease expired.
    await _gone(observer, timeout=3)
    with pytest.raises(OwnershipRefused, match="standby is none"):
        await b.take_over(wait=0.3)
    assert not b.may_release()
    # An owner whose lease expired cannot change the record either.
    with pytest.raises(OwnershipLost, match="owner: none"):
        await a.designate("B")


@needs_etcd
async def test_keep_reports_a_lease_gone_in_etcd(
        cluster: EtcdCluster, sides: dict[str, EtcdOwnership]) -> None:
    a = sides["A"]
    await a.acquire(wait=0)
    lease = a.lease_id
    assert lease is not None
    async with trio.open_nursery() as nursery:
        await nursery.start(a.keep)
        # Someone revokes the lease behind A's back: the next renewal says so.
        host, _, port = cluster.endpoints[0].partition(":")
        stranger = etcd3gw.client(host=host, port=int(port), api_path="/v3/", timeout=2)
        await trio.to_thread.run_sync(Lease(lease, stranger).revoke)
        stranger.session.close()
        with trio.fail_after(1):
            await a.lost.wait()
    assert not a.may_release()
    assert "gone" in a.lost_reason


# --- failures -------------------------------------------------------------------------------


@needs_etcd
async def test_works_with_one_member_killed() -> None:
    async with EtcdCluster(3) as c:
        # The killed member comes first in the URLs: every side must move on from it.
        leader = c.leader()
        order = [leader] + [i for i in range(3) if i != leader]
        url = c.url_of(*order)
        # Leases long enough to outlive an election on a loaded two-core machine.
        a = open_arbiter(url, key="g", me="A", lease_ttl=4)
        b = open_arbiter(url, key="g", me="B", lease_ttl=4)
        try:
            await a.acquire(wait=0)
            async with trio.open_nursery() as nursery:
                await nursery.start(a.keep)
                c.kill(leader)  # a new election, and a dead first endpoint
                await _held_throughout(a, 2)
                await a.designate("B")
                nursery.cancel_scope.cancel()
            await b.take_over(wait=10)
            async with trio.open_nursery() as nursery:
                await nursery.start(b.keep)
                await _held_throughout(b, 1)
                with pytest.raises(OwnershipLost):
                    await a.drop_standby()
                nursery.cancel_scope.cancel()
            await b.resign()
            # The member comes back on its data and knows what happened meanwhile.
            c.restart(leader)
            solo = open_arbiter(c.url_of(leader), key="g", me="D", lease_ttl=1)
            try:
                assert (await solo.inspect()).owner is None
            finally:
                await solo.aclose()
        finally:
            await a.aclose()
            await b.aclose()


@needs_etcd
async def test_partitioned_owner_loses_before_etcd_expires_it(
        cluster: EtcdCluster, key: str) -> None:
    """Cut the owner off (a frozen relay): ``lost`` fires while etcd still has its key."""
    member = cluster.members[0]
    proxy = FreezableProxy(member.host, member.client_port)
    async with trio.open_nursery() as outer:
        await outer.start(proxy.serve)
        a = open_arbiter(f"etcd://{proxy.endpoint}", key=key, me="A", lease_ttl=1)
        observer = open_arbiter(cluster.url, key=key, me="C", lease_ttl=1)
        try:
            await a.acquire(wait=0)
            async with trio.open_nursery() as nursery:
                await nursery.start(a.keep)
                await _held_throughout(a, 0.6)
                frozen_at = time.monotonic()
                proxy.freeze()
                with trio.fail_after(2 * a.lease_ttl):
                    await a.lost.wait()
                lost_at = time.monotonic()
                assert not a.may_release()
                # Seen from the healthy side right after: the lease is still alive.
                record = await observer.inspect()
                assert (record.owner, record.owner_lease) == ("A", a.lease_id)
                assert lost_at - frozen_at < a.lease_ttl
                assert "not renewed in time" in a.lost_reason
            # Guarded changes fail in bounded time while cut off.
            t0 = time.monotonic()
            with pytest.raises(ArbiterUnreachable):
                await a.drop_standby()
            assert time.monotonic() - t0 < 2.5
            # ...and the lease does expire on the server afterwards.
            expired_at = await _gone(observer, timeout=3)
            assert expired_at > lost_at
            assert not a.may_release()
        finally:
            proxy.thaw()
            await a.aclose()
            await observer.aclose()
            outer.cancel_scope.cancel()


@needs_etcd
async def test_whole_cluster_stopped_sets_lost_in_time() -> None:
    """SIGSTOP every member: ``lost`` fires, and after SIGCONT the key was still there."""
    async with EtcdCluster(3) as c:
        a = open_arbiter(c.url, key="g", me="A", lease_ttl=2)
        observer = open_arbiter(c.url, key="g", me="C", lease_ttl=2)
        try:
            await a.acquire(wait=0)
            async with trio.open_nursery() as nursery:
                await nursery.start(a.keep)
                await _held_throughout(a, 0.6)
                stopped_at = time.monotonic()
                c.stop_all()
                try:
                    with trio.fail_after(a.lease_ttl):
                        await a.lost.wait()
                    lost_at = time.monotonic()
                    assert not a.may_release()
                finally:
                    c.resume_all()
            # Frozen servers could not expire anything; resumed at once, they still have
            # the key: A gave up before its lease could have run out.
            with trio.fail_after(0.4):
                record = await observer.inspect()
            assert (record.owner, record.owner_lease) == ("A", a.lease_id)
            assert stopped_at <= lost_at < stopped_at + a.lease_ttl
            assert not a.may_release()
        finally:
            await a.aclose()
            await observer.aclose()


@needs_etcd
async def test_unreachable_arbiter_is_a_bounded_error() -> None:
    async with EtcdCluster(1) as c:
        url = c.url
    side = open_arbiter(url, key="g", me="A", lease_ttl=1)  # nobody listens there now
    try:
        t0 = time.monotonic()
        with pytest.raises(ArbiterUnreachable, match="unreachable"):
            await side.acquire(wait=0.2)
        with pytest.raises(ArbiterUnreachable):
            await side.take_over(wait=0)
        assert time.monotonic() - t0 < 5
    finally:
        await side.aclose()


@needs_etcd
async def test_tls(tmp_path: object) -> None:
    trustme = pytest.importorskip("trustme")
    import pathlib

    assert isinstance(tmp_path, pathlib.Path)
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    ca_path, cert_path, key_path = (tmp_path / n for n in ("ca.pem", "cert.pem", "key.pem"))
    ca.cert_pem.write_to_path(str(ca_path))
    server.cert_chain_pems[0].write_to_path(str(cert_path))
    server.private_key_pem.write_to_path(str(key_path))
    async with EtcdCluster(1, tls_cert=str(cert_path), tls_key=str(key_path),
                           tls_ca=str(ca_path)) as c:
        assert c.url.startswith("etcd+https://")
        a = open_arbiter(c.url, key="g", me="A", lease_ttl=1)
        try:
            await a.acquire(wait=0)
            async with trio.open_nursery() as nursery:
                await nursery.start(a.keep)
                await _held_throughout(a, 1)
                nursery.cancel_scope.cancel()
            await a.resign()
        finally:
            await a.aclose()
        # Without the CA the server's certificate is not trusted.
        untrusted = open_arbiter("etcd+https://" + c.endpoints[0], key="g", me="A",
                                 lease_ttl=1)
        try:
            with pytest.raises(OwnershipError):
                await untrusted.acquire(wait=0)
        finally:
            await untrusted.aclose()


@needs_etcd
@pytest.mark.netns
def test_cluster_in_namespaces() -> None:
    from tremus.testing.topology import Topology, require_root

    why = require_root()
    if why:
        pytest.skip(why)
    with Topology(("e1", "e2", "e3", "client")) as topo, \
            EtcdCluster(topo, hosts=("e1", "e2", "e3")) as c:
        assert c.url == "etcd://10.77.0.10:2379,10.77.0.11:2379,10.77.0.12:2379"
        leader = c.leader()
        c.kill(leader)
        survivors = [i for i in range(3) if i != leader]
        c.wait_healthy(survivors, timeout=5)
        assert c.leader() in survivors
