"""Ownership kept as an etcd lease, through etcd's v3 gRPC-JSON gateway (``etcd3gw``).

The record of a guest ``KEY`` is two keys::

    /tremus/KEY/owner     the owner's identity, attached to the owner's lease
    /tremus/KEY/standby   the one backup that may take over (a plain key, no lease)

Every change is a transaction guarded by a compare, so the two sides never need
to trust each other's view: the owner changes the standby only while
``owner == me``; a backup becomes the owner only while the owner key is absent
(its lease expired) *and* the standby key names it.

Timing. etcd expires a lease ``TTL`` seconds after the last renewal it *received*;
a renewal is received after it was *sent*, so ``sent + TTL`` is a lower bound of
the server's expiry that needs no clock agreement between the hosts. The owner
trusts its lease until ``sent + TTL - margin`` of its last successful renewal
(:meth:`EtcdOwnership.may_release`), and :meth:`EtcdOwnership.keep` sets ``lost``
when that point comes without a newer successful renewal - before the lease can
be gone on the server.

The client is ``etcd3gw`` (synchronous, on ``requests``): each request runs in a
Trio worker thread that Trio abandons on cancellation, each has its own timeout,
and each connection (``Etcd3Client`` with its own ``requests.Session``) serves one
request at a time - an abandoned request closes its connection when it ends.
"""

from __future__ import annotations

import base64
import math
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar, final

import requests
import trio
from etcd3gw import exceptions as etcd_exc
from etcd3gw.client import Etcd3Client

from tremus.engine.ownership import OwnershipError, OwnershipLost, OwnershipRefused

__all__ = [
    "ArbiterTarget",
    "ArbiterURLError",
    "ArbiterUnreachable",
    "Endpoint",
    "EtcdOwnership",
    "OwnershipRecord",
    "open_arbiter",
    "parse_arbiter_url",
]

_T = TypeVar("_T")

#: etcd 3.4+ serves the v3 gateway under /v3/ (3.3: /v3beta/); fixed, so no discovery
#: round trip (which would be one more request without our endpoint fail-over).
_API_PATH: Final = "/v3/"
_DEFAULT_PORT: Final = 2379
#: How often a waiting acquire/take_over looks at the record again.
_POLL: Final = 0.1
#: Pause after every endpoint of the cluster failed once, before trying them again.
_ROUND_PAUSE: Final = 0.05
#: Errors on which the next endpoint may answer: the member is down, hung, has no
#: leader yet (503) or timed out internally (504), or broke the reply.
_RETRIABLE: Final = (
    etcd_exc.ConnectionFailedError,
    etcd_exc.ConnectionTimeoutError,
    etcd_exc.InternalServerError,
    requests.RequestException,
    ValueError,  # a truncated JSON reply
    KeyError,
)


@final
class ArbiterURLError(OwnershipError, ValueError):
    """An arbiter URL that cannot be used; the message names the bad part."""


@final
class ArbiterUnreachable(OwnershipError):
    """No member of the etcd cluster answered in time."""


