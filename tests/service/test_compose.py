"""The composed normalize -> E -> G -> D pipeline graph: same numbers as numpy normalization and
the three graphs, one ORT call."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vaegan.service.runtime import BundleError, Runtime, load_bundle
from vaegan.service.runtime import compose as compose_module
from vaegan.service.runtime.bundle import PIPELINE, sha256_file, write_manifest
from vaegan.service.runtime.compose import compose_pipeline
from vaegan.service.runtime.preprocess import normalize

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def separate(tiny_bundle: Path) -> Runtime:
    return Runtime.load(tiny_bundle, providers="cpu", fuse=False)


def _batch(rt: Runtime, n: int, seed: int = 0) -> np.ndarray:
    """uint8 (N, H, W, C) images at model size."""
    s = rt.spec
    return np.random.default_rng(seed).integers(0, 256, (n, s.height, s.width, s.channels), dtype=np.uint8)


@pytest.mark.parametrize("n", [1, 7])
def test_pipeline_matches_numpy_normalization_and_the_three_graphs(
    runtime: Runtime, separate: Runtime, n: int
) -> None:
    assert runtime.pipeline is not None and separate.pipeline is None
    images = _batch(runtime, n, seed=n)
    fused, three = runtime.forward_images(images), separate.forward_images(images)
    # the graph normalizes with numpy's float32 operations, in the same order
    np.testing.assert_allclose(fused.x, normalize(images, runtime.spec), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(three.x, normalize(images, runtime.spec))
    for name in ("x_hat", "logit", "feat_x", "feat_xhat"):
        a, b = getattr(fused, name), getattr(three, name)
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5, err_msg=name)
    r1, r2 = runtime.score_forward(fused), separate.score_forward(three)
    np.testing.assert_allclose(r1.score, r2.score, atol=1e-4)


def test_pipeline_is_one_call_and_timed_as_such(runtime: Runtime, separate: Runtime) -> None:
    images = _batch(runtime, 3)
    fused_t: dict[str, float] = {}
    three_t: dict[str, float] = {}
    runtime.forward_images(images, fused_t)
    separate.forward_images(images, three_t)
    assert set(fused_t) == {"pipeline"}
    assert set(three_t) == {"encoder", "generator", "discriminator"}
    assert all(t > 0 for t in (*fused_t.values(), *three_t.values()))


def test_pipeline_graph_signature(tiny_bundle: Path, runtime: Runtime) -> None:
    import onnx

    s = runtime.spec
    paths = [runtime.bundle.graph_path(g) for g in ("encoder", "generator", "discriminator")]
    model = onnx.load_from_string(compose_pipeline(*paths, mean=s.mean, std=s.std))
    (images,) = model.graph.input
    assert images.name == "images" and images.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_value for d in images.type.tensor_type.shape.dim][1:] == [s.height, s.width, s.channels]
    assert [o.name for o in model.graph.output] == ["x", "x_hat", "logit", "features", "patch"]
    # every weight of the three graphs is there once, under its graph's prefix (pre/: mean, std)
    prefixes = {init.name.split("/", 1)[0] for init in model.graph.initializer}
    assert prefixes == {"pre", "e", "g", "d"}


def test_pipeline_refuses_a_channel_count_the_encoder_does_not_take(runtime: Runtime) -> None:
    paths = [runtime.bundle.graph_path(g) for g in ("encoder", "generator", "discriminator")]
    with pytest.raises(ValueError, match="does not take 1-channel images"):
        compose_pipeline(*paths, mean=[0.5], std=[0.5])


def _without_pipeline(bundle: Path, dest: Path) -> Path:
    """A copy of ``bundle`` as written before export composed the pipeline."""
    shutil.copytree(bundle, dest)
    (dest / PIPELINE).unlink()
    manifest = json.loads((dest / "manifest.json").read_text())
    del manifest["files"][PIPELINE]
    write_manifest(dest, manifest)
    return dest


def test_export_writes_the_pipeline_and_loading_it_imports_no_onnx(tiny_bundle: Path, runtime: Runtime) -> None:
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert manifest["files"][PIPELINE] == sha256_file(tiny_bundle / PIPELINE)
    assert runtime.bundle.pipeline_path == tiny_bundle / PIPELINE
    code = (
        "import sys\n"
        "from vaegan.service.runtime import Runtime\n"
        f"rt = Runtime.load({str(tiny_bundle)!r}, providers='cpu')\n"
        "assert rt.pipeline is not None\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'onnx'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_bundle_without_the_pipeline_is_composed_at_load(tiny_bundle: Path, runtime: Runtime, tmp_path: Path) -> None:
    old = Runtime.load(_without_pipeline(tiny_bundle, tmp_path / "old"), providers="cpu")
    assert old.bundle.pipeline_path is None and old.pipeline is not None
    images = _batch(runtime, 5)
    a, b = runtime.forward_images(images), old.forward_images(images)
    for name in ("x_hat", "logit", "feat_x", "feat_xhat", "patch"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_a_tampered_pipeline_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(tiny_bundle, bad)
    data = bytearray((bad / PIPELINE).read_bytes())
    data[-1] ^= 1
    (bad / PIPELINE).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="pipeline.onnx: sha256 mismatch"):
        load_bundle(bad)


def test_uncomposable_graphs_fall_back_to_three_calls(
    tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    def refuse(*paths: Path, **normalization: object) -> bytes:
        raise ValueError("the graphs use different opsets")

    monkeypatch.setattr(compose_module, "compose_pipeline", refuse)
    rt = Runtime.load(_without_pipeline(tiny_bundle, tmp_path / "old"), providers="cpu")
    assert rt.pipeline is None
    assert "cannot compose" in caplog.text
    timings: dict[str, float] = {}
    out = rt.forward_images(_batch(rt, 2), timings)
    assert out.x_hat.shape[0] == 2 and set(timings) == {"encoder", "generator", "discriminator"}
