"""Sampling and latent interpolation: the runtime, the RPCs and the client, the CLI, no torch."""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from tests.blocking import run_blocked
from vaegan.protos.vaegan.v1 import outlier_service_pb2 as pb
from vaegan.protos.vaegan.v1 import outlier_service_pb2_grpc as pb_grpc
from vaegan.service.runtime import InvalidInput, Runtime
from vaegan.service.runtime.generative import latent_path, latent_samples, lerp, slerp
from vaegan.service.server.codec import array_to_tensor, decode_output
from vaegan.service.server.config import ServiceConfig
from vaegan.service.server.testing import ServerThread, sample_sum

MAX_IMAGES = 16  # the test server's --max-images-per-request


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def ends() -> tuple[np.ndarray, np.ndarray]:
    """Two inputs of other sizes and modes than the model's: RGB 40x56 and grey 32x32."""
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    b = np.clip(rng.normal(160, 40, (32, 32)), 0, 255).astype(np.uint8)
    return a, b


def images(resp: pb.SampleResponse | pb.InterpolateResponse) -> np.ndarray:
    return np.stack([decode_output(img) for img in resp.images])


def close(x: np.ndarray, y: np.ndarray, levels: int = 1) -> bool:
    """Equal within ``levels`` grey levels (ONNX Runtime may round differently per batch size)."""
    return x.shape == y.shape and int(np.abs(x.astype(np.int16) - y.astype(np.int16)).max()) <= levels


# ---- the runtime ------------------------------------------------------------------------
def test_sample_is_deterministic_per_seed(runtime: Runtime) -> None:
    s = runtime.spec
    first = runtime.sample(6, seed=7)
    assert first.shape == (6, s.height, s.width, s.channels) and first.dtype == np.uint8
    np.testing.assert_array_equal(runtime.sample(6, seed=7), first)
    np.testing.assert_array_equal(runtime.sample(3, seed=7), first[:3])  # a larger n extends a smaller one
    assert not np.array_equal(runtime.sample(6, seed=8), first)
    assert not np.array_equal(runtime.sample(6), runtime.sample(6))  # no seed: fresh draws
    assert len({first[i].tobytes() for i in range(6)}) == 6  # six different images


def test_sample_in_chunks_equals_one_batch(tiny_bundle: Path, runtime: Runtime) -> None:
    small = Runtime.load(tiny_bundle, providers="cpu", max_batch_size=4, warmup=False)
    assert close(small.sample(10, seed=1), runtime.sample(10, seed=1))


def test_temperature_scales_the_spread(runtime: Runtime) -> None:
    z1 = latent_samples(1024, 64, seed=0)
    assert abs(float(z1.std()) - 1.0) < 0.03
    np.testing.assert_allclose(latent_samples(1024, 64, seed=0, temperature=0.5), 0.5 * z1)
    spread = {t: float(runtime.sample(64, seed=1, temperature=t).astype(np.float32).std(axis=0).mean())
              for t in (0.1, 1.0)}
    assert spread[0.1] < 0.5 * spread[1.0], spread


@pytest.mark.parametrize(
    "kwargs,name",
    [({"n": 0}, "n"), ({"n": 1025}, "n"), ({"n": 2.0}, "n"), ({"n": True}, "n"),
     ({"n": 2, "temperature": 0.0}, "temperature"), ({"n": 2, "temperature": -1.0}, "temperature"),
     ({"n": 2, "temperature": math.nan}, "temperature"), ({"n": 2, "temperature": math.inf}, "temperature"),
     ({"n": 2, "seed": -1}, "seed"), ({"n": 2, "seed": 1.5}, "seed")],
)
def test_sample_rejects_bad_arguments(runtime: Runtime, kwargs: dict, name: str) -> None:
    with pytest.raises(InvalidInput, match=rf"^{name} must be .*got {kwargs[name]!r}"):
        runtime.sample(**kwargs)


