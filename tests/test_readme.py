"""README.md says what is true: its examples run, its commands and options exist.

* every ```python block runs verbatim (only its address constant pointed at a live
  peer): a primary example (``BACKUP = "..."``) against a real ``tremus backup``, a
  backup example (``LISTEN = "..."``) with a real ``tremus protect`` connecting to it;
* every ```sh block names scripts and commands that exist;
* every indented ``tremus ...`` command names only options its subcommand accepts,
  and the synopsis names every option the parser has;
* every event is documented by its JSON name;
* README.md and bench/RESULTS.md point only at files in the repository;
* the quick start's ``tremus demo`` ends its ``--json`` output with a true summary.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from tests._microvm_util import needs_kvm
from tests._procs import free_port, start_tremus
from tremus.cli import build_parser
from tremus.engine import events as events_module

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RESULTS = ROOT / "bench" / "RESULTS.md"


# -- reading the README ---------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    kind: str  # the fence's language ("python", "sh", ...), or "indented"
    text: str
    line: int  # where it starts in README.md (1-based)

    @property
    def id(self) -> str:
        return f"{self.kind}-line-{self.line}"


_FENCE = re.compile(r"^```(\w*)\s*$")


def read_blocks(text: str) -> list[Block]:
    """The fenced and the indented (4 spaces, after a blank line) code blocks."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    previous_blank = True
    while i < len(lines):
        line = lines[i]
        fence = _FENCE.match(line)
        if fence:
            start, body = i + 1, []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            assert i < len(lines), f"README.md:{start}: a code fence is never closed"
            blocks.append(Block(fence.group(1) or "text", "\n".join(body) + "\n", start))
            i += 1
            previous_blank = False
            continue
        if previous_blank and line.startswith("    ") and line.strip():
            start, body = i + 1, []
            while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
                body.append(lines[i][4:])
                i += 1
            blocks.append(Block("indented", "\n".join(body).rstrip() + "\n", start))
            previous_blank = False
            continue
        previous_blank = not line.strip()
        i += 1
    return blocks


BLOCKS = read_blocks(README.read_text())
PYTHON_BLOCKS = [b for b in BLOCKS if b.kind == "python"]
SH_BLOCKS = [b for b in BLOCKS if b.kind in ("sh", "bash", "shell", "console")]
COMMAND_BLOCKS = [b for b in BLOCKS if b.kind == "indented" and b.text.startswith("tremus ")]

_BACKUP_CONSTANT = re.compile(r'^BACKUP = "[^"\n]*"', re.M)
_LISTEN_CONSTANT = re.compile(r'^LISTEN = "[^"\n]*"', re.M)
_OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def test_the_readme_has_the_blocks_these_tests_check() -> None:
    assert len(PYTHON_BLOCKS) >= 2
    assert SH_BLOCKS and COMMAND_BLOCKS
    # The first block is the quick start.
    assert BLOCKS[0].kind == "sh" and "tremus demo" in BLOCKS[0].text


def command_lines(block: Block) -> list[str]:
    """The block's commands, continuation lines (indented, or after ``\\``) joined."""
    commands: list[str] = []
    for raw in block.text.splitlines():
        if not raw.strip():
            continue
        if commands and (raw[:1].isspace() or commands[-1].endswith("\\")):
            commands[-1] = commands[-1].rstrip("\\").rstrip() + " " + raw.strip()
        else:
            commands.append(raw.strip())
    return commands


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("tremus.cli.build_parser() has no subcommands")


def options_of(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings
            if option.startswith("--") and option != "--help"}


def check_tremus_command(command: str) -> None:
    """``tremus SUBCOMMAND ...``: the subcommand exists and takes every option named."""
    words = command.split()
    assert words[0] == "tremus", command
    parsers = subcommands()
    assert len(words) > 1 and words[1] in parsers, f"{command!r}: no such subcommand"
    accepted = options_of(parsers[words[1]])
    unknown = sorted(set(_OPTION.findall(command)) - accepted)
    assert not unknown, f"`tremus {words[1]}` does not accept {unknown} ({command!r})"


# -- ```python: run verbatim ------------------------------------------------------------


def _child_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}


