"""Running the etbench command in a subprocess, and the shape of its one-line errors."""

from __future__ import annotations

import subprocess
import sys


def etbench(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "etbench.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr and lines[-1].startswith("etbench: error:")
    assert fragment in lines[-1]
