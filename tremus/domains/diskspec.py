"""Disk specs in xl's syntax, plus Remus's own ``tap:remus:HOST:PORT|aio:PATH``.

A disk is written the way ``xl`` users already write it
(``docs/misc/xl-disk-configuration.txt``)::

    [<key>=<value>|<flag>,]* [<target>, [<format>, [<vdev>, [<access>]]]],
        [<key>=<value>|<flag>,]* [target=<target>]

so that a Xen domain's ``disk = [...]`` lines carry over unchanged. The rules follow
xl's own lexer (``libxlu_disk_l.l``) rather than a tidier reading of the document,
because the corner cases are where a silently different reading would hurt:

* parameters are comma separated; whitespace before each is ignored;
* ``key=value`` parameters and bare flags may come in any order; everything else
  fills the positional slots target, format, vdev, access in turn. An empty value
  (``/img,,xvda``) means the default;
* ``target=`` swallows the rest of the spec, commas included (one trailing comma is
  dropped): it is the only way to name a path with a comma or a colon;
* a deprecated prefix at the start of a parameter (``raw:``, ``qcow:``, ``qcow2:``,
  ``vhd:`` set the format; ``iscsi:``, ``nbd:``, ``enbd:``, ``drbd:`` set
  ``script=block-NAME``; ``tapdisk:``, ``tap:``, ``tap2:``, ``aio:``, ``ioemu:``,
  ``file:``, ``phy:`` are dropped) switches the positional slots to the old syntax
  ``[<prefix>:]<target>,<vdev>[:<devtype>],<access>``;
* any other ``word:`` followed by something that is not a letter or digit is an
  unknown prefix, an error (``foo:/x``); ``host:port``-like targets pass as targets.

tremus adds one prefix xl does not have: Remus's ``remus:HOST:PORT|DRIVER:PATH``
(tapdisk's driver stack, split on ``|``), usually written
``tap:remus:HOST:PORT|aio:PATH`` or ``tap:tapdisk:remus:...`` as Xen 4.4's Remus
documentation does. It names where this disk replicates to. ``DRIVER`` is the
tapdisk driver under the replication layer: ``aio`` or ``sync`` (raw images), or a
format prefix (``vhd:``, ``qcow:``...) that sets the format. For a path that needs
``target=``, the key ``remus=HOST:PORT`` says the same.

Parsing only checks the syntax (:class:`DiskSpecError`). Whether tremus can honour a
well-formed spec is a separate step, :func:`check_supported`
(:class:`UnsupportedDiskError`), so that a typo and a feature tremus lacks are
reported differently: the first is the user's to fix, the second a limit of tremus.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal, final

__all__ = [
    "DiskSpec",
    "DiskSpecError",
    "UnsupportedDiskError",
    "check_supported",
    "parse_disk_spec",
    "unsupported",
]

Access = Literal["rw", "ro"]
DevType = Literal["disk", "cdrom"]

#: Formats xl knows (``empty`` is an empty cdrom drive).
FORMATS: Final = frozenset({"raw", "qcow", "qcow2", "vhd", "qed", "empty"})
BACKEND_TYPES: Final = frozenset({"phy", "tap", "qdisk"})
#: tapdisk drivers that read and write a raw image.
RAW_TAPDISK_DRIVERS: Final = frozenset({"aio", "sync"})
#: ``backend=`` values that name the domain tremus itself plays.
_DOM0_NAMES: Final = frozenset({"0", "dom0", "Domain-0"})

_WHITESPACE: Final = re.compile(r"[ \t\n]+")
_FORMAT_PREFIX: Final = re.compile(r"(raw|qcow2?|vhd):")
_SCRIPT_PREFIX: Final = re.compile(r"(iscsi|e?nbd|drbd):")
_IGNORED_PREFIX: Final = re.compile(r"(tapdisk|tap2?|aio|ioemu|file|phy):")
_UNKNOWN_PREFIX: Final = re.compile(r"[a-z][a-z0-9]*:(?![a-z0-9])")
_REMUS: Final = re.compile(r"remus:([^|,]*)(\|?)")
_TAPDISK_DRIVER: Final = re.compile(r"([a-z][a-z0-9]*):")
_KEY: Final = re.compile(r"([a-z][-a-z0-9]*)=([^,]*),?")
_POSITIONAL: Final = re.compile(r"[^=,]*,|[^=,]+,?")
_FLAG: Final = re.compile(r"(cdrom|direct-io-safe|discard|no-discard|colo|no-colo)(?:,|$)")
_HOST_PORT: Final = re.compile(r"(?:\[([^\]/]+)\]|([^:/\[\]\s]+)):([0-9]+)")
_STRING_KEYS: Final = frozenset(
    {"vdev", "backend", "script", "colo-host", "colo-export", "active-disk", "hidden-disk"}
)


class DiskSpecError(ValueError):
    """A disk spec that does not parse; the message names the offending part."""

    def __init__(self, spec: str, message: str) -> None:
        super().__init__(f"disk spec {spec!r}: {message}")
        self.spec = spec
        self.reason = message


@final
class UnsupportedDiskError(DiskSpecError):
    """A well-formed disk spec asking for something tremus cannot honour."""

    def __init__(self, spec: str, reasons: tuple[str, ...]) -> None:
        super().__init__(spec, "; ".join(reasons))
        self.reasons = reasons


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class DiskSpec:
    """One parsed disk: every parameter xl's syntax can carry, with defaults applied.

    ``None`` means "not given" where xl has no default of its own to apply.
    """

    #: The spec as written.
    text: str
    #: Block device or image file, as written ("" for an empty cdrom drive).
    target: str
    format: str = "raw"
    vdev: str
    access: Access = "rw"
    devtype: DevType = "disk"
    #: Backend domain name (``backend=``).
    backend: str | None = None
    #: ``phy``, ``tap`` or ``qdisk`` (``backendtype=``).
    backendtype: str | None = None
    #: Hotplug script (``script=``, or ``block-NAME`` from an ``iscsi:``-like prefix).
    script: str | None = None
    direct_io_safe: bool = False
    #: ``discard`` / ``no-discard`` (``None``: the backend's default, discard).
    discard: bool | None = None
    #: ``colo`` / ``no-colo`` and its parameters.
    colo: bool | None = None
    colo_host: str | None = None
    colo_port: int | None = None
    colo_export: str | None = None
    active_disk: str | None = None
    hidden_disk: str | None = None
    #: Where this disk replicates to: ``remus:HOST:PORT|...`` or ``remus=HOST:PORT``.
    remus: tuple[str, int] | None = None
    #: The tapdisk driver under ``remus:`` (``aio``, ``sync``, ``vhd``...).
    tapdisk_driver: str | None = None
    #: Prefixes seen (xl's deprecated ones and ``remus``), in order, without the
    #: colon: ``("tap", "remus")``.
    prefixes: tuple[str, ...] = ()

    @property
    def path(self) -> str:
        """The target as a host path: xl's document prepends ``/dev/`` to a target
        that does not start with ``/``."""
        if not self.target or self.target.startswith("/"):
            return self.target
        return "/dev/" + self.target

    @property
    def read_only(self) -> bool:
        return self.access == "ro"


# -- parsing ----------------------------------------------------------------------------


@final
class _Parser:
    """libxlu_disk_l.l's lexer and actions, one parameter per step."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.values: dict[str, str] = {}
        self.target: str | None = None
        self.format: str | None = None
        self.access: Access | None = None
        self.positional_access = False
        self.cdrom: bool | None = None
        self.flags: dict[str, bool] = {}
        self.colo_port: int | None = None
        self.remus: tuple[str, int] | None = None
        self.tapdisk_driver: str | None = None
        self.prefixes: list[str] = []

    def error(self, message: str) -> DiskSpecError:
        return DiskSpecError(self.text, message)

    def parse(self) -> DiskSpec:
        text, pos = self.text, 0
        while pos < len(text):
            ws = _WHITESPACE.match(text, pos)
            if ws is not None:
                pos = ws.end()
                continue
            pos = self._step(pos)
        return self._finish()

    def _step(self, pos: int) -> int:
        text = self.text
        rest = text[pos:]
        if rest.startswith("target="):
            value = rest[len("target=") :].removesuffix(",")
            self._set_target(value, f"target={value}")
            return len(text)
        # Prefixes first: in the lexer their trailing context makes them match the
        # whole rest of the spec, longer than any other rule.
        if (m := _REMUS.match(text, pos)) is not None:
            return self._remus(m)
        if (m := _FORMAT_PREFIX.match(text, pos)) is not None:
            self.prefixes.append(m[1])
            self._set_format(m[1], f"{m[1]}:")
            return m.end()
        if (m := _SCRIPT_PREFIX.match(text, pos)) is not None:
            self.prefixes.append(m[1])
            self._set_string("script", f"block-{m[1]}", f"{m[1]}:")
            return m.end()
        if (m := _IGNORED_PREFIX.match(text, pos)) is not None:
            self.prefixes.append(m[1])
            return m.end()
        if (m := _UNKNOWN_PREFIX.match(text, pos)) is not None:
            raise self.error(f"unknown deprecated disk prefix {m[0]!r}")
        if (m := _KEY.match(text, pos)) is not None:
            self._key(m[1], m[2].removesuffix(","), m[0].removesuffix(","))
            return m.end()
        if (m := _FLAG.match(text, pos)) is not None:
            self._flag(m[1])
            return m.end()
        if (m := _POSITIONAL.match(text, pos)) is not None:
            self._positional(m[0].removesuffix(","))
            return m.end()
        raise self.error(f"bad disk syntax near {rest!r}")

    # -- actions
    def _remus(self, m: re.Match[str]) -> int:
        hostport, bar = m[1], m[2]
        where = m[0].removesuffix("|")
        if not bar:
            raise self.error(
                f"{where!r}: expected remus:HOST:PORT|DRIVER:PATH (tapdisk's driver stack,"
                " split on '|')"
            )
        self.prefixes.append("remus")
        self._set_remus(hostport, where)
        pos = m.end()
        driver = _TAPDISK_DRIVER.match(self.text, pos)
        if driver is None:
            raise self.error(
                f"{self.text[m.start():]!r}: expected a tapdisk driver after '|' (aio:PATH)"
            )
        name = driver[1]
        self.tapdisk_driver = name
        if name in RAW_TAPDISK_DRIVERS:
            return driver.end()
        if _FORMAT_PREFIX.fullmatch(driver[0]) is not None:
            return pos  # lexed next as a format prefix
        raise self.error(
            f"unknown tapdisk driver {driver[0]!r} after {where + '|'!r}"
            " (aio: or sync: for a raw image)"
        )

    def _set_remus(self, hostport: str, where: str) -> None:
        m = _HOST_PORT.fullmatch(hostport)
        if m is None:
            raise self.error(f"{where!r}: expected HOST:PORT after remus, got {hostport!r}")
        port = int(m[3])
        if not 0 < port < 65536:
            raise self.error(f"{where!r}: port {port} is not in 1..65535")
        if self.remus is not None:
            raise self.error(f"remus respecified: {where!r}")
        self.remus = (m[1] or m[2], port)

    def _key(self, key: str, value: str, part: str) -> None:
        if key == "format":
            self._set_format(value, part)
        elif key == "access":
            self._set_access(value, part)
        elif key == "devtype":
            if value not in ("cdrom", "disk"):
                raise self.error(f"unknown value for devtype: {part!r} (cdrom or disk)")
            self.cdrom = value == "cdrom"
        elif key == "backendtype":
            if value not in BACKEND_TYPES:
                raise self.error(
                    f"unknown value for backendtype: {part!r} ({', '.join(sorted(BACKEND_TYPES))})"
                )
            self._set_string(key, value, part, enum=True)
        elif key == "colo-port":
            if not value.isdigit() or int(value) == 0:
                raise self.error(f"unknown value for colo-port: {part!r}")
            self.colo_port = int(value)
        elif key == "remus":
            self._set_remus(value, part)
        elif key in _STRING_KEYS:
            self._set_string(key, value, part)
        else:
            raise self.error(f"unknown parameter {part!r}")

    def _flag(self, flag: str) -> None:
        if flag == "cdrom":
            self.cdrom = True
        else:
            self.flags[flag.removeprefix("no-")] = not flag.startswith("no-")

    def _positional(self, value: str) -> None:
        if self.target is None:
            self._set_target(value, value)
        elif not self.prefixes and self.format is None:
            if self.target == "" and self._vdev_and_devtype(value):
                self.format = "empty"
            else:
                self._set_format(value, value)
        elif "vdev" not in self.values:
            if not self._vdev_and_devtype(value):
                self._set_string("vdev", value, value)
        elif not self.positional_access:
            self.positional_access = True
            self._set_access(value, value)
        else:
            raise self.error(f"too many positional parameters: {value!r}")

    def _vdev_and_devtype(self, value: str) -> bool:
        """The deprecated ``<vdev>:<devtype>``; False (and nothing set) without a colon."""
        vdev, colon, devtype = value.rpartition(":")
        if not colon:
            return False
        if devtype not in ("cdrom", "disk"):
            raise self.error(f"unknown deprecated type {devtype!r} in {value!r} (cdrom or disk)")
        self._set_string("vdev", vdev, value)
        self.cdrom = devtype == "cdrom"
        return True

    # -- setters that refuse a parameter given twice (xl: "respecified")
    def _set_target(self, value: str, part: str) -> None:
        if self.target:  # an empty positional target may be given again by name
            raise self.error(f"target respecified: {part!r}")
        self.target = value

    def _set_format(self, value: str, part: str) -> None:
        value = value or "raw"
        if value not in FORMATS:
            raise self.error(
                f"unknown value for format: {part!r} ({', '.join(sorted(FORMATS - {'empty'}))})"
            )
        if self.format is not None and self.format != value:
            raise self.error(f"format respecified: {part!r} after {self.format!r}")
        self.format = value

    def _set_access(self, value: str, part: str) -> None:
        if value in ("r", "ro"):
            access: Access = "ro"
        elif value in ("w", "rw", ""):
            access = "rw"
        else:
            raise self.error(f"unknown value for access: {part!r} (ro, r, rw or w)")
        if self.access is not None and self.access != access:
            raise self.error(f"access respecified: {part!r}")
        self.access = access

    def _set_string(self, key: str, value: str, part: str, *, enum: bool = False) -> None:
        old = self.values.get(key)
        if old and (not enum or old != value):
            raise self.error(f"{key} respecified: {part!r} after {old!r}")
        self.values[key] = value

    # -- defaults and the checks xl makes once the whole spec is read
    def _finish(self) -> DiskSpec:
        cdrom = bool(self.cdrom)
        vdev = self.values.get("vdev", "")
        target = self.target or ""
        if not vdev:
            raise self.error("no vdev specified")
        if not target and not cdrom:
            raise self.error("no target specified (and device not removable)")

        def opt(key: str) -> str | None:
            return self.values.get(key) or None

        return DiskSpec(
            text=self.text,
            target=target,
            format=self.format or "raw",
            vdev=vdev,
            # A cdrom is read-only whatever was asked (as xl does).
            access="ro" if cdrom else (self.access or "rw"),
            devtype="cdrom" if cdrom else "disk",
            backend=opt("backend"),
            backendtype=opt("backendtype"),
            script=opt("script"),
            direct_io_safe=self.flags.get("direct-io-safe", False),
            discard=self.flags.get("discard"),
            colo=self.flags.get("colo"),
            colo_host=opt("colo-host"),
            colo_port=self.colo_port,
            colo_export=opt("colo-export"),
            active_disk=opt("active-disk"),
            hidden_disk=opt("hidden-disk"),
            remus=self.remus,
            tapdisk_driver=self.tapdisk_driver,
            prefixes=tuple(self.prefixes),
        )