async def _run_example(code: str, path: Path, timeout: float = 90) -> subprocess.CompletedProcess[bytes]:
    path.write_text(code)
    with trio.fail_after(timeout):
        return await trio.run_process([sys.executable, str(path)], cwd=str(ROOT),
                                      env=_child_env(), stdin=subprocess.DEVNULL,
                                      capture_stdout=True, capture_stderr=True, check=False)


def _output(proc: subprocess.CompletedProcess[bytes]) -> str:
    return (f"exit {proc.returncode}\nstdout (end):\n{proc.stdout.decode(errors='replace')[-2000:]}"
            f"\nstderr (end):\n{proc.stderr.decode(errors='replace')[-3000:]}")


def _listening(port: int) -> bool:
    """A TCP socket listens on ``port`` (without connecting to it: a probe would be
    taken for the one primary an example accepts)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def test_every_python_block_is_runnable_by_these_tests() -> None:
    for block in PYTHON_BLOCKS:
        compile(block.text, f"README.md:{block.line}", "exec")
        kinds = (len(_BACKUP_CONSTANT.findall(block.text)),
                 len(_LISTEN_CONSTANT.findall(block.text)))
        assert kinds in ((1, 0), (0, 1)), (
            f"README.md:{block.line}: a python block needs one BACKUP = \"...\" (a primary) "
            f"or one LISTEN = \"...\" (a backup) for this test to run it")


@needs_kvm
@pytest.mark.parametrize("block", [b for b in PYTHON_BLOCKS if _BACKUP_CONSTANT.search(b.text)],
                         ids=lambda b: b.id)
async def test_a_primary_example_runs_verbatim_and_stops_gracefully(
        block: Block, tmp_path: Path) -> None:
    port = free_port()
    code, count = _BACKUP_CONSTANT.subn(f'BACKUP = "tcp://127.0.0.1:{port}"', block.text)
    assert count == 1
    async with trio.open_nursery() as nursery:
        backup = await start_tremus(nursery, "backup", "backup", "--listen", f"127.0.0.1:{port}",
                                    "--json", "--state-dir", str(tmp_path / "state"))
        try:
            await backup.wait_for(lambda b: b.of("backup_ready"), what="backup_ready")
            proc = await _run_example(code, tmp_path / "example.py")
            assert proc.returncode == 0, _output(proc)
            # A backup serving one session exits; a backup service closes the replica.
            await backup.wait_for(lambda b: b.of("replica_closed") or b.exited.is_set(),
                                  what="the end of the session", timeout=30)
        finally:
            backup.kill()
    names = [e["event"] for e in backup.events]
    assert "primary_connected" in names, names
    assert not {"failover_started", "failover_complete", "failover_refused"} & set(names), names
    closed = backup.of("replica_closed")
    if closed:
        assert [c["outcome"] for c in closed] == ["ended"], closed
    else:
        assert backup.process.returncode == 0, backup.stderr[-2000:]


@needs_kvm
@pytest.mark.parametrize("block", [b for b in PYTHON_BLOCKS if _LISTEN_CONSTANT.search(b.text)],
                         ids=lambda b: b.id)
async def test_a_backup_example_runs_verbatim_and_serves_a_primary(
        block: Block, tmp_path: Path) -> None:
    port = free_port()
    code, count = _LISTEN_CONSTANT.subn(f'LISTEN = "tcp://127.0.0.1:{port}"', block.text)
    assert count == 1
    result: list[subprocess.CompletedProcess[bytes]] = []

    async def run_example() -> None:
        result.append(await _run_example(code, tmp_path / "example.py"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_example)
        with trio.fail_after(30):
            while not _listening(port):
                assert not result, _output(result[0])
                await trio.sleep(0.05)
        primary = await start_tremus(nursery, "primary", "protect", "--domain",
                                     "microvm:workload=counter,memory=16M",
                                     "--backup", f"127.0.0.1:{port}", "--duration", "5",
                                     "--json")
        try:
            with trio.fail_after(60):
                await primary.exited.wait()
                while not result:
                    await trio.sleep(0.05)
        finally:
            primary.kill()
    assert primary.process.returncode == 0, primary.stderr[-2000:]
    assert primary.of("checkpoint_acked"), primary.events[-5:]
    proc = result[0]
    assert proc.returncode == 0, _output(proc)
    printed = proc.stdout.decode()
    assert "primary_connected" in printed and "failover_started" not in printed, _output(proc)


# -- ```sh: what they name exists ---------------------------------------------------------


def _check_shell_command(command: str) -> None:
    words = command.split()
    match words:
        case ["bash" | "sh", script, *_]:
            assert (ROOT / script).is_file(), f"{command!r}: no {script} in the repository"
        case ["python" | "python3", "-m", module, *_]:
            assert importlib.util.find_spec(module) is not None, f"{command!r}: no {module}"
        case ["python" | "python3", script, *_]:
            assert (ROOT / script).is_file(), f"{command!r}: no {script} in the repository"
        case ["tremus", *_]:
            scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
            assert "tremus" in scripts, "pyproject.toml has no `tremus` entry point"
            module, _, function = scripts["tremus"].partition(":")
            assert callable(getattr(importlib.import_module(module), function))
            check_tremus_command(command)
        case _:
            raise AssertionError(f"{command!r}: not a command this test knows how to check")


@pytest.mark.parametrize("block", SH_BLOCKS, ids=lambda b: b.id)
def test_shell_blocks_name_scripts_and_commands_that_exist(block: Block) -> None:
    for line in block.text.splitlines():
        line = line.split("#", 1)[0].strip()
        for command in re.split(r"&&|\|\||;|\|", line):
            if command.strip():
                _check_shell_command(command.strip())


# -- the command synopsis ---------------------------------------------------------------


@pytest.mark.parametrize("block", COMMAND_BLOCKS, ids=lambda b: b.id)
def test_every_option_shown_is_accepted(block: Block) -> None:
    commands = command_lines(block)
    assert commands
    for command in commands:
        check_tremus_command(command)


def test_the_synopsis_shows_every_subcommand_and_option() -> None:
    synopsis = COMMAND_BLOCKS[0]  # the first: under "## The `tremus` command"
    shown: dict[str, set[str]] = {}
    for command in command_lines(synopsis):
        words = command.split()
        shown.setdefault(words[1], set()).update(_OPTION.findall(command))
    missing = {name: sorted(options_of(parser) - shown.get(name, set()))
               for name, parser in subcommands().items()}
    missing = {name: options for name, options in missing.items() if options}
    absent = sorted(set(subcommands()) - set(shown))
    assert not absent and not missing, f"not in the synopsis: {absent} {missing}"


def test_every_event_is_documented_by_its_json_name() -> None:
    text = README.read_text()
    names = sorted({cls.name for cls in vars(events_module).values()
                    if isinstance(cls, type) and issubclass(cls, events_module.Event)
                    and cls is not events_module.Event})
    assert names
    undocumented = [name for name in names if f"`{name}`" not in text]
    assert not undocumented, f"events README.md does not name: {undocumented}"


# -- no pointer out of the repository -------------------------------------------------------

#: System paths a document may name (they are not files of the repository).
_SYSTEM = ("/dev/", "/proc", "/run/", "/var/", "/sys/", "/etc/", "/tmp")
_FORBIDDEN = ("DESIGN.md", "reference/", "anchors.md", "shared/")
_FILE = re.compile(r".+\.(md|py|sh|json|png)")
_PATHLIKE = re.compile(r"[\w.*-]+(/[\w.*-]+)*/?")


def _referenced(text: str) -> list[str]:
    """Backticked words and link targets that look like files."""
    found: list[str] = []
    for span in re.findall(r"`([^`\n]+)`", text):
        found += span.split()
    found += re.findall(r"\]\(([^)\s]+)\)", text)
    return [w.strip("()[],;:'\"").rstrip(".") for w in found]


#: Placeholders in a path (``bench/NAME.py``): any name matches.
_PLACEHOLDERS = {"NAME", "PID", "DIR", "PATH", "FILE", "N"}


def _exists(word: str, doc: Path) -> bool:
    pattern = "/".join(".".join("*" if piece in _PLACEHOLDERS else piece
                                for piece in part.split("."))
                       for part in word.rstrip("/").split("/"))
    for base in (ROOT, doc.parent):
        if any(base.glob(pattern)):
            return True
    # A bare file name: anywhere in the repository.
    return "/" not in word and any(p for p in ROOT.rglob(word) if ".git" not in p.parts)


@pytest.mark.parametrize("doc", [README, RESULTS], ids=lambda p: str(p.relative_to(ROOT)))
def test_documents_point_only_into_the_repository(doc: Path) -> None:
    text = doc.read_text()
    forbidden = [word for word in _FORBIDDEN if word in text]
    assert not forbidden, f"{doc.name} mentions {forbidden}"
    missing: list[str] = []
    for word in _referenced(text):
        if "://" in word or word.startswith(("http:", "https:", "mailto:")):
            continue
        if word.startswith("/"):
            if not word.startswith(_SYSTEM):
                missing.append(word)  # an absolute path off the system: outside the repo
            continue
        if not _PATHLIKE.fullmatch(word) or not ("/" in word or _FILE.fullmatch(word)):
            continue
        if not _exists(word, doc):
            missing.append(word)
    assert not missing, f"{doc.name} names files that are not in the repository: {missing}"


def test_no_file_of_the_project_points_at_notes_outside_it() -> None:
    """Source, tests and benchmarks stand on their own too: no docstring or comment
    sends the reader to design notes that are not in the repository."""
    offenders = []
    for path in sorted(ROOT.rglob("*")):
        if (".git" in path.parts or not path.is_file() or path == Path(__file__)
                or path.suffix not in {".py", ".c", ".h", ".md", ".sh", ".toml", ".pyi"}):
            continue
        text = path.read_text(errors="replace")
        found = [word for word in _FORBIDDEN if word in text]
        if found:
            offenders.append(f"{path.relative_to(ROOT)}: {found}")
    assert not offenders, offenders


# -- the quick start's demo ------------------------------------------------------------------

_SUMMARY_FIELDS = {
    "who": str, "event": str, "ok": bool, "verdict": str, "downtime_ms": float,
    "failover_epoch": int, "last_acked_epoch": int, "primary_last_line": str,
    "backup_first_line": str, "lines_repeated": int, "lines_missing": int,
    "checkpoints_acked": int, "checkpoints_applied": int,
}


@needs_kvm
def test_demo_json_ends_with_a_summary_that_matches_its_events() -> None:
    proc = subprocess.run([sys.executable, "-m", "tremus.cli", "demo", "--json", "--seconds", "2"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          stdin=subprocess.DEVNULL, env=_child_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    summary = lines[-1]
    assert {k: type(v) for k, v in summary.items()} == _SUMMARY_FIELDS, summary
    assert summary["who"] == "demo" and summary["event"] == "demo_summary"
    assert summary["ok"] is True and summary["verdict"] == "OK", summary
    assert not any(e.get("event") == "demo_summary" for e in lines[:-1])

    def of(who: str, name: str) -> list[dict[str, Any]]:
        return [e for e in lines[:-1] if e["who"] == who and e["event"] == name]

    # The counts are those of the events printed before it.
    acked = of("primary", "checkpoint_acked")
    assert summary["checkpoints_acked"] == len(acked) > 0
    assert summary["last_acked_epoch"] == max(a["epoch"] for a in acked)
    assert summary["checkpoints_applied"] == len(of("backup", "checkpoint_applied"))
    complete = of("backup", "failover_complete")
    assert len(complete) == 1
    assert summary["failover_epoch"] == complete[0]["epoch"]
    assert summary["downtime_ms"] == complete[0]["downtime_ms"] > 0
    # The backup resumes the last checkpoint it applied, which is at least the last one
    # the primary saw acknowledged; every checkpoint up to it was applied, in order.
    assert summary["failover_epoch"] >= summary["last_acked_epoch"]
    assert summary["checkpoints_applied"] == summary["failover_epoch"] + 1
    assert summary["checkpoints_acked"] == summary["last_acked_epoch"] + 1
    # The console: the backup went on after the primary's last line, none twice.
    primary_lines = [e["line"] for e in of("primary", "console")]
    backup_lines = [e["line"] for e in of("backup", "console")]
    assert summary["primary_last_line"] in primary_lines
    assert summary["backup_first_line"] == backup_lines[0]
    last = int(summary["primary_last_line"].split()[1])
    first = int(summary["backup_first_line"].split()[1])
    assert summary["lines_repeated"] == 0
    assert first == last + 1 + summary["lines_missing"]