@final
@dataclass(frozen=True)
class Endpoint:
    """One etcd member's client address."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@final
@dataclass(frozen=True)
class ArbiterTarget:
    """A parsed arbiter URL: the members and how to talk to them."""

    endpoints: tuple[Endpoint, ...]
    protocol: str = "http"
    #: CA bundle for ``https`` (``None``: the system's), client certificate and key.
    ca_cert: str | None = None
    cert_cert: str | None = None
    cert_key: str | None = None


def parse_arbiter_url(url: str) -> ArbiterTarget:
    """Parse ``etcd://HOST[:PORT][,HOST[:PORT]...]``.

    ``etcd+https://`` speaks TLS; its query may give ``ca=PATH`` (CA bundle, else the
    system's), ``cert=PATH`` and ``key=PATH`` (client certificate). IPv6 hosts are
    bracketed. The port defaults to 2379. Raises :class:`ArbiterURLError`.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ArbiterURLError(f"arbiter URL {url!r}: expected etcd://HOST:PORT[,HOST:PORT...]")
    protocols = {"etcd": "http", "etcd+http": "http", "etcd+https": "https"}
    if scheme.lower() not in protocols:
        raise ArbiterURLError(
            f"arbiter URL {url!r}: unknown scheme {scheme!r} (use etcd:// or etcd+https://)"
        )
    protocol = protocols[scheme.lower()]
    netloc, _, query = rest.partition("?")
    if netloc.endswith("/"):
        netloc = netloc[:-1]
    if "/" in netloc or "#" in netloc:
        raise ArbiterURLError(f"arbiter URL {url!r}: no path allowed after the endpoints")
    if "@" in netloc:
        raise ArbiterURLError(f"arbiter URL {url!r}: credentials in the URL are not supported")
    if not netloc:
        raise ArbiterURLError(f"arbiter URL {url!r}: no endpoint")
    endpoints = tuple(_parse_endpoint(url, part) for part in netloc.split(","))
    if len(set(endpoints)) != len(endpoints):
        raise ArbiterURLError(f"arbiter URL {url!r}: an endpoint is listed twice")
    options: dict[str, str] = {}
    if query:
        try:
            pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=True)
        except ValueError:
            raise ArbiterURLError(f"arbiter URL {url!r}: malformed query {query!r}") from None
        for name, value in pairs:
            if name not in ("ca", "cert", "key"):
                raise ArbiterURLError(f"arbiter URL {url!r}: unknown option {name!r}")
            if not value:
                raise ArbiterURLError(f"arbiter URL {url!r}: option {name!r} is empty")
            options[name] = value
        if protocol != "https":
            raise ArbiterURLError(f"arbiter URL {url!r}: ca/cert/key need etcd+https://")
        if ("cert" in options) != ("key" in options):
            raise ArbiterURLError(f"arbiter URL {url!r}: cert and key go together")
    return ArbiterTarget(
        endpoints,
        protocol,
        ca_cert=options.get("ca"),
        cert_cert=options.get("cert"),
        cert_key=options.get("key"),
    )


def _parse_endpoint(url: str, part: str) -> Endpoint:
    if not part:
        raise ArbiterURLError(f"arbiter URL {url!r}: empty endpoint (a stray comma?)")
    if part.startswith("["):
        host, bracket, tail = part[1:].partition("]")
        if not bracket or not host:
            raise ArbiterURLError(f"arbiter URL {url!r}: bad IPv6 endpoint {part!r}")
        if tail and not tail.startswith(":"):
            raise ArbiterURLError(f"arbiter URL {url!r}: bad endpoint {part!r}")
        port_text = tail[1:] if tail else None
    else:
        host, colon, port_text_ = part.partition(":")
        port_text = port_text_ if colon else None
        if ":" in port_text_:
            raise ArbiterURLError(
                f"arbiter URL {url!r}: bad endpoint {part!r} (bracket IPv6 addresses)"
            )
        if not host or not all(c.isalnum() or c in "-._" for c in host):
            raise ArbiterURLError(f"arbiter URL {url!r}: bad host in endpoint {part!r}")
    if port_text is None:
        return Endpoint(host, _DEFAULT_PORT)
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ArbiterURLError(f"arbiter URL {url!r}: bad port {port_text!r} in {part!r}")
    return Endpoint(host, int(port_text))


