"""A conditional bundle (``vaegan train --conditional``) served: the runtime with torch blocked,
scoring against a claimed class or the best class, the gRPC ``class_id`` field through the
dynamic batcher, the client, and the errors; unconditional bundles (old ones too) unchanged."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from tests.blocking import run_blocked
from tests.conditional_data import COND_CLASSES, conditional_image
from vaegan.protos.vaegan.v1 import outlier_service_pb2 as pb
from vaegan.protos.vaegan.v1 import outlier_service_pb2_grpc as pb_grpc
from vaegan.service.client import OutlierClient
from vaegan.service.runtime import InvalidInput, Runtime
from vaegan.service.runtime.bundle import load_bundle, write_manifest
from vaegan.service.server.codec import array_to_tensor, decode_output
from vaegan.service.server.config import ServiceConfig
from vaegan.service.server.testing import ServerThread, sample_sum

K = len(COND_CLASSES)
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def crt(conditional_bundle: Path) -> Runtime:
    return Runtime.load(conditional_bundle, providers="cpu")


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """uint8 (7, 28, 28): two of each class and one of noise."""
    rng = np.random.default_rng(11)
    made = [conditional_image(c, rng) for c in (0, 1, 2, 0, 1, 2)]
    return np.stack([*made, rng.integers(0, 256, (28, 28), dtype=np.uint8)])


@pytest.fixture(scope="module")
def plain_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An unconditional, uncalibrated 28x28 grey bundle (untrained: only its interface matters)."""
    torch = pytest.importorskip("torch")
    from vaegan.export import write_bundle
    from vaegan.models import VAEGAN, ModelConfig
    from vaegan.service.runtime.preprocess import ImageSpec

    torch.manual_seed(0)
    model = VAEGAN(ModelConfig(num_channels=1, image_size=28, latent_dim=8, base_width=8)).eval()
    out = tmp_path_factory.mktemp("plain_bundle")
    write_bundle(model, ImageSpec(channels=1, height=28, width=28, mean=(0.5,), std=(0.5,)), out, name="plain")
    return out


# ---- the runtime --------------------------------------------------------------------------
def test_best_class_is_the_minimum_over_the_classes(crt: Runtime, images: np.ndarray) -> None:
    n = len(images)
    best = crt.score(images)
    per_class = [crt.score(images, classes=[k] * n) for k in range(K)]
    scores = np.stack([r.score for r in per_class])  # (K, N): each image against each class
    assert all(r.classes.tolist() == [k] * n for k, r in enumerate(per_class))
    np.testing.assert_allclose(best.score, scores.min(axis=0), rtol=1e-6, atol=1e-9)
    assert best.classes.tolist() == scores.argmin(axis=0).tolist()
    for i, k in enumerate(best.classes):  # every output is that class's
        for name, v in best.components.items():
            assert v[i] == pytest.approx(per_class[k].components[name][i], rel=1e-6, abs=1e-9)
        np.testing.assert_allclose(best.anomaly_map[i], per_class[k].anomaly_map[i], atol=1e-6)
        assert best.is_outlier[i] == per_class[k].is_outlier[i]
    # claimed classes, mixed with "best" entries (None or -1)
    mixed = crt.score(images, classes=[2, None, 0, -1, 1, 2, None])
    want = [2, best.classes[1], 0, best.classes[3], 1, 2, best.classes[6]]
    assert mixed.classes.tolist() == [int(c) for c in want]
    np.testing.assert_allclose(mixed.score, [scores[c, i] for i, c in enumerate(want)], rtol=1e-6, atol=1e-9)


def test_the_composed_graph_equals_the_three_graphs(conditional_bundle: Path, crt: Runtime, images: np.ndarray) -> None:
    assert crt.pipeline is not None  # pipeline.onnx takes the label too
    separate = Runtime.load(conditional_bundle, providers="cpu", fuse=False)
    assert separate.pipeline is None
    x = images[..., None]
    for classes in ([0, 1, 2, 0, 1, 2, 0], None):
        a, b = crt.forward_images(x, classes=classes), separate.forward_images(x, classes=classes)
        assert a.classes.tolist() == b.classes.tolist()
        for name in ("x", "x_hat", "logit", "feat_x", "feat_xhat", "patch"):
            np.testing.assert_allclose(getattr(a, name), getattr(b, name), atol=1e-5)


