"""The server and the client import without torch, and the client without onnxruntime."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _modules_after(imports: str) -> set[str]:
    code = f"import sys\n{imports}\nprint(' '.join(sorted(m.split('.')[0] for m in sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def test_server_and_client_import_without_torch() -> None:
    loaded = _modules_after(
        "import service.server, service.client\n"
        "import service.server.app, service.server.main, service.server.testing\n"
        "from service.server.main import add_serve_arguments, run_serve"
    )
    assert {"service", "grpc", "onnxruntime"} <= loaded
    assert not loaded & {"torch", "torchvision", "models", "trainer", "export"}


def test_client_needs_no_onnxruntime() -> None:
    loaded = _modules_after("import service.client")
    assert "grpc" in loaded
    assert not loaded & {"torch", "onnxruntime", "prometheus_client"}
