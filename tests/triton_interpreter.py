"""Run a twin-check script on CPU through Triton's interpreter.

TRITON_INTERPRET must be set before Triton compiles anything, so each check runs in a fresh
interpreter; the script prints `marker` once every comparison in it has passed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_under_triton_interpreter(script: Path, marker: str, timeout: float) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert marker in done.stdout, done.stdout[-2000:]