def test_the_runtime_scores_where_torch_cannot_load(conditional_bundle: Path, crt: Runtime, images: np.ndarray) -> None:
    code = (
        "import json, sys\n"
        "import numpy as np\n"
        "from vaegan.service.runtime import Runtime\n"
        f"rt = Runtime.load({str(conditional_bundle)!r}, providers='cpu')\n"
        f"images = np.array({images.tolist()}, np.uint8)\n"
        "best = rt.score(images)\n"
        "claimed = rt.score(images, classes=[1] * len(images))\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'torch']\n"
        "print(json.dumps({'best': best.score.tolist(), 'classes': best.classes.tolist(),\n"
        "                  'claimed': claimed.score.tolist()}))\n"
    )
    out = run_blocked(("torch", "torchvision"), code)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(got["best"], crt.score(images).score, rtol=1e-6)
    assert got["classes"] == crt.score(images).classes.tolist()
    np.testing.assert_allclose(got["claimed"], crt.score(images, classes=[1] * len(images)).score, rtol=1e-6)


def test_calibration_scores_as_the_runtime_does_by_default(conditional_run, crt: Runtime) -> None:
    """The calibration samples are the calibration part's components, each image against its
    best class under the calibrated weights: exactly what the runtime serves."""
    from vaegan.trainer.pipeline import load_split

    outcome, cfg = conditional_run
    split = load_split(cfg, crt.spec)
    cal = crt.bundle.calibration
    assert cal is not None and cal.n == len(split.calibration)
    served = crt.score(split.calibration.images)
    for name, samples in cal.samples.items():
        np.testing.assert_allclose(samples, served.components[name], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.sort(cal.combine(cal.samples)), np.sort(served.score), rtol=1e-6, atol=1e-9)


def test_class_errors_name_the_entry(crt: Runtime, plain_bundle: Path, images: np.ndarray) -> None:
    with pytest.raises(InvalidInput, match=r"classes\[1\]: class 3 is out of range; this model has classes 0\.\.2"):
        crt.score(images[:2], classes=[0, 3])
    with pytest.raises(InvalidInput, match="got 1 classes for 2 images"):
        crt.score(images[:2], classes=[0])
    with pytest.raises(InvalidInput, match=r"classes\[0\]: a class id must be an integer"):
        crt.score(images[:1], classes=[1.5])
    plain = Runtime.load(plain_bundle, providers="cpu")
    with pytest.raises(InvalidInput, match=r"classes\[0\]: this model is not conditional"):
        plain.score(images[:1], classes=[0])
    with pytest.raises(InvalidInput, match="not conditional"):
        plain.sample(2, seed=0, classes=1)
    res = plain.score(images[:2])
    assert res.classes.tolist() == [-1, -1] and plain.num_classes == 0 and plain.bundle.class_names == []


def test_sample_reconstruct_inpaint_repair_interpolate_take_a_class(crt: Runtime, images: np.ndarray) -> None:
    n = 6
    np.testing.assert_array_equal(crt.sample(n, seed=0), crt.sample(n, seed=0, classes=[0, 1, 2, 0, 1, 2]))
    np.testing.assert_array_equal(crt.sample(3, seed=0, classes=2), crt.sample(3, seed=0, classes=[2, 2, 2]))
    assert not np.array_equal(crt.sample(3, seed=0, classes=0), crt.sample(3, seed=0, classes=1))
    with pytest.raises(InvalidInput, match="out of range"):
        crt.sample(2, seed=0, classes=5)
    best = crt.score(images)
    np.testing.assert_array_equal(crt.reconstruct(images), crt.reconstruct(images, classes=best.classes))
    assert crt.reconstruct(images[:2], classes=[1, 2]).shape == (2, 28, 28, 1)
    masks = [np.pad(np.ones((8, 8), np.uint8), 10)] * 2
    filled = crt.inpaint(images[:2], masks, classes=[0, 2])
    assert len(filled) == 2 and filled[0].shape == (28, 28, 1)
    np.testing.assert_array_equal(filled[0][masks[0] == 0, 0], images[0][masks[0] == 0])  # outside: as sent
    assert [f.shape for f in crt.inpaint(images[:2], masks)] == [(28, 28, 1)] * 2  # the best class
    fixed, fix_masks = crt.repair(images[:2], classes=[1, None])
    assert len(fixed) == len(fix_masks) == 2
    path = crt.interpolate(images[0], images[3], steps=4, class_id=0)
    assert path.shape == (4, 28, 28, 1)
    np.testing.assert_array_equal(path[0], crt.reconstruct(images[:1], classes=[0])[0])
    a_best = int(best.classes[0])
    np.testing.assert_array_equal(crt.interpolate(images[0], images[3], steps=4), crt.interpolate(
        images[0], images[3], steps=4, class_id=a_best))