@pytest.mark.parametrize("method", ["linear", "slerp"])
def test_interpolate_ends_are_the_reconstructions(runtime: Runtime, ends, method: str) -> None:
    a, b = ends
    path = runtime.interpolate(a, b, steps=7, method=method)
    s = runtime.spec
    assert path.shape == (7, s.height, s.width, s.channels) and path.dtype == np.uint8
    recon = runtime.reconstruct([a, b])
    assert close(path[0], recon[0]) and close(path[-1], recon[1])


def test_interpolate_takes_files_and_bytes_like_scoring(runtime: Runtime, ends, tmp_path: Path) -> None:
    a, b = ends
    Image.fromarray(a).save(tmp_path / "a.png")
    from_files = runtime.interpolate(tmp_path / "a.png", png(b), steps=3)
    np.testing.assert_array_equal(from_files, runtime.interpolate(a, b, steps=3))


def test_slerp_and_linear_share_ends_and_differ_between(runtime: Runtime, ends) -> None:
    lin = runtime.interpolate(*ends, steps=5, method="linear")
    sph = runtime.interpolate(*ends, steps=5, method="slerp")
    np.testing.assert_array_equal(lin[[0, -1]], sph[[0, -1]])
    assert not np.array_equal(lin[2], sph[2])


def test_latent_paths() -> None:
    a, b = np.array([3.0, 0.0], np.float32), np.array([0.0, 3.0], np.float32)
    t = np.linspace(0, 1, 5)
    arc = slerp(a, b, t)
    np.testing.assert_allclose(np.linalg.norm(arc, axis=1), 3.0)  # on the circle, not the chord
    np.testing.assert_allclose(arc[2], [3 / math.sqrt(2)] * 2)
    np.testing.assert_allclose(lerp(a, b, t)[2], [1.5, 1.5])
    parallel = np.array([6.0, 1e-9], np.float32)
    np.testing.assert_allclose(slerp(a, parallel, t), lerp(a, parallel, t))  # the fallback
    np.testing.assert_allclose(slerp(a, -a, t), lerp(a, -a, t))
    rng = np.random.default_rng(0)
    u, v = rng.standard_normal(16).astype(np.float32), rng.standard_normal(16).astype(np.float32)
    for method in ("linear", "slerp"):
        path = latent_path(u, v, 9, method)
        assert path.shape == (9, 16) and path.dtype == np.float32
        np.testing.assert_array_equal(path[0], u)
        np.testing.assert_array_equal(path[-1], v)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"steps": 1}, r"^steps must be .*got 1"), ({"steps": 257}, r"^steps must be .*got 257"),
     ({"method": "cubic"}, r"^method must be .*got 'cubic'"), ({"method": "both"}, r"^method")],
)
def test_interpolate_rejects_bad_arguments(runtime: Runtime, ends, kwargs: dict, match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        runtime.interpolate(*ends, **kwargs)


def test_interpolate_names_a_missing_or_undecodable_end(runtime: Runtime, ends, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"^b: no such file .*nope\.png"):
        runtime.interpolate(ends[0], tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(InvalidInput, match=r"^a: cannot decode .*bad\.png"):
        runtime.interpolate(tmp_path / "bad.png", ends[1])


def test_sampling_and_interpolation_need_no_torch(tiny_bundle: Path, tmp_path: Path) -> None:
    code = (
        "import numpy as np\n"
        "from vaegan.service.runtime import Runtime\n"
        "from vaegan.cli import main\n"
        f"rt = Runtime.load({str(tiny_bundle)!r}, providers='cpu')\n"
        "s = rt.sample(4, seed=0)\n"
        "p = rt.interpolate(np.zeros((20, 30), np.uint8), np.full((32, 32, 3), 200, np.uint8), 3, 'slerp')\n"
        f"code = main(['--log-level', 'WARNING', 'sample', '--model', {str(tiny_bundle)!r}, '--n', '2', "
        f"'--out', {str(tmp_path / 'g.png')!r}])\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision'))\n"
        "print(s.shape, p.shape, code, bad)\n"
    )
    out = run_blocked(("torch", "torchvision"), code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "(4, 32, 32, 3) (3, 32, 32, 3) 0 []"


# ---- over gRPC ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_bundle: Path, runtime: Runtime) -> Iterator[ServerThread]:
    cfg = ServiceConfig(
        model=tiny_bundle, host="127.0.0.1", port=0, metrics_port=-1,
        max_batch_size=8, max_delay_ms=5.0, decode_workers=2, max_images_per_request=MAX_IMAGES,
    )
    with ServerThread(cfg, runtime) as srv:
        yield srv


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[pb_grpc.OutlierServiceStub]:
    with grpc.insecure_channel(server.target) as ch:
        yield pb_grpc.OutlierServiceStub(ch)


def test_sample_rpc_equals_the_runtime(server: ServerThread, stub, runtime: Runtime) -> None:
    before = sample_sum(server.server.metrics.registry, "vaegan_images_total", {"method": "Sample"})
    req = pb.SampleRequest(n=5, seed=3, temperature=0.8, image_format=pb.IMAGE_FORMAT_RAW)
    resp = stub.Sample(req, timeout=60)
    np.testing.assert_array_equal(images(resp), runtime.sample(5, seed=3, temperature=0.8))
    assert resp.seed == 3
    assert (resp.model_name, resp.model_version) == (runtime.bundle.name, runtime.bundle.version)
    png_resp = stub.Sample(pb.SampleRequest(n=5, seed=3, temperature=0.8), timeout=60)  # PNG, the default
    assert all(img.WhichOneof("data") == "encoded" for img in png_resp.images)
    np.testing.assert_array_equal(images(png_resp), images(resp))
    after = sample_sum(server.server.metrics.registry, "vaegan_images_total", {"method": "Sample"})
    assert after - before == 10


def test_sample_rpc_without_a_seed_reports_the_one_it_drew(stub, runtime: Runtime) -> None:
    resp = stub.Sample(pb.SampleRequest(n=2, image_format=pb.IMAGE_FORMAT_RAW), timeout=60)  # temperature 0 = 1.0
    np.testing.assert_array_equal(images(resp), runtime.sample(2, seed=resp.seed))


def test_interpolate_rpc_equals_the_runtime(stub, runtime: Runtime, ends) -> None:
    a, b = ends
    req = pb.InterpolateRequest(
        a=pb.Image(id="a.png", encoded=png(a)), b=pb.Image(tensor=array_to_tensor(b)), steps=5, method="slerp",
        image_format=pb.IMAGE_FORMAT_RAW,
    )
    resp = stub.Interpolate(req, timeout=60)
    np.testing.assert_array_equal(images(resp), runtime.interpolate(a, b, steps=5, method="slerp"))
    assert (resp.model_name, resp.model_version) == (runtime.bundle.name, runtime.bundle.version)
    defaults = stub.Interpolate(pb.InterpolateRequest(a=req.a, b=req.b), timeout=60)  # 8 steps, linear, PNG
    np.testing.assert_array_equal(images(defaults), runtime.interpolate(a, b))


def _sample(**fields: object):
    return lambda stub: stub.Sample(pb.SampleRequest(**fields), timeout=60)


def _interpolate(**fields: object):
    a, b = pb.Image(tensor=array_to_tensor(np.zeros((8, 8), np.uint8))), pb.Image(encoded=png(np.zeros((9, 9), np.uint8)))
    base = {"a": a, "b": b}
    return lambda stub: stub.Interpolate(pb.InterpolateRequest(**{**base, **fields}), timeout=60)


@pytest.mark.parametrize(
    "call,code,needle",
    [
        (_sample(), grpc.StatusCode.INVALID_ARGUMENT, "n must be an integer in 1..1024, got 0"),
        (_sample(n=-3), grpc.StatusCode.INVALID_ARGUMENT, "n must be"),
        (_sample(n=2000), grpc.StatusCode.INVALID_ARGUMENT, "n must be"),
        (_sample(n=MAX_IMAGES + 1), grpc.StatusCode.RESOURCE_EXHAUSTED, "n: 17 images"),
        (_sample(n=2, temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT, "temperature must be"),
        (_sample(n=2, temperature=math.nan), grpc.StatusCode.INVALID_ARGUMENT, "temperature must be"),
        (_sample(n=2, image_format=9), grpc.StatusCode.INVALID_ARGUMENT, "image_format"),
        (_interpolate(steps=1), grpc.StatusCode.INVALID_ARGUMENT, "steps must be"),
        (_interpolate(steps=300), grpc.StatusCode.INVALID_ARGUMENT, "steps must be"),
        (_interpolate(steps=MAX_IMAGES + 1), grpc.StatusCode.RESOURCE_EXHAUSTED, "steps: 17 images"),
        (_interpolate(method="cubic"), grpc.StatusCode.INVALID_ARGUMENT, "method must be one of linear, slerp, got 'cubic'"),
        (_interpolate(a=pb.Image()), grpc.StatusCode.INVALID_ARGUMENT, "a: no image data"),
        (_interpolate(b=pb.Image(id="x.png", encoded=b"junk")), grpc.StatusCode.INVALID_ARGUMENT, "b (id 'x.png'): cannot decode"),
        (_sample(n=1, model_name="other"), grpc.StatusCode.NOT_FOUND, "other"),
    ],
)
def test_bad_requests_are_refused_naming_the_field(server: ServerThread, stub, call, code, needle: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        call(stub)
    assert err.value.code() == code, err.value.details()
    assert needle in err.value.details()
    assert stub.Sample(pb.SampleRequest(n=1, seed=0), timeout=60).images  # still serving


def test_client_sample_and_interpolate(server: ServerThread, runtime: Runtime, ends, tmp_path: Path) -> None:
    from vaegan.service.client import OutlierClient, OutlierClientError

    a, b = ends
    Image.fromarray(a).save(tmp_path / "a.png")
    with OutlierClient(server.target, timeout=60) as client:
        np.testing.assert_array_equal(client.sample(4, seed=2, temperature=0.5), runtime.sample(4, 2, 0.5))
        path = client.interpolate(tmp_path / "a.png", b, steps=4, method="slerp")
        np.testing.assert_array_equal(path, runtime.interpolate(a, b, steps=4, method="slerp"))
        with pytest.raises(OutlierClientError) as err:
            client.interpolate(a, b, steps=1)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "steps" in err.value.details


# ---- the command line ---------------------------------------------------------------------
def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_cli_sample_grid_and_folder(tiny_bundle: Path, runtime: Runtime, tmp_path: Path, capsys) -> None:
    from vaegan.cli import main

    s = runtime.spec
    expected = runtime.sample(10, seed=1)
    assert main(["--log-level", "WARNING", "sample", "--model", str(tiny_bundle), "--n", "10", "--seed", "1",
                 "--out", str(tmp_path / "grid.png")]) == 0
    assert "10 samples (seed 1" in _one_line(capsys.readouterr().out)
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (3 * s.height + 2 * 2, 4 * s.width + 3 * 2, 3)  # 10 images: 3 rows of 4, 2 px gutters
    for i in (0, 5, 9):
        top, left = (i // 4) * (s.height + 2), (i % 4) * (s.width + 2)
        np.testing.assert_array_equal(grid[top : top + s.height, left : left + s.width], expected[i])

    assert main(["--log-level", "WARNING", "sample", "--model", str(tiny_bundle), "--n", "3", "--seed", "1",
                 "--temperature", "1.0", "--out", str(tmp_path / "aug")]) == 0
    _one_line(capsys.readouterr().out)
    files = sorted(p.name for p in (tmp_path / "aug").iterdir())
    assert files == ["sample_00000.png", "sample_00001.png", "sample_00002.png"]
    for i, name in enumerate(files):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "aug" / name)), expected[i])


def test_cli_writes_grey_images_grey(tmp_path: Path) -> None:
    from vaegan.cli import _save_image

    grey = np.arange(12, dtype=np.uint8).reshape(3, 4, 1)  # a grey model's (H, W, 1)
    _save_image(grey, tmp_path / "g.png")
    with Image.open(tmp_path / "g.png") as im:
        assert im.mode == "L" and im.size == (4, 3)
        np.testing.assert_array_equal(np.asarray(im), grey[:, :, 0])


def test_cli_interpolate_strip(tiny_bundle: Path, runtime: Runtime, ends, tmp_path: Path, capsys) -> None:
    from vaegan.cli import main

    s = runtime.spec
    a, b = ends
    Image.fromarray(a).save(tmp_path / "a.png")
    Image.fromarray(b).save(tmp_path / "b.png")
    base = ["--log-level", "WARNING", "interpolate", str(tmp_path / "a.png"), str(tmp_path / "b.png"),
            "--model", str(tiny_bundle), "--steps", "5"]
    assert main([*base, "--out", str(tmp_path / "strip.png")]) == 0
    _one_line(capsys.readouterr().out)
    strip = np.asarray(Image.open(tmp_path / "strip.png"))
    assert strip.shape == (s.height, 5 * s.width + 4 * 2, 3)
    np.testing.assert_array_equal(strip[:, : s.width], runtime.interpolate(a, b, steps=5)[0])
    assert main([*base, "--method", "both", "--out", str(tmp_path / "both.png")]) == 0
    assert "linear, slerp" in _one_line(capsys.readouterr().out)
    both = np.asarray(Image.open(tmp_path / "both.png"))
    assert both.shape == (2 * s.height + 2, 5 * s.width + 4 * 2, 3)
    slerp_row = runtime.interpolate(a, b, steps=5, method="slerp")
    np.testing.assert_array_equal(both[s.height + 2 :, s.width + 2 : 2 * s.width + 2], slerp_row[1])


def test_cli_mistakes_are_one_line_and_exit_2(tiny_bundle: Path, tmp_path: Path, capsys) -> None:
    from vaegan.cli import main

    Image.new("RGB", (10, 10)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    model = ["--model", str(tiny_bundle)]
    cases = [
        (["interpolate", str(tmp_path / "missing.png"), str(tmp_path / "ok.png"), *model, "--out", str(tmp_path / "s.png")],
         "missing.png"),
        (["interpolate", str(tmp_path / "ok.png"), str(tmp_path / "bad.png"), *model, "--out", str(tmp_path / "s.png")],
         "bad.png"),
        (["interpolate", str(tmp_path / "ok.png"), str(tmp_path / "ok.png"), *model, "--out", str(tmp_path / "s.txt")],
         "s.txt"),
        (["interpolate", str(tmp_path / "ok.png"), str(tmp_path / "ok.png"), *model, "--steps", "1",
          "--out", str(tmp_path / "s.png")], "steps"),
        (["sample", *model, "--n", "0", "--out", str(tmp_path / "g.png")], "n must be"),
        (["sample", *model, "--temperature", "-2", "--out", str(tmp_path / "g.png")], "temperature"),
        (["sample", "--model", str(tmp_path / "nobundle"), "--out", str(tmp_path / "g.png")], "nobundle"),
    ]
    for argv, needle in cases:
        assert main(["--log-level", "WARNING", *argv]) == 2, argv
        line = _one_line(capsys.readouterr().err)
        assert line.startswith(f"vaegan {argv[0]}: error: ") and needle in line, line
