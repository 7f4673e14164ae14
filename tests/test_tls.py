"""Checkpoint streams inside TLS (``tls://``), with certificates from a test CA."""

from __future__ import annotations

import contextlib
import ssl
from pathlib import Path

import pytest
import trio
import trustme

from tests._microvm_util import needs_kvm
from tests._procs import free_port, start_tremus
from tremus import transports


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def contexts(ca: trustme.CA, *, mutual: bool = False) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    if mutual:
        ca.configure_trust(server)
        server.verify_mode = ssl.CERT_REQUIRED
        ca.issue_cert("primary.test").configure_cert(client)
    return server, client


@pytest.mark.parametrize("mutual", [False, True])
async def test_bytes_cross_a_tls_stream(ca: trustme.CA, mutual: bool) -> None:
    server, client = contexts(ca, mutual=mutual)
    listener = await transports.listen("tls://127.0.0.1:0", ssl_context=server)
    assert listener.url.startswith("tls://127.0.0.1:")
    async with trio.open_nursery() as nursery:
        async def echo() -> None:
            stream = await listener.accept()
            await stream.send_all(await stream.receive_some(100))

        nursery.start_soon(echo)
        stream = await transports.connect(listener.url, ssl_context=client)
        await stream.send_all(b"checkpoint")
        assert await stream.receive_some(100) == b"checkpoint"
    await listener.aclose()


async def test_an_untrusted_backup_is_refused(ca: trustme.CA) -> None:
    server, _ = contexts(ca)
    stranger = ssl.create_default_context()
    trustme.CA().configure_trust(stranger)  # trusts some other CA
    listener = await transports.listen("tls://127.0.0.1:0", ssl_context=server)
    async def serve_one() -> None:
        stream = await listener.accept()  # the handshake is the connection's own business
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.do_handshake()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_one)
        with pytest.raises(ConnectionError, match="TLS handshake with tls://127.0.0.1:.* failed"):
            await transports.connect(listener.url, ssl_context=stranger)
        nursery.cancel_scope.cancel()
    await listener.aclose()


async def test_listening_on_tls_needs_a_certificate() -> None:
    with pytest.raises(transports.InvalidURL, match="needs a certificate"):
        await transports.listen("tls://127.0.0.1:0")


@needs_kvm
async def test_protect_and_fail_over_over_mutual_tls(ca: trustme.CA, tmp_path: Path) -> None:
    ca_pem = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    files = {}
    for name, host in (("backup", "127.0.0.1"), ("primary", "primary.test")):
        cert = ca.issue_cert(host)
        files[name] = tmp_path / f"{name}.pem"
        cert.private_key_and_cert_chain_pem.write_to_path(str(files[name]))
    port = free_port()
    async with trio.open_nursery() as nursery:
        backup = await start_tremus(
            nursery, "backup", "backup", "--listen", f"tls://127.0.0.1:{port}", "--json",
            "--tls-cert", str(files["backup"]), "--tls-ca", str(ca_pem))
        await backup.wait_for(lambda b: b.of("backup_ready"), what="backup_ready")
        primary = await start_tremus(
            nursery, "primary", "protect", "--domain", "microvm:workload=counter,memory=8M",
            "--backup", f"tls://127.0.0.1:{port}", "--json", "--tls-ca", str(ca_pem),
            "--tls-cert", str(files["primary"]))
        await primary.wait_for(lambda p: len(p.of("checkpoint_acked")) >= 5, what="acks")
        primary.kill()
        await backup.wait_for(lambda b: b.of("failover_complete"), what="failover")
        backup.kill()
