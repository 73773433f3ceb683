"""The composed E -> G -> D pipeline graph: same numbers as the three graphs, one ORT call."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.runtime import Runtime
from service.runtime import runtime as runtime_module
from service.runtime.compose import compose_pipeline


@pytest.fixture(scope="module")
def separate(tiny_bundle: Path) -> Runtime:
    return Runtime.load(tiny_bundle, providers="cpu", fuse=False)


def _batch(rt: Runtime, n: int, seed: int = 0) -> np.ndarray:
    s = rt.spec
    return np.random.default_rng(seed).standard_normal((n, s.channels, s.height, s.width)).astype(np.float32)


@pytest.mark.parametrize("n", [1, 7])
def test_pipeline_matches_the_three_graphs(runtime: Runtime, separate: Runtime, n: int) -> None:
    assert runtime.pipeline is not None and separate.pipeline is None
    x = _batch(runtime, n, seed=n)
    fused, three = runtime.forward(x), separate.forward(x)
    for name in ("x_hat", "logit", "feat_x", "feat_xhat"):
        a, b = getattr(fused, name), getattr(three, name)
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5, err_msg=name)
    r1, r2 = runtime.score_forward(fused), separate.score_forward(three)
    np.testing.assert_allclose(r1.score, r2.score, atol=1e-4)


def test_pipeline_is_one_call_and_timed_as_such(runtime: Runtime, separate: Runtime) -> None:
    x = _batch(runtime, 3)
    fused_t: dict[str, float] = {}
    three_t: dict[str, float] = {}
    runtime.forward(x, fused_t)
    separate.forward(x, three_t)
    assert set(fused_t) == {"pipeline"}
    assert set(three_t) == {"encoder", "generator", "discriminator"}
    assert all(t > 0 for t in (*fused_t.values(), *three_t.values()))


def test_pipeline_graph_signature(tiny_bundle: Path, runtime: Runtime) -> None:
    import onnx

    paths = [runtime.bundle.graph_path(g) for g in ("encoder", "generator", "discriminator")]
    model = onnx.load_from_string(compose_pipeline(*paths))
    assert [i.name for i in model.graph.input] == ["x"]
    assert [o.name for o in model.graph.output] == ["x_hat", "logit", "features"]
    # every weight of the three graphs is there once, under its graph's prefix
    prefixes = {init.name.split("/", 1)[0] for init in model.graph.initializer}
    assert prefixes == {"e", "g", "d"}


def test_uncomposable_graphs_fall_back_to_three_calls(
    tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(*paths: Path) -> bytes:
        raise ValueError("the graphs use different opsets")

    monkeypatch.setattr(runtime_module, "compose_pipeline", refuse)
    rt = Runtime.load(tiny_bundle, providers="cpu")
    assert rt.pipeline is None
    assert "cannot compose" in caplog.text
    timings: dict[str, float] = {}
    out = rt.forward(_batch(rt, 2), timings)
    assert out.x_hat.shape[0] == 2 and set(timings) == {"encoder", "generator", "discriminator"}
