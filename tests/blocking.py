"""Run Python in a subprocess where some top-level modules cannot be imported (as in an install
without the extra that brings them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def preamble(blocked: tuple[str, ...]) -> str:
    """Code that makes ``blocked`` (and their submodules) raise ModuleNotFoundError on import."""
    return (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {blocked!r}:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r} (blocked in this test)', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
    )


def run_blocked(blocked: tuple[str, ...], body: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``body`` run with ``blocked`` unimportable, from the repository root."""
    code = preamble(blocked) + body
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=timeout)
