"""The server and the client import without torch, and the client without onnxruntime."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _modules_after(imports: str) -> set[str]:
    # top-level names, and vaegan's own packages as vaegan.<package>
    code = (f"import sys\n{imports}\nprint(' '.join(sorted('.'.join(m.split('.')[:2 if m.startswith('vaegan.') else 1]) "
            "for m in sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def test_server_and_client_import_without_torch() -> None:
    loaded = _modules_after(
        "import vaegan.service.server, vaegan.service.client\n"
        "import vaegan.service.server.app, vaegan.service.server.main, vaegan.service.server.testing\n"
        "from vaegan.service.server.main import add_serve_arguments, run_serve"
    )
    assert {"vaegan.service", "grpc", "onnxruntime"} <= loaded
    assert not loaded & {"torch", "torchvision", "vaegan.models", "vaegan.trainer", "vaegan.export"}
    assert not loaded & {"service", "models", "trainer", "export", "protos"}  # no generic top-level names


def test_client_needs_no_onnxruntime() -> None:
    loaded = _modules_after("import vaegan.service.client")
    assert "grpc" in loaded
    assert not loaded & {"torch", "onnxruntime", "prometheus_client"}
