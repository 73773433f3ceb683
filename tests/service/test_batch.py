"""`vaegan score`: inputs, error rows, formats, shards, resume after SIGKILL, remote == in process.

Real files on disk, the session's tiny bundle in a real Runtime, a real loopback server, and
real subprocesses killed for real.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vaegan.cli import main
from vaegan.service.batch import BASE_COLUMNS, read_table, resolve_inputs, score_files, shard_of
from vaegan.service.batch.decode import DecodePool, DecodeWorkerDied
from vaegan.service.batch.inputs import InputError
from vaegan.service.batch.table import PartStore, output_schema
from vaegan.service.runtime import Runtime
from vaegan.service.runtime.preprocess import ImageSpec

REPO = Path(__file__).resolve().parents[2]
SCORE_COLUMNS = ("score", "tail_probability", "pixel", "feature", "disc", "threshold")


def _image(rng: np.random.Generator, h: int, w: int, grey: bool = False) -> np.ndarray:
    """A smooth texture with noise: something a model can score, of any size."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = 110 + 40 * np.sin(xx / 3.0 + rng.uniform(0, 6)) * np.cos(yy / 4.0)
    img = base[:, :, None] + rng.normal(0, 12, (h, w, 1 if grey else 3))
    img = np.clip(img, 0, 255).astype(np.uint8)
    return img[:, :, 0] if grey else img


def _write_images(root: Path, n: int, seed: int = 0, sizes: tuple[tuple[int, int], ...] = ((32, 32),)) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        p = root / f"g{i // 10:02d}" / f"img{i:04d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_image(rng, h, w, grey=i % 7 == 3)).save(p)
        paths.append(p)
    return paths


def _score(argv: list[str]) -> int:
    return main(["score", *argv, "--no-progress"])


def _table(path: Path) -> pa.Table:
    return read_table(path)


def _assert_same_table(a: pa.Table, b: pa.Table, tol: float = 1e-6, ordered: bool = True) -> None:
    if not ordered:
        a, b = a.sort_by("id"), b.sort_by("id")
    assert a.column("id").to_pylist() == b.column("id").to_pylist()
    assert a.column("error").to_pylist() == b.column("error").to_pylist()
    assert a.column("is_outlier").to_pylist() == b.column("is_outlier").to_pylist()
    for c in SCORE_COLUMNS:
        x = np.array(a.column(c).to_pylist(), dtype=float)
        y = np.array(b.column(c).to_pylist(), dtype=float)
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol, err_msg=c)


# ---- inputs ---------------------------------------------------------------------------------
def test_every_input_kind_resolves_to_the_same_ids(tmp_path: Path) -> None:
    root = tmp_path / "root"
    files = {"a/x.png": (8, 8), "a/b/y.jpg": (9, 7), "z.PNG": (5, 6)}
    for rel, (h, w) in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((h, w), np.uint8)).save(p, format="JPEG" if rel.endswith("jpg") else "PNG")
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / ".hidden" / "h.png")
    (root / "a" / "b" / "loop").symlink_to(root / "a", target_is_directory=True)  # a link loop
    expected = sorted(files)

    def ids(*args: str) -> list[str]:
        return sorted(it.id for it in resolve_inputs(list(args)))

    assert ids(str(root)) == expected
    assert ids(f"{root}/**/*.png", f"{root}/**/*.jpg", f"{root}/*.PNG") == expected
    assert ids(*(str(root / f) for f in files)) == expected
    (root / "list.txt").write_text("# the three images\n" + "\n".join(files) + "\n\n")
    assert ids(f"@{root / 'list.txt'}") == expected
    extra = {"label": [1, 2, 3], "path": list(files)}
    from pyarrow import csv

    csv.write_csv(pa.table(extra), root / "list.csv")
    pq.write_table(pa.table(extra), root / "list.parquet")
    (root / "list.jsonl").write_text("".join(json.dumps({"path": p, "label": i + 1}) + "\n" for i, p in enumerate(files)))
    for name in ("list.csv", "list.parquet", "list.jsonl"):
        items = resolve_inputs([f"@{root / name}"])
        assert sorted(it.id for it in items) == expected, name
        assert {it.id: it.extra["label"] for it in items} == {p: i + 1 for i, p in enumerate(files)}, name
        assert all(Path(it.path).is_file() for it in items)


