"""``helexa acp`` started the wrong way: at a terminal, or on files instead of an editor's
pipes. Real processes; each wait is bounded, and a process that outlives it is killed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

import pytest

from tests.acp.harness import WAIT_S

AGENT = [sys.executable, "-m", "helexa.cli", "acp"]


def finish(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    """Its exit status and stderr (its stdin, when a pipe, closed at once); a process still
    running after WAIT_S fails the test."""
    try:
        _, stderr = proc.communicate(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("helexa acp kept running where it should have said why it cannot")
    return proc.returncode, stderr.decode()


def test_at_a_terminal_it_says_what_it_is_and_exits(xdg: dict[str, str]) -> None:
    controller, terminal = os.openpty()
    try:
        proc = subprocess.Popen(
            AGENT, stdin=terminal, stdout=terminal, stderr=subprocess.PIPE, env=xdg
        )
        os.close(terminal)
        code, stderr = finish(proc)
    finally:
        os.close(controller)
    assert code == 2
    [line] = stderr.splitlines()
    assert "Agent Client Protocol agent for editors" in line
    assert '"agent_servers": {"helexa"' in line and "helexa/acp/README.md" in line


@pytest.mark.parametrize(
    ("stdin", "stdout", "named"),
    [
        ("devnull", "file", "stdin is a character device"),
        ("file", "pipe", "stdin is a regular file"),
        ("pipe", "file", "stdout is a regular file"),
    ],
)
def test_on_files_it_says_why_it_cannot_run(
    tmp_path: Path, xdg: dict[str, str], stdin: str, stdout: str, named: str
) -> None:
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {}}\n')
    out = tmp_path / "out.jsonl"
    with requests.open("rb") as given, out.open("wb") as written:
        ends: dict[str, Any] = {"devnull": subprocess.DEVNULL, "pipe": subprocess.PIPE}
        files: dict[str, IO[bytes]] = {"file": given}
        proc = subprocess.Popen(
            AGENT,
            stdin=files.get(stdin, ends.get(stdin)),
            stdout=written if stdout == "file" else subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=xdg,
        )
        code, stderr = finish(proc)  # a pipe stdin is closed at once: EOF, not a hang
    [line] = stderr.splitlines()
    assert code == 2 and line.startswith(f"helexa acp: {named};")
    assert out.read_bytes() == b""
