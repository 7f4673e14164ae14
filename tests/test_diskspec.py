"""Disk specs: the forms of xl's docs/misc/xl-disk-configuration.txt, Remus's, errors."""

from __future__ import annotations

import pytest

from tremus.domains.diskspec import (
    DiskSpec,
    DiskSpecError,
    UnsupportedDiskError,
    check_supported,
    parse_disk_spec,
    unsupported,
)


def _core(spec: DiskSpec) -> tuple[str, str, str, str, str]:
    return spec.target, spec.format, spec.vdev, spec.access, spec.devtype


# The document's two groups of equivalent strings.
@pytest.mark.parametrize(
    "text",
    [
        "/dev/vg/guest-volume,,hda",
        "/dev/vg/guest-volume,raw,hda,rw",
        "format=raw, vdev=hda, access=rw, target=/dev/vg/guest-volume",
        "raw:/dev/vg/guest-volume,hda,w",
    ],
)
def test_equivalent_disks(text: str) -> None:
    spec = parse_disk_spec(text)
    assert _core(spec) == ("/dev/vg/guest-volume", "raw", "hda", "rw", "disk")
    assert spec.remus is None and spec.script is None
    assert check_supported(spec) is spec


@pytest.mark.parametrize(
    "text",
    [
        "/root/image.iso,,hdc,cdrom",
        "/root/image.iso,,hdc,,cdrom",
        "/root/image.iso,raw,hdc,devtype=cdrom",
        "format=raw, vdev=hdc, access=ro, devtype=cdrom, target=/root/image.iso",
        "raw:/root/image.iso,hdc:cdrom,ro",
    ],
)
def test_equivalent_cdroms(text: str) -> None:
    assert _core(parse_disk_spec(text)) == ("/root/image.iso", "raw", "hdc", "ro", "cdrom")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Positional slots, defaults, access spellings, leading whitespace.
        ("/img,,xvda", ("/img", "raw", "xvda", "rw", "disk")),
        ("/img,,xvda,r", ("/img", "raw", "xvda", "ro", "disk")),
        ("/img,raw,xvda,w", ("/img", "raw", "xvda", "rw", "disk")),
        ("/img,qcow2,xvda,ro", ("/img", "qcow2", "xvda", "ro", "disk")),
        (" /img,\traw,  xvda,  rw", ("/img", "raw", "xvda", "rw", "disk")),
        ("vdev=xvda,/img", ("/img", "raw", "xvda", "rw", "disk")),
        ("/img,vdev=xvda,access=ro", ("/img", "raw", "xvda", "ro", "disk")),
        # target= swallows the rest, commas and colons included (one trailing comma
        # dropped), even after an empty positional target.
        ("vdev=xvda, target=/images/with,comma,in:name.raw",
         ("/images/with,comma,in:name.raw", "raw", "xvda", "rw", "disk")),
        ("vdev=xvda,target=/a,b,", ("/a,b", "raw", "xvda", "rw", "disk")),
        (",,xvda,target=/a,b", ("/a,b", "raw", "xvda", "rw", "disk")),
        # Deprecated prefixes: stripped, or setting the format, in any combination.
        ("phy:/dev/sdb,xvdb,w", ("/dev/sdb", "raw", "xvdb", "rw", "disk")),
        ("file:/img,xvda,r", ("/img", "raw", "xvda", "ro", "disk")),
        ("tap:aio:/img,xvda,w", ("/img", "raw", "xvda", "rw", "disk")),
        ("tap:aio:qcow:/img.qcow,xvda,w", ("/img.qcow", "qcow", "xvda", "rw", "disk")),
        ("tap2:vhd:/img.vhd,xvda,w", ("/img.vhd", "vhd", "xvda", "rw", "disk")),
        ("ioemu:/img,hda,w", ("/img", "raw", "hda", "rw", "disk")),
        # Empty cdrom drive, xend's way.
        (",hdc:cdrom,r", ("", "empty", "hdc", "ro", "cdrom")),
        # host:port-like targets are targets, not unknown prefixes.
        ("nbd:server:10809,xvda", ("server:10809", "raw", "xvda", "rw", "disk")),
        # Remus (tremus's addition): tapdisk's driver stack names the backup.
        ("tap:remus:backup:9000|aio:/var/img/disk.raw,xvda,w",
         ("/var/img/disk.raw", "raw", "xvda", "rw", "disk")),
        ("tap:tapdisk:remus:10.0.0.2:7500|aio:/img,xvda1,w", ("/img", "raw", "xvda1", "rw", "disk")),
        ("remus:[fd00::2]:9000|sync:/img,xvda", ("/img", "raw", "xvda", "rw", "disk")),
        ("tap:remus:b:1|vhd:/img.vhd,xvda,w", ("/img.vhd", "vhd", "xvda", "rw", "disk")),
        ("remus=backup:9000, vdev=xvda, target=/images/a,b.raw",
         ("/images/a,b.raw", "raw", "xvda", "rw", "disk")),
    ],
)
def test_forms(text: str, expected: tuple[str, str, str, str, str]) -> None:
    assert _core(parse_disk_spec(text)) == expected