def test_input_mistakes_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file or directory"):
        resolve_inputs([str(tmp_path / "missing")])
    with pytest.raises(InputError, match="matches no file"):
        resolve_inputs([f"{tmp_path}/*.png"])
    (tmp_path / "l.csv").write_text("file,label\na.png,1\n")
    with pytest.raises(InputError, match="no 'path' column"):
        resolve_inputs([f"@{tmp_path / 'l.csv'}"])
    (tmp_path / "s.csv").write_text("path,score\na.png,1\n")
    with pytest.raises(InputError, match="'score' would overwrite"):
        resolve_inputs([f"@{tmp_path / 's.csv'}"], reserved=[n for n, _ in BASE_COLUMNS])
    for d in ("one", "two"):  # the same relative id under two roots
        (tmp_path / d).mkdir()
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / d / "a.png")
    with pytest.raises(InputError, match="two images have the id 'a.png'"):
        resolve_inputs([str(tmp_path / "one"), str(tmp_path / "two")])


def test_shards_split_ids_stably_and_completely() -> None:
    ids = [f"dir/{i}.png" for i in range(2000)]
    shards = [shard_of(i, 4) for i in ids]
    assert shards == [shard_of(i, 4) for i in ids]  # stable
    counts = np.bincount(shards, minlength=4)
    assert counts.min() > 400  # every shard gets a fair share
    assert shard_of("dir/7.png", 4) == 1  # the same on every machine and run (BLAKE2b, not hash())


# ---- the decode pool ------------------------------------------------------------------------
def test_decode_pool_keeps_order_and_a_bounded_window(tmp_path: Path) -> None:
    paths = [str(p) for p in _write_images(tmp_path, 40)]
    chunks = [paths[i : i + 4] for i in range(0, 40, 4)]
    pulled = 0

    def source():
        nonlocal pulled
        for c in chunks:
            pulled += 1
            yield c

    spec = ImageSpec(3, 16, 16)
    seen = []
    with DecodePool(spec, workers=1, window=3) as pool:
        for j, d in enumerate(pool.map(source())):
            assert pulled - j <= 3  # never more than the window ahead of the consumer
            seen.append(d)
            time.sleep(0.01)
    assert [d.n for d in seen] == [4] * 10
    direct = [np.asarray(Image.open(p).convert("RGB").resize((16, 16), Image.Resampling.BILINEAR)) for p in paths[:4]]
    assert seen[0].batch.shape == (4, 16, 16, 3)
    assert np.abs(seen[0].batch.astype(int) - np.stack(direct)).max() <= 1


def test_a_decode_worker_that_dies_is_a_clear_error(tmp_path: Path) -> None:
    paths = [str(p) for p in _write_images(tmp_path, 8)]
    with DecodePool(ImageSpec(3, 16, 16), workers=1) as pool:
        stream = pool.map(iter([paths] * 40))
        assert next(stream).n == 8
        for pid in list(pool._executor._processes):  # noqa: SLF001 - kill the real worker
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(DecodeWorkerDied, match="--resume"):
            list(stream)


