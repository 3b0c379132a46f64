"""Running the project's command lines as a user does: a subprocess from the repository root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Optional

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, env: Optional[Mapping[str, str]] = None, timeout: float = 600,
            module: str = "smartsam") -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` in the repository root, with ``env`` over this environment;
    stdout and stderr captured as text."""
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, **(env or {})), timeout=timeout)