def test_remus_fields() -> None:
    spec = parse_disk_spec("tap:tapdisk:remus:10.0.0.2:7500|aio:/img,xvda1,w")
    assert spec.remus == ("10.0.0.2", 7500)
    assert spec.tapdisk_driver == "aio"
    assert spec.prefixes == ("tap", "tapdisk", "remus")
    assert parse_disk_spec("remus:[fd00::2]:9000|sync:/img,xvda").remus == ("fd00::2", 9000)
    assert parse_disk_spec("remus=backup:9000,vdev=xvda,target=/i").remus == ("backup", 9000)
    assert check_supported(spec) is spec


def test_flags_and_keys() -> None:
    spec = parse_disk_spec(
        "/img,,xvda,direct-io-safe,no-discard,backendtype=qdisk,backend=0,"
        "colo-host=b,colo-port=9000,colo-export=e,active-disk=/a,hidden-disk=/h"
    )
    assert spec.direct_io_safe and spec.discard is False and spec.colo is None
    assert (spec.backendtype, spec.backend) == ("qdisk", "0")
    assert (spec.colo_host, spec.colo_port, spec.colo_export) == ("b", 9000, "e")
    assert (spec.active_disk, spec.hidden_disk) == ("/a", "/h")
    assert parse_disk_spec("/img,,xvda,discard").discard is True
    assert unsupported(spec) == ()  # all advisory, or meaningless without colo


def test_relative_target_is_under_dev() -> None:
    spec = parse_disk_spec("vg/guest,,xvda")
    assert (spec.target, spec.path) == ("vg/guest", "/dev/vg/guest")
    assert parse_disk_spec("/img,,xvda").path == "/img"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("/img,qcow3,xvda", "unknown value for format: 'qcow3'"),
        ("/img,,xvda,rx", "unknown value for access: 'rx'"),
        ("/img,,xvda,rw,extra", "too many positional parameters: 'extra'"),
        ("/img", "no vdev specified"),
        ("/img,", "no vdev specified"),
        ("vdev=xvda", "no target specified"),
        ("foo:/img,xvda", "unknown deprecated disk prefix 'foo:'"),
        ("/img,,xvda,colour=red", "unknown parameter 'colour=red'"),
        ("/img,,xvda,devtype=floppy", "unknown value for devtype: 'devtype=floppy'"),
        ("/img,,xvda,backendtype=nbd", "unknown value for backendtype: 'backendtype=nbd'"),
        ("/img,,xvda,colo-port=x", "unknown value for colo-port: 'colo-port=x'"),
        ("/img,,xvda,vdev=xvdb", "vdev respecified: 'vdev=xvdb'"),
        ("format=raw,qcow2:/img,xvda", "format respecified: 'qcow2:'"),
        ("/img,,xvda,target=/other", "target respecified: 'target=/other'"),
        ("/img,,xvda,access=ro,rw", "access respecified: 'rw'"),
        (",hdc:floppy,r", "unknown deprecated type 'floppy' in 'hdc:floppy'"),
        ("/a=b,,xvda", "bad disk syntax near '=b,,xvda'"),
        ("tap:remus:backup|aio:/img,xvda", "'remus:backup': expected HOST:PORT"),
        ("tap:remus:backup:9000,xvda", "'remus:backup:9000': expected remus:HOST:PORT|DRIVER:PATH"),
        ("tap:remus:backup:99999|aio:/img,xvda", "port 99999 is not in 1..65535"),
        ("tap:remus:b:1|nfs:/img,xvda", "unknown tapdisk driver 'nfs:' after 'remus:b:1|'"),
        ("tap:remus:b:1|/img,xvda", "expected a tapdisk driver after '|'"),
        ("remus=b:1,tap:remus:b:2|aio:/i,xvda", "remus respecified: 'remus:b:2'"),
    ],
)
def test_syntax_errors(text: str, message: str) -> None:
    with pytest.raises(DiskSpecError) as info:
        parse_disk_spec(text)
    assert not isinstance(info.value, UnsupportedDiskError)
    assert message in str(info.value)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("/img.qcow2,qcow2,xvda", "format qcow2 is not supported: tremus disks are raw images"),
        ("qcow2:/img.qcow2,xvda", "format qcow2 (from the qcow2: prefix) is not supported"),
        ("tap:remus:b:1|vhd:/img.vhd,xvda,w", "format vhd (from the vhd: prefix) is not supported"),
        ("/root/image.iso,,hdc,cdrom", "devtype cdrom is not supported"),
        (",hdc:cdrom,r", "devtype cdrom is not supported"),
        ("/img,,xvda,script=block-drbd", "script block-drbd is not supported"),
        ("nbd:server:10809,xvda", "script block-nbd (from the nbd: prefix) is not supported"),
        ("/img,,xvda,backend=driverdom", "backend driverdom is not supported: tremus has no driver"),
        ("/img,,xvda,colo,colo-host=b,colo-port=9000", "colo is not supported"),
    ],
)
def test_unsupported_is_a_separate_step(text: str, reason: str) -> None:
    spec = parse_disk_spec(text)  # well-formed: parsing succeeds
    with pytest.raises(UnsupportedDiskError) as info:
        check_supported(spec)
    assert isinstance(info.value, DiskSpecError)
    assert reason in str(info.value)


def test_every_reason_is_reported() -> None:
    reasons = unsupported(parse_disk_spec("/img.vhd,vhd,xvda,script=foo,backend=dd"))
    assert len(reasons) == 3
    assert [r.split(" ")[0] for r in reasons] == ["format", "script", "backend"]