# ---- the command ------------------------------------------------------------------------------
def test_bad_files_become_error_rows_and_exit_3(tmp_path: Path, tiny_bundle: Path, runtime: Runtime, capsys) -> None:
    data = tmp_path / "in"
    good = _write_images(data, 12, sizes=((32, 32), (20, 45), (64, 48)))
    (data / "bad").mkdir()
    (data / "bad" / "empty.png").write_bytes(b"")
    (data / "bad" / "text.png").write_text("this is not a PNG")
    whole = good[0].read_bytes()
    (data / "bad" / "cut.png").write_bytes(whole[: len(whole) // 2])
    out = tmp_path / "s.parquet"
    assert _score([str(data), "--model", str(tiny_bundle), "--out", str(out), "--workers", "1", "--batch-size", "5"]) == 3
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("scored 12, failed 3, skipped 0") and "images/s" in last
    t = _table(out)
    assert t.num_rows == 15
    errors = {r["id"]: r["error"] for r in t.to_pylist() if r["error"] is not None}
    assert set(errors) == {"bad/empty.png", "bad/text.png", "bad/cut.png"}
    assert "cannot identify image file" in errors["bad/text.png"] and "truncated" in errors["bad/cut.png"]
    bad_rows = t.filter(pa.compute.is_valid(t.column("error")))
    assert bad_rows.column("score").null_count == 3
    # the good rows: exactly what Runtime.score gives for the same files
    res = runtime.score([str(p) for p in good])
    rows = {r["id"]: r for r in t.to_pylist()}
    for p, s, flag in zip(good, res.score, res.is_outlier, strict=True):
        row = rows[p.relative_to(data).as_posix()]
        assert row["score"] == pytest.approx(float(s), abs=1e-6) and row["is_outlier"] == bool(flag)
        assert row["model_name"] == runtime.bundle.name and row["model_version"] == str(runtime.bundle.version)


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".jsonl"])
def test_formats_round_trip_with_the_documented_schema(tmp_path: Path, tiny_bundle: Path, suffix: str) -> None:
    data = tmp_path / "in"
    paths = _write_images(data, 6, sizes=((32, 32), (40, 24)))
    (data / "broken.png").write_bytes(b"\x89PNG\r\n")
    lst = tmp_path / "list.csv"
    rel = [p.relative_to(tmp_path).as_posix() for p in paths] + ["in/broken.png"]
    lst.write_text("path,label,batch\n" + "".join(f"{r},{i % 2},b{i}\n" for i, r in enumerate(rel)))
    out = tmp_path / f"s{suffix}"
    maps = tmp_path / "maps"
    assert _score([f"@{lst}", "--model", str(tiny_bundle), "--out", str(out), "--workers", "0", "--maps-dir", str(maps)]) == 3
    t = read_table(out, output_schema([pa.field("label", pa.int64()), pa.field("batch", pa.string())]))
    assert t.column_names == [n for n, _ in BASE_COLUMNS] + ["label", "batch"]
    for name, typ in BASE_COLUMNS:
        assert t.schema.field(name).type == typ, name
    assert t.column("id").to_pylist() == rel
    assert t.column("label").to_pylist() == [i % 2 for i in range(len(rel))]
    ref = read_table(out) if suffix == ".parquet" else None
    if ref is not None:
        assert ref.schema.field("label").type == pa.int64()
    # one map per scored input, at the input's size, sub-folders mirrored
    written = sorted(p.relative_to(maps).as_posix() for p in maps.rglob("*.png"))
    assert written == sorted(r.removesuffix(".png") + ".png" for r in rel[:-1])
    for p in paths:
        m = Image.open(maps / p.relative_to(tmp_path))
        assert m.mode == "L" and m.size == Image.open(p).size


def test_score_files_api_matches_the_runtime(tmp_path: Path, runtime: Runtime) -> None:
    paths = _write_images(tmp_path, 10, sizes=((32, 32), (50, 30)))
    (tmp_path / "x.png").write_bytes(b"nope")
    batches = list(score_files([*paths, tmp_path / "x.png"], runtime, batch_size=4, workers=0))
    assert [b.num_rows for b in batches] == [4, 4, 3]
    t = pa.Table.from_batches(batches)
    res = runtime.score([str(p) for p in paths])
    np.testing.assert_allclose(t.column("score").to_numpy(zero_copy_only=False)[:10], res.score, atol=1e-6)
    assert t.column("error").to_pylist()[:10] == [None] * 10 and "cannot" in t.column("error")[10].as_py()


