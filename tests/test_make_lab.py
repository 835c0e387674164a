"""`make lab`: the command the Makefile runs starts JupyterLab, also as root (Jupyter refuses root without
--allow-root), and passes the user's LAB_ARGS through."""

import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _lab_command(repo: Path, **variables: str) -> list[str]:
    venv = Path(sys.prefix)
    env = {**os.environ, "MAKEFLAGS": ""}
    args = [f"{k}={v}" for k, v in variables.items()]
    # -n: print the recipe only; -W pyproject.toml would force a reinstall line, so point STAMP at an existing file
    proc = subprocess.run(["make", "-n", "-C", str(repo), "lab", f"VENV={venv}", f"STAMP={repo / 'Makefile'}", *args],
                          capture_output=True, text=True, env=env, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if "jupyter lab" in ln]
    assert len(lines) == 1, proc.stdout
    return shlex.split(lines[0])


def test_lab_flags_follow_the_user_id(repo):
    cmd = _lab_command(repo, LAB_ARGS="--port=8765")
    assert cmd[1:3] == ["lab", "--notebook-dir=notebooks"] and cmd[-1] == "--port=8765"
    is_root = os.getuid() == 0
    assert ("--allow-root" in cmd) == is_root
    if is_root:
        assert "--no-browser" in cmd


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_lab_command_starts_a_server(repo, tmp_path):
    """Run the exact recipe line (as whatever user runs the tests) until the server says it is running."""
    cmd = _lab_command(repo, LAB_ARGS=f"--port={_free_port()} --no-browser --ServerApp.token=test")
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg")}
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            seen.append(line)
            if "is running at" in line:
                break
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    log = "".join(seen)
    assert "is running at" in log, log[-2000:]