def parse_disk_spec(text: str) -> DiskSpec:
    """Parse one disk spec (xl's syntax plus ``remus:``); syntax only.

    Raises:
        DiskSpecError: the spec does not parse; the message names the part.
    """
    return _Parser(text).parse()


# -- what tremus can honour ---------------------------------------------------------------


def unsupported(spec: DiskSpec) -> tuple[str, ...]:
    """Why tremus cannot honour ``spec`` (empty if it can), one reason per part.

    tremus serves the disk itself: a raw image or block device, read-write or
    read-only. Advisory parameters (``backendtype``, ``direct-io-safe``,
    ``discard``) are accepted: per xl's document they do not change what the guest
    sees, and tremus has one backend of its own.
    """
    reasons: list[str] = []
    if spec.devtype == "cdrom":
        reasons.append(
            "devtype cdrom is not supported: tremus disks are fixed disks, not removable media"
        )
    elif spec.format != "raw":
        origin = (f" (from the {spec.format}: prefix)"
                  if spec.format in spec.prefixes else "")
        reasons.append(
            f"format {spec.format}{origin} is not supported: tremus disks are raw images"
        )
    if spec.script is not None:
        name = spec.script.removeprefix("block-")
        origin = f" (from the {name}: prefix)" if name in spec.prefixes else ""
        reasons.append(
            f"script {spec.script}{origin} is not supported: tremus opens the target itself"
            " and runs no hotplug scripts"
        )
    if spec.backend is not None and spec.backend not in _DOM0_NAMES:
        reasons.append(
            f"backend {spec.backend} is not supported: tremus has no driver domains,"
            " it serves the disk itself"
        )
    if spec.colo:
        reasons.append(
            "colo is not supported: tremus replicates disks the Remus way"
            " (remus:HOST:PORT|aio:PATH), not with COLO block replication"
        )
    return tuple(reasons)


def check_supported(spec: DiskSpec) -> DiskSpec:
    """Return ``spec`` if tremus can honour it.

    Raises:
        UnsupportedDiskError: with every reason, each naming its part.
    """
    reasons = unsupported(spec)
    if reasons:
        raise UnsupportedDiskError(spec.text, reasons)
    return spec