def test_shards_merged_equal_the_unsharded_table(tmp_path: Path, tiny_bundle: Path, monkeypatch, capsys) -> None:
    data = tmp_path / "in"
    _write_images(data, 30)
    whole = tmp_path / "all.parquet"
    assert _score([str(data), "--model", str(tiny_bundle), "--out", str(whole), "--workers", "0"]) == 0
    out = tmp_path / "s.parquet"
    files = []
    for i in range(3):  # as an Indexed Job runs them: the index from the environment
        monkeypatch.setenv("JOB_COMPLETION_INDEX", str(i))
        monkeypatch.setenv("VAEGAN_NUM_SHARDS", "3")
        assert _score([str(data), "--model", str(tiny_bundle), "--out", str(out), "--workers", "0"]) == 0
        files.append(tmp_path / f"s.shard-{i:05d}-of-00003.parquet")
    parts = [set(_table(f).column("id").to_pylist()) for f in files]
    assert sum(len(p) for p in parts) == 30 and len(set().union(*parts)) == 30  # each id in exactly one
    for i, p in enumerate(parts):
        assert all(shard_of(x, 3) == i for x in p)
    merged = tmp_path / "merged.parquet"
    assert main(["score-merge", str(merged), *map(str, files)]) == 0
    _assert_same_table(_table(merged), _table(whole), ordered=False)
    assert _table(merged).column("id").to_pylist() == sorted(_table(whole).column("id").to_pylist())
    assert main(["score-merge", str(tmp_path / "dup.parquet"), str(files[0]), str(files[0])]) == 2
    assert "in more than one shard file" in capsys.readouterr().err


def test_remote_mode_equals_in_process(tmp_path: Path, tiny_bundle: Path) -> None:
    from vaegan.service.server.config import ServiceConfig
    from vaegan.service.server.testing import ServerThread

    data = tmp_path / "in"
    _write_images(data, 14, sizes=((32, 32), (21, 57), (70, 40)))
    (data / "bad.png").write_text("x")
    local, remote = tmp_path / "local.parquet", tmp_path / "remote.parquet"
    common = ["--workers", "1", "--batch-size", "4", "--maps-dir"]
    assert _score([str(data), "--model", str(tiny_bundle), "--out", str(local), *common, str(tmp_path / "ml")]) == 3
    cfg = ServiceConfig(model=tiny_bundle, host="127.0.0.1", port=0, metrics_port=0)
    with ServerThread(cfg) as srv:
        assert _score([str(data), "--server", srv.target, "--out", str(remote), *common, str(tmp_path / "mr")]) == 3
    _assert_same_table(_table(local), _table(remote), tol=1e-5)
    for p in (tmp_path / "ml").rglob("*.png"):
        a = np.asarray(Image.open(p), np.int16)
        b = np.asarray(Image.open(tmp_path / "mr" / p.relative_to(tmp_path / "ml")), np.int16)
        assert np.abs(a - b).max() <= 1