def test_an_old_unconditional_manifest_still_loads_and_scores(plain_bundle: Path, tmp_path: Path, images: np.ndarray) -> None:
    """Bundles written before ``num_classes`` existed have no such field: unconditional."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(plain_bundle, old)
    manifest = json.loads((old / "manifest.json").read_text())
    assert manifest["model_config"]["num_classes"] == 0 and "classes" not in manifest
    assert "label" not in manifest["graphs"]["encoder"]["inputs"]
    del manifest["model_config"]["num_classes"]
    write_manifest(old, manifest)
    assert load_bundle(old).num_classes == 0
    np.testing.assert_allclose(Runtime.load(old, providers="cpu").score(images).score,
                               Runtime.load(plain_bundle, providers="cpu").score(images).score)


# ---- the gRPC service ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(conditional_bundle: Path, crt: Runtime) -> Iterator[ServerThread]:
    cfg = ServiceConfig(
        model=conditional_bundle, host="127.0.0.1", port=0, metrics_port=-1,
        max_batch_size=8, max_delay_ms=30.0, decode_workers=2,
    )
    with ServerThread(cfg, crt) as srv:
        yield srv


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[pb_grpc.OutlierServiceStub]:
    with grpc.insecure_channel(server.target) as ch:
        yield pb_grpc.OutlierServiceStub(ch)


def _image(a: np.ndarray, image_id: str = "", class_id: int | None = None) -> pb.Image:
    return pb.Image(id=image_id, tensor=array_to_tensor(a), class_id=class_id)


def test_the_server_equals_the_runtime_with_and_without_class_id(stub, crt: Runtime, images: np.ndarray) -> None:
    claimed = [2, None, 0, None, 1, 2, None]
    for classes in (claimed, [None] * len(images)):
        req = pb.ScoreRequest(images=[_image(a, f"i{i}", c) for i, (a, c) in enumerate(zip(images, classes, strict=True))])
        resp = stub.Score(req)
        ref = crt.score(images, classes=classes)
        np.testing.assert_allclose([r.score for r in resp.results], ref.score, rtol=1e-5, atol=1e-6)
        assert [r.class_id for r in resp.results] == ref.classes.tolist()
        assert all(r.HasField("class_id") for r in resp.results)
        assert [r.is_outlier for r in resp.results] == list(ref.is_outlier)
    # pictures and repairs follow the class too
    opts = pb.ScoreOptions(return_reconstruction=True, return_repaired=True, image_format=pb.IMAGE_FORMAT_RAW)
    resp = stub.Score(pb.ScoreRequest(images=[_image(images[0], class_id=1), _image(images[1])], options=opts))
    ref = crt.score(images[:2], classes=[1, None], with_reconstruction=True)
    fixed, _ = crt.repair(images[:2], classes=ref.classes)
    for i, r in enumerate(resp.results):
        np.testing.assert_array_equal(decode_output(r.reconstruction), ref.reconstruction[i])
        np.testing.assert_array_equal(decode_output(r.repaired), fixed[i])
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert list(info.class_names) == list(COND_CLASSES)


def test_classes_travel_with_their_images_through_merged_batches(server: ServerThread, stub, crt: Runtime,
                                                                 images: np.ndarray) -> None:
    reg = server.server.metrics.registry
    before = sample_sum(reg, "vaegan_batch_size_count") or 0.0
    plan = [(i % len(images), [None, 0, 1, 2][i % 4]) for i in range(16)]  # (image, class) per request
    futures = [stub.Score.future(pb.ScoreRequest(images=[_image(images[i], class_id=c)])) for i, c in plan]
    got = [f.result(timeout=60).results[0] for f in futures]
    assert sample_sum(reg, "vaegan_batch_size_count") - before < 16  # requests were merged
    ref = crt.score(images[[i for i, _ in plan]], classes=[c for _, c in plan])
    np.testing.assert_allclose([r.score for r in got], ref.score, rtol=1e-5, atol=1e-6)
    assert [r.class_id for r in got] == ref.classes.tolist()


def test_the_client_takes_classes(server: ServerThread, crt: Runtime, images: np.ndarray) -> None:
    with OutlierClient(server.target, timeout=30) as client:
        results = client.score(images[:3], classes=[1, None, 0])
        assert client.model_info().class_names == list(COND_CLASSES)
        samples = client.sample(3, seed=4, class_id=2)
        filled = client.inpaint(images[:1], [np.pad(np.ones((6, 6), np.uint8), 11)], classes=[0])
    ref = crt.score(images[:3], classes=[1, None, 0])
    assert [r.class_id for r in results] == ref.classes.tolist()
    np.testing.assert_allclose([r.score for r in results], ref.score, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(samples, crt.sample(3, seed=4, classes=2))
    np.testing.assert_array_equal(filled[0], crt.inpaint(images[:1], [np.pad(np.ones((6, 6), np.uint8), 11)], classes=[0])[0])
    with pytest.raises(ValueError, match="2 classes for 3 images"):
        OutlierClient(server.target).score(images[:3], classes=[1, 2])


def test_bad_classes_are_invalid_argument_naming_the_field(stub, images: np.ndarray) -> None:
    with pytest.raises(grpc.RpcError) as e:
        stub.Score(pb.ScoreRequest(images=[_image(images[0], "a"), _image(images[1], "b", class_id=7)]))
    assert e.value.code() == INVALID
    assert "image 1 (id 'b'): class_id 7 is out of range; this model has classes 0..2" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.Sample(pb.SampleRequest(n=2, class_id=-1))
    assert e.value.code() == INVALID and "class_id -1 is out of range" in e.value.details()
    a, b = _image(images[0], class_id=0), _image(images[1], class_id=1)
    with pytest.raises(grpc.RpcError) as e:
        stub.Interpolate(pb.InterpolateRequest(a=a, b=b, steps=3))
    assert e.value.code() == INVALID and "differ" in e.value.details()
    resp = stub.Interpolate(pb.InterpolateRequest(a=a, b=_image(images[1]), steps=3, image_format=pb.IMAGE_FORMAT_RAW))
    assert len(resp.images) == 3


def test_an_unconditional_server_refuses_a_class(plain_bundle: Path, images: np.ndarray) -> None:
    cfg = ServiceConfig(model=plain_bundle, host="127.0.0.1", port=0, metrics_port=-1, max_delay_ms=1.0)
    rt = Runtime.load(plain_bundle, providers="cpu")
    with ServerThread(cfg, rt) as srv, grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.OutlierServiceStub(ch)
        resp = stub.Score(pb.ScoreRequest(images=[_image(a) for a in images[:2]]))  # as before: no class
        np.testing.assert_allclose([r.score for r in resp.results], rt.score(images[:2]).score, rtol=1e-5, atol=1e-6)
        assert not any(r.HasField("class_id") for r in resp.results)
        assert list(stub.GetModelInfo(pb.GetModelInfoRequest()).class_names) == []
        calls = {
            "Score": lambda: stub.Score(pb.ScoreRequest(images=[_image(images[0], "x", class_id=0)])),
            "Sample": lambda: stub.Sample(pb.SampleRequest(n=1, class_id=0)),
        }
        for name, call in calls.items():
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == INVALID, name
            assert "class_id is set, but this model is not conditional" in e.value.details(), name
        with pytest.raises(grpc.RpcError) as e:
            calls["Score"]()
        assert e.value.details().startswith("image 0 (id 'x'): class_id")