@final
class _Flight:
    """One request in a worker thread; whoever finishes last closes an orphaned client."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done = False
        self.abandoned = False


@final
class _Member:
    """One endpoint and its idle connections (each used by one request at a time)."""

    def __init__(self, endpoint: Endpoint, target: ArbiterTarget, timeout: float) -> None:
        self.endpoint = endpoint
        self._target = target
        self._timeout = timeout
        self.idle: list[Etcd3Client] = []

    def checkout(self) -> Etcd3Client:
        if self.idle:
            return self.idle.pop()
        session = requests.Session()
        # The arbiter is reached directly: an HTTP(S)_PROXY meant for other traffic
        # must not sit between the owner and its lease.
        session.trust_env = False
        if self._target.protocol == "https":
            session.verify = self._target.ca_cert or True
            if self._target.cert_cert and self._target.cert_key:
                session.cert = (self._target.cert_cert, self._target.cert_key)
        return Etcd3Client(
            host=self.endpoint.host,
            port=self.endpoint.port,
            protocol=self._target.protocol,
            timeout=self._timeout,
            api_path=_API_PATH,
            session=session,
        )


@final
@dataclass
class _Lease:
    """A lease of ours and the conservative bound on its life."""

    id: int
    ttl: int
    #: ``time.monotonic()`` when the grant or last successful renewal was sent.
    sent: float
    margin: float

    @property
    def valid_until(self) -> float:
        return self.sent + self.ttl - self.margin


@final
@dataclass(frozen=True)
class OwnershipRecord:
    """The owner and standby keys of a guest, as read together at one revision."""

    #: The owner's identity, ``None`` when nobody owns the guest (its lease expired).
    owner: str | None
    #: The owner's lease ID (0 without an owner).
    owner_lease: int
    #: The designated backup, ``None`` when there is none.
    standby: str | None


@final
class EtcdOwnership:
    """:class:`tremus.engine.ownership.Ownership` on an etcd cluster (v3 API via gateway).

    Made by :func:`open_arbiter`. Methods may run concurrently (``keep`` alongside
    ``designate``): each request takes its own connection.
    """

    lost: trio.Event

    def __init__(
        self,
        target: ArbiterTarget,
        *,
        url: str,
        key: str,
        me: str,
        lease_ttl: float = 2.0,
        request_timeout: float | None = None,
    ) -> None:
        if not key or "\0" in key:
            raise ValueError("arbiter key must be a non-empty string")
        if not me or "\0" in me:
            raise ValueError("arbiter identity (me) must be a non-empty string")
        if not lease_ttl > 0:
            raise ValueError("lease_ttl must be positive")
        self._url = url
        self._key = key
        self._me = me
        self._target = target
        # etcd TTLs are whole seconds; the server may grant more (its minimum).
        self._asked_ttl = max(1, math.ceil(lease_ttl))
        self._granted_ttl: int | None = None
        self._request_timeout = (
            request_timeout if request_timeout is not None else min(1.0, max(0.25, lease_ttl / 4))
        )
        self._members = [_Member(ep, target, self._request_timeout) for ep in target.endpoints]
        self._preferred = 0
        self._lease: _Lease | None = None
        self._flights: set[_Flight] = set()
        self._closed = False
        self._lost_reason = ""
        self.lost = trio.Event()
        prefix = f"/tremus/{key}/"
        self._owner_key = prefix + "owner"
        self._standby_key = prefix + "standby"

    # -- the protocol's properties -----------------------------------------------------

    @property
    def key(self) -> str:
        return self._key

    @property
    def me(self) -> str:
        return self._me

    @property
    def url(self) -> str:
        return self._url

    @property
    def lease_ttl(self) -> float:
        """Seconds a lease lives unrenewed: as etcd granted it (its minimum may exceed
        what was asked), or as asked (whole seconds) before the first grant."""
        return float(self._granted_ttl if self._granted_ttl is not None else self._asked_ttl)

    @property
    def lost_reason(self) -> str:
        """Why ``lost`` was set ("" while it is not)."""
        return self._lost_reason

    @property
    def owner_key(self) -> str:
        """The etcd key that names the owner (for tools and tests)."""
        return self._owner_key

    @property
    def standby_key(self) -> str:
        """The etcd key that names the standby (for tools and tests)."""
        return self._standby_key

    @property
    def lease_id(self) -> int | None:
        """This side's lease while it owns the guest (``None`` otherwise)."""
        return self._lease.id if self._lease is not None else None

    def _margin(self, ttl: int) -> float:
        # Room for a late renewal reply and scheduling delays on this side; a
        # quarter of the TTL, at least 0.3 s.
        return max(0.25 * ttl, 0.3)

    # -- requests ----------------------------------------------------------------------

    async def _call(
        self, what: str, fn: Callable[[Etcd3Client], _T], *, timeout: float | None = None
    ) -> tuple[_T, float]:
        """Run ``fn`` on one member after another until one answers.

        Returns the answer and the ``time.monotonic()`` at which the answered request
        was sent (no later than the member received it). Raises ArbiterUnreachable
        after ``timeout`` seconds (default: the request timeout per member, at least
        one lease TTL), OwnershipError if etcd answered with an error.
        """
        if self._closed:
            raise OwnershipError(f"arbiter {self._url} is closed")
        n = len(self._members)
        budget = timeout if timeout is not None else max(self.lease_ttl, self._request_timeout * n)
        budget = max(budget, 0.0)  # a deadline already past (after a stall): give up now
        errors: list[str] = []
        attempt = 0
        with trio.move_on_after(budget):
            while True:
                index = (self._preferred + attempt) % n
                member = self._members[index]
                sent = time.monotonic()
                try:
                    with trio.fail_after(self._request_timeout):
                        result = await self._in_thread(member, fn)
                except (trio.TooSlowError, *_RETRIABLE) as exc:
                    errors.append(f"{member.endpoint}: {_describe(exc)}")
                    attempt += 1
                    if attempt % n == 0:
                        await trio.sleep(_ROUND_PAUSE)
                    continue
                except etcd_exc.Etcd3Exception as exc:
                    raise OwnershipError(
                        f"etcd {member.endpoint} refused {what}: {_describe(exc)}"
                    ) from None
                self._preferred = index
                return result, sent
        raise ArbiterUnreachable(
            f"arbiter {self._url} unreachable for {what} within {budget:.2f} s: "
            + ("; ".join(errors[-n:]) or "no answer")
        )

    async def _in_thread(self, member: _Member, fn: Callable[[Etcd3Client], _T]) -> _T:
        client = member.checkout()
        flight = _Flight()

        def work() -> _T:
            try:
                return fn(client)
            finally:
                with flight.lock:
                    flight.done = True
                    orphan = flight.abandoned
                if orphan:
                    client.session.close()

        self._flights = {f for f in self._flights if not f.done}
        self._flights.add(flight)
        try:
            result = await trio.to_thread.run_sync(work, abandon_on_cancel=True)
        except BaseException:
            # Failed or abandoned: never reuse this connection (its state is unknown).
            with flight.lock:
                close_now = flight.done
                flight.abandoned = True
            if close_now:
                client.session.close()
            raise
        finally:
            if flight.done:
                self._flights.discard(flight)
        if self._closed:
            client.session.close()
        else:
            member.idle.append(client)
        return result

    # -- etcd operations ---------------------------------------------------------------

    async def _grant(self) -> _Lease:
        def grant(client: Etcd3Client) -> dict[str, Any]:
            reply: dict[str, Any] = client.post(
                client.get_url("/lease/grant"), json={"TTL": self._asked_ttl, "ID": 0}
            )
            return reply

        reply, sent = await self._call("a lease grant", grant)
        if reply.get("error"):
            raise OwnershipError(f"etcd at {self._url} refused a lease: {reply['error']}")
        ttl = int(reply["TTL"])
        self._granted_ttl = ttl
        return _Lease(int(reply["ID"]), ttl, sent, self._margin(ttl))

    async def _txn(self, what: str, txn: dict[str, Any], *, timeout: float | None = None
                   ) -> tuple[bool, list[dict[str, Any]]]:
        """Run a transaction; its success flag and the key-values of the failure's ranges."""

        def run(client: Etcd3Client) -> dict[str, Any]:
            return dict(client.transaction(txn))

        reply, _ = await self._call(what, run, timeout=timeout)
        kvs: list[dict[str, Any]] = []
        for response in reply.get("responses", []):
            kvs.extend(response.get("response_range", {}).get("kvs", []))
        return bool(reply.get("succeeded", False)), kvs

    def _range(self, key: str) -> dict[str, Any]:
        return {"request_range": {"key": _encode(key)}}

    def _record(self, kvs: list[dict[str, Any]]) -> OwnershipRecord:
        owner: str | None = None
        standby: str | None = None
        owner_lease = 0
        for kv in kvs:
            name = _decode(kv["key"]).decode()
            value = _decode(kv.get("value", "")).decode("utf-8", "replace")
            if name == self._owner_key:
                owner, owner_lease = value, int(kv.get("lease", 0))
            elif name == self._standby_key:
                standby = value
        return OwnershipRecord(owner, owner_lease, standby)

    async def _read(self, what: str) -> OwnershipRecord:
        """Both keys, read together (a transaction with no compare)."""
        txn = {
            "compare": [],
            "success": [self._range(self._owner_key), self._range(self._standby_key)],
            "failure": [],
        }
        _, kvs = await self._txn(what, txn)
        return self._record(kvs)

    async def inspect(self) -> OwnershipRecord:
        """Read the record as it is now (for tools, events and tests; needs no lease)."""
        return await self._read("a look at the record")

    async def _revoke(self, lease: _Lease) -> None:
        def revoke(client: Etcd3Client) -> None:
            client.post(client.get_url("/kv/lease/revoke"), json={"ID": lease.id})

        try:
            await self._call("a lease revocation", revoke)
        except OwnershipError as exc:
            if "lease not found" not in str(exc):
                raise

    # -- becoming the owner ------------------------------------------------------------

    async def acquire(self, *, wait: float) -> None:
        """Become the owner with a new lease, waiting up to ``wait`` s for the old one.

        A fresh acquisition also deletes a standby key left by an earlier owner: the
        backup named there was never this owner's backup.
        """
        await self._claim(wait=wait, takeover=False)

    async def take_over(self, *, wait: float) -> None:
        """(Backup) Become the owner once the owner's key expired, if the standby names us.

        Refused at once when the standby key names someone else or nobody (the primary
        went on without this backup); refused after ``wait`` s if the owner still holds
        its lease.
        """
        await self._claim(wait=wait, takeover=True)

    async def _claim(self, *, wait: float, takeover: bool) -> None:
        what = "a take-over" if takeover else "an acquisition"
        if self.may_release():
            raise OwnershipError(f"{self._me} already owns {self._key}")
        deadline = time.monotonic() + max(0.0, wait)
        candidate: _Lease | None = None
        try:
            while True:
                try:
                    if candidate is None or time.monotonic() > candidate.sent + candidate.ttl / 4:
                        # A fresh lease for the put: one granted long ago would leave
                        # the new owner little time before its first renewal.
                        candidate = await self._grant()
                    ok, kvs = await self._txn(what, self._claim_txn(candidate, takeover))
                except ArbiterUnreachable:
                    if time.monotonic() >= deadline:
                        raise
                    await trio.sleep(_POLL)
                    continue
                except OwnershipError as exc:
                    if "lease not found" in str(exc) and time.monotonic() < deadline:
                        candidate = None  # expired under us (a very slow cluster): again
                        continue
                    raise
                record = self._record(kvs)
                if ok or (record.owner == self._me and record.owner_lease == candidate.id):
                    # (The second case: our earlier attempt succeeded but its reply was
                    # lost, and this retry saw our own put.)
                    self._install(candidate)
                    candidate = None
                    return
                await self._wait_for_vacancy(record, deadline, takeover)
        finally:
            if candidate is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(self._request_timeout):
                    try:
                        await self._revoke(candidate)
                    except OwnershipError:
                        pass  # it expires by itself

    def _claim_txn(self, lease: _Lease, takeover: bool) -> dict[str, Any]:
        """Put owner=me with ``lease`` and drop the standby, if nobody owns the guest
        (and, for a take-over, the standby names us); else read both keys."""
        compare: list[dict[str, Any]] = [{
            "key": _encode(self._owner_key),
            "target": "CREATE",
            "result": "EQUAL",
            "create_revision": 0,
        }]
        if takeover:
            compare.append({
                "key": _encode(self._standby_key),
                "target": "VALUE",
                "result": "EQUAL",
                "value": _encode(self._me),
            })
        return {
            "compare": compare,
            "success": [
                {"request_put": {
                    "key": _encode(self._owner_key),
                    "value": _encode(self._me),
                    "lease": lease.id,
                }},
                {"request_delete_range": {"key": _encode(self._standby_key)}},
            ],
            "failure": [self._range(self._owner_key), self._range(self._standby_key)],
        }

    async def _wait_for_vacancy(
        self, record: OwnershipRecord, deadline: float, takeover: bool
    ) -> None:
        """Poll until the owner key is gone; raise OwnershipRefused when it cannot be ours."""
        while True:
            if takeover and record.standby != self._me:
                named = record.standby if record.standby is not None else "none"
                raise OwnershipRefused(
                    f"{self._me} cannot take {self._key} over: the standby is {named}"
                    f" (owner: {record.owner or 'none'}): the primary went on without"
                    " this backup"
                )
            if record.owner is None:
                return
            if time.monotonic() >= deadline:
                if takeover:
                    raise OwnershipRefused(
                        f"{self._me} cannot take {self._key} over: its owner {record.owner}"
                        " still holds its lease"
                    )
                raise OwnershipRefused(f"{self._key} is owned by {record.owner}")
            await trio.sleep(min(_POLL, max(0.0, deadline - time.monotonic())))
            try:
                record = await self._read("a look at the owner")
            except ArbiterUnreachable:
                if time.monotonic() >= deadline:
                    raise

    def _install(self, lease: _Lease) -> None:
        self._lease = lease
        if self.lost.is_set():
            # A side that lost an earlier lease and becomes the owner again gets a
            # fresh event: the old one stays set for whoever still holds it.
            self.lost = trio.Event()
            self._lost_reason = ""

    # -- being the owner ---------------------------------------------------------------

    def may_release(self) -> bool:
        """True while the lease is certainly held: last renewal sent + TTL - margin."""
        lease = self._lease
        if lease is None or self.lost.is_set():
            return False
        return time.monotonic() < lease.valid_until

    def _set_lost(self, lease: _Lease, reason: str) -> None:
        if self._lease is lease and not self.lost.is_set():
            self._lost_reason = reason
            self.lost.set()

    async def keep(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Renew the lease every TTL/4 until cancelled.

        A failed renewal is retried (on the other members too) until the margin
        point of the last good one; if none succeeds by then ``lost`` is set and
        this returns. A reply saying the lease is gone sets ``lost`` at once.
        """
        lease = self._lease
        if lease is None:
            raise OwnershipError(f"{self._me} does not own {self._key}: nothing to keep")
        task_status.started()
        interval = lease.ttl / 4

        def renew(client: Etcd3Client) -> int:
            reply: dict[str, Any] = client.post(
                client.get_url("/lease/keepalive"), json={"ID": lease.id}
            )
            if "result" not in reply:
                raise etcd_exc.InternalServerError(f"no result in keepalive reply: {reply}")
            # An absent TTL is zero: etcd no longer knows the lease.
            return int(reply["result"].get("TTL", 0))

        while self._lease is lease and not self.lost.is_set():
            await _sleep_until_monotonic(lease.sent + interval)
            if self._lease is not lease or self.lost.is_set():
                return
            ttl: int | None = None
            sent = 0.0
            with _move_on_at_monotonic(lease.valid_until):
                while True:
                    remaining = lease.valid_until - time.monotonic()
                    try:
                        ttl, sent = await self._call("a lease renewal", renew, timeout=remaining)
                        break
                    except OwnershipError:
                        await trio.sleep(_ROUND_PAUSE)
            if self._lease is not lease:
                return  # resigned meanwhile
            if ttl is None:
                self._set_lost(
                    lease,
                    f"lease of {self._me} on {self._key} not renewed in time"
                    f" (arbiter {self._url} silent for {time.monotonic() - lease.sent:.2f} s)",
                )
                return
            if ttl <= 0:
                self._set_lost(lease, f"lease of {self._me} on {self._key} is gone in etcd")
                return
            if sent > lease.sent:
                lease.sent = sent
                lease.ttl = ttl

    async def _guarded(self, what: str, ops: list[dict[str, Any]]) -> None:
        """Run ``ops`` only while the owner key names us; OwnershipLost otherwise."""
        txn = {
            "compare": [{
                "key": _encode(self._owner_key),
                "target": "VALUE",
                "result": "EQUAL",
                "value": _encode(self._me),
            }],
            "success": ops,
            "failure": [self._range(self._owner_key)],
        }
        ok, kvs = await self._txn(what, txn)
        if not ok:
            owner = self._record(kvs).owner
            raise OwnershipLost(
                f"{self._me} no longer owns {self._key} (owner: {owner or 'none'}): {what} refused"
            )

    async def designate(self, standby: str) -> None:
        """Name ``standby`` the backup that may take over (only while we own the guest)."""
        if not standby:
            raise ValueError("standby identity must be a non-empty string")
        await self._guarded(
            f"designating {standby}",
            [{"request_put": {"key": _encode(self._standby_key), "value": _encode(standby)}}],
        )

    async def drop_standby(self) -> None:
        """Remove the standby, so no stale backup can take over (only while owner)."""
        await self._guarded(
            "dropping the standby",
            [{"request_delete_range": {"key": _encode(self._standby_key)}}],
        )

    async def resign(self) -> None:
        """Give ownership up: delete the standby (if still owner) and revoke the lease.

        The lease is forgotten first, so ``may_release()`` is false from the start;
        raises ArbiterUnreachable if etcd cannot be reached (the lease then expires).
        """
        lease = self._lease
        if lease is None:
            return
        self._lease = None
        try:
            await self._guarded(
                "resigning", [{"request_delete_range": {"key": _encode(self._standby_key)}}]
            )
        except OwnershipLost:
            return  # someone else owns it already; our lease is gone or going
        await self._revoke(lease)

    async def aclose(self) -> None:
        """Close the connections; waits (bounded) for abandoned requests to end."""
        self._closed = True
        for member in self._members:
            while member.idle:
                member.idle.pop().session.close()
        with trio.move_on_after(self._request_timeout + 0.5):
            while any(not f.done for f in self._flights):
                await trio.sleep(0.02)
        self._flights.clear()

    async def __aenter__(self) -> EtcdOwnership:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"EtcdOwnership(url={self._url!r}, key={self._key!r}, me={self._me!r})"


def _encode(text: str) -> str:
    """A key or value as the gateway wants it: base64 of its UTF-8 bytes."""
    return base64.b64encode(text.encode()).decode("ascii")


def _decode(data: str) -> bytes:
    return base64.b64decode(data)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "no answer in time"
    if isinstance(exc, etcd_exc.Etcd3Exception):
        detail = exc.detail_text or ""
        return f"{type(exc).__name__}: {detail.strip() or exc.args}"[:300]
    return f"{type(exc).__name__}: {exc}"[:300]


def _to_trio_time(monotonic_deadline: float) -> float:
    return trio.current_time() + (monotonic_deadline - time.monotonic())


async def _sleep_until_monotonic(deadline: float) -> None:
    await trio.sleep_until(_to_trio_time(deadline))


def _move_on_at_monotonic(deadline: float) -> trio.CancelScope:
    return trio.move_on_at(_to_trio_time(deadline))


def open_arbiter(
    url: str,
    *,
    key: str,
    me: str,
    lease_ttl: float = 2.0,
    request_timeout: float | None = None,
) -> EtcdOwnership:
    """The ownership record ``key`` as seen by ``me``, on the etcd cluster at ``url``.

    Args:
        url: ``etcd://HOST:PORT[,HOST:PORT...]`` (members tried in turn), or
            ``etcd+https://...[?ca=PATH&cert=PATH&key=PATH]``.
        key: the guest's name (both sides use the same).
        me: this side's unique identity.
        lease_ttl: seconds the lease lives without renewal; rounded up to whole
            seconds, and etcd may grant more (its minimum depends on its timing).
        request_timeout: seconds one request to one member may take (default
            TTL/4, clamped to 0.25-1 s).

    Raises:
        ArbiterURLError: a malformed URL (a ``ValueError`` and an ``OwnershipError``).

    No connection is made here: the first request is the first ``acquire`` or
    ``take_over``.
    """
    return EtcdOwnership(
        parse_arbiter_url(url),
        url=url,
        key=key,
        me=me,
        lease_ttl=lease_ttl,
        request_timeout=request_timeout,
    )