def test_remote_mode_reports_an_unreachable_server_in_one_line(tmp_path: Path, capsys) -> None:
    (tmp_path / "a.png").write_bytes(b"x")
    code = _score([str(tmp_path / "a.png"), "--server", "127.0.0.1:1", "--out", str(tmp_path / "o.parquet")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "UNAVAILABLE" in err[0] and "127.0.0.1:1" in err[0]


def test_usage_errors_exit_2_with_one_line(tmp_path: Path, tiny_bundle: Path, capsys) -> None:
    data = tmp_path / "in"
    _write_images(data, 2)
    m = ["--model", str(tiny_bundle)]
    cases = [
        ([str(data), *m, "--out", str(tmp_path / "o.xlsx")], "must be one of .parquet"),
        ([str(tmp_path / "nothing"), *m, "--out", str(tmp_path / "o.csv")], "no such file or directory"),
        ([str(data), *m, "--out", str(tmp_path / "o.csv"), "--weights", "pixel=abc"], "is not a number"),
        ([str(data), *m, "--out", str(tmp_path / "o.csv"), "--weights", "colour=1"], "expected name=value"),
        ([str(data), *m, "--out", str(tmp_path / "o.csv"), "--num-shards", "2", "--shard-index", "2"], "--shard-index"),
        ([str(data), *m, "--out", str(tmp_path / "o.csv"), "--only-outliers"], "--only-outliers"),
    ]
    for argv, needle in cases:
        assert _score(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], (argv, err)
    out = tmp_path / "o.parquet"
    assert _score([str(data), *m, "--out", str(out), "--workers", "0"]) == 0
    before = out.read_bytes()
    assert _score([str(data), *m, "--out", str(out), "--workers", "0"]) == 2  # never overwritten silently
    assert "--resume" in capsys.readouterr().err and out.read_bytes() == before


def test_weights_and_threshold_as_the_service_takes_them(tmp_path: Path, tiny_bundle: Path, runtime: Runtime) -> None:
    paths = _write_images(tmp_path / "in", 8)
    out = tmp_path / "o.parquet"
    assert _score([str(tmp_path / "in"), "--model", str(tiny_bundle), "--out", str(out), "--workers", "0",
                   "--weights", "pixel=1,disc=0", "--threshold", "0.5"]) == 0
    res = runtime.score([str(p) for p in paths], weights={"pixel": 1, "disc": 0}, threshold=0.5)
    t = _table(out)
    np.testing.assert_allclose(t.column("score").to_numpy(), res.score, atol=1e-6)
    assert t.column("threshold").to_pylist() == [0.5] * 8
    assert t.column("is_outlier").to_pylist() == [bool(s > 0.5) for s in res.score]


def test_report_summarizes_the_table(tmp_path: Path, tiny_bundle: Path) -> None:
    _write_images(tmp_path / "in", 20, sizes=((32, 32), (30, 60)))
    out, rep = tmp_path / "o.parquet", tmp_path / "report"
    assert _score([str(tmp_path / "in"), "--model", str(tiny_bundle), "--out", str(out), "--workers", "0",
                   "--threshold", "0", "--report", str(rep), "--top-k", "5"]) == 0
    s = json.loads((rep / "summary.json").read_text())
    t = _table(out)
    flags = t.column("is_outlier").to_pylist()
    assert s["rows"] == 20 and s["errors"] == 0 and s["flagged"] == sum(flags)
    assert s["flagged_share"] == pytest.approx(sum(flags) / 20)
    assert sum(s["histogram"]["counts"]) == 20
    scores = dict(zip(t.column("id").to_pylist(), t.column("score").to_pylist(), strict=True))
    top = sorted(scores, key=lambda k: -scores[k])[:5]
    assert [x["id"] for x in s["top_k"]] == top
    for name in ("histogram.png", "top_k.png"):
        im = Image.open(rep / name)
        assert im.size[0] > 100 and len(np.unique(np.asarray(im))) > 3


def test_repaired_dir_writes_repairs_at_input_size(tmp_path: Path, tiny_bundle: Path, runtime: Runtime) -> None:
    paths = _write_images(tmp_path / "in", 6, sizes=((32, 32), (24, 48)))
    rep = tmp_path / "rep"
    assert _score([str(tmp_path / "in"), "--model", str(tiny_bundle), "--out", str(tmp_path / "o.parquet"),
                   "--workers", "1", "--repaired-dir", str(rep)]) == 0
    fixed, _ = runtime.repair([str(p) for p in paths])
    for p, f in zip(paths, fixed, strict=True):
        got = np.asarray(Image.open(rep / p.relative_to(tmp_path / "in")))
        assert got.shape == f.shape and np.array_equal(got, f)


# ---- crash safety and resume ----------------------------------------------------------------
def test_part_store_recovers_from_every_leftover_state(tmp_path: Path) -> None:
    schema = output_schema()

    def rows(ids: list[str]) -> pa.RecordBatch:
        n = len(ids)
        cols = {name: pa.nulls(n, typ) for name, typ in BASE_COLUMNS}
        cols["id"] = pa.array(ids)
        cols["score"] = pa.array([float(len(i)) for i in ids])
        return pa.RecordBatch.from_pydict(cols, schema=schema)

    out = tmp_path / "o.parquet"
    store = PartStore(out, schema, part_rows=2)
    for ids in (["a", "b"], ["c", "d"], ["e"]):
        store.add(rows(ids))
    assert sorted(p.name for p in store.parts_dir.iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    # killed here: a half-written part is left too
    (store.parts_dir / ".part-00002.parquet.tmp-999").write_bytes(b"PAR1 torn")
    with pytest.raises(ValueError, match="--resume"):
        PartStore(out, schema)
    again = PartStore(out, schema, resume=True, part_rows=2)
    assert again.done_ids() == {"a", "b", "c", "d"}
    again.add(rows(["e", "f"]))
    again.finish()
    assert pq.read_table(out).column("id").to_pylist() == ["a", "b", "c", "d", "e", "f"]
    assert not again.parts_dir.exists()
    # killed after the final rename but before the parts were removed: no id twice
    third = PartStore(out, schema, resume=True)
    third.parts_dir.mkdir(exist_ok=True)
    pq.write_table(pa.Table.from_batches([rows(["e", "f", "g"])]), third.parts_dir / "part-00000.parquet")
    assert PartStore(out, schema, resume=True).finish().rows == 7
    assert pq.read_table(out).column("id").to_pylist() == ["a", "b", "c", "d", "e", "f", "g"]


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            out.extend(kids)
            todo.extend(kids)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _readable(path: Path) -> bool:
    try:
        read_table(path)
        return True
    except Exception:  # noqa: BLE001 - anything unreadable is a torn file
        return False


@pytest.mark.slow
def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path: Path, tiny_bundle: Path) -> None:
    data = tmp_path / "in"
    _write_images(data, 240, sizes=((32, 32), (48, 40)))
    (data / "zz_bad.png").write_bytes(b"garbage")
    whole = tmp_path / "whole.parquet"
    base = ["--model", str(tiny_bundle), "--workers", "1", "--batch-size", "4", "--part-rows", "8"]
    assert _score([str(data), *base, "--out", str(whole)]) == 3
    reference = _table(whole)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for kill_after_parts in (0, 1, 6):
        out = tmp_path / f"k{kill_after_parts}.csv"
        parts = out.with_name(out.name + ".parts")
        cmd = [sys.executable, "-m", "vaegan", "score", str(data), *base, "--out", str(out), "--no-progress"]
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if parts.is_dir() and len(list(parts.glob("part-*.parquet"))) >= kill_after_parts:
                break
            time.sleep(0.005)
        assert proc.poll() is None, "the job finished before it could be killed"
        helpers = _descendants(proc.pid)  # the decode worker and the forkserver
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        gone_by = time.monotonic() + 15
        while any(_alive(p) for p in helpers) and time.monotonic() < gone_by:
            time.sleep(0.1)
        assert not [p for p in helpers if _alive(p)], "the killed job left processes behind"
        # nothing torn: every committed part reads back whole; no final file yet
        committed = sorted(parts.glob("part-*.parquet"))
        assert len(committed) >= kill_after_parts
        assert all(_readable(p) for p in committed)
        assert not out.exists() or _readable(out)
        assert _score([str(data), *base, "--out", str(out), "--resume"]) == 3
        _assert_same_table(_table(out), reference)
        assert not parts.exists()
