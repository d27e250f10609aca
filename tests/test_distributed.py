"""`smartcrop run --engine ray` and `smartcrop.distributed.crop` on a local Ray with 2 CPUs (one Ray for the
whole module: Ray's start-up is the slow part).  An untrained small model: behaviour, not crop quality."""

import io
import json
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torch")
from typer.testing import CliRunner  # noqa: E402

from smartcrop.cli import app  # noqa: E402

from conftest import draw_photo, sha  # noqa: E402

# every test here in one test process, so that they share the module's one local Ray (pyproject: --dist loadgroup)
pytestmark = pytest.mark.xdist_group("ray")


def run(args):
    r = CliRunner().invoke(app, ["run", *map(str, args)])
    return r.exit_code, r.stdout_bytes, r.stderr


def jsonl(out: bytes):
    return [json.loads(line) for line in out.decode().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def ray_2cpu():
    ray = pytest.importorskip("ray", reason="the Ray engine needs ray[data]: the ray extra")
    pytest.importorskip("ray.data", reason="the Ray engine needs ray[data]: the ray extra")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def test_without_ray_the_engine_says_how_to_get_it(tmp_path, monkeypatch):
    for name in ("ray", "ray.data"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    draw_photo(tmp_path / "in" / "a.jpg")
    code, _, err = run([tmp_path / "in", "--engine", "ray", "-o", tmp_path / "out"])
    assert code == 2
    assert "pip install 'ray[data]>=2.40'" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("how", ["--ray-address", "RAY_ADDRESS"])
def test_a_cluster_address_nothing_answers_at_is_one_line_at_once(tmp_path, small_model_file, how):
    """Ray retried such an address for minutes, deaf to Ctrl-C (and the output folder the run had made stayed).
    `$RAY_ADDRESS` (set in Ray's own jobs) is the address when --ray-address is not given, as for Ray itself;
    it was passed to Ray with --engine ray's own CPU count, which Ray refuses for a cluster.  A fresh
    interpreter: this module's local Ray must not be the one found."""
    import os
    import socket
    import subprocess
    import time

    pytest.importorskip("ray", reason="the Ray engine needs ray[data]: the ray extra")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    draw_photo(tmp_path / "in" / "a.jpg")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "smartcrop.cli", "run", str(tmp_path / "in"), "-o", str(tmp_path / "out" / "deep"),
           "--engine", "ray", "--weights", str(small_model_file)]
    if how == "RAY_ADDRESS":
        env["RAY_ADDRESS"] = address
    else:
        cmd += ["--ray-address", address]
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and r.stdout == "", r.stderr
    assert r.stderr.splitlines() == [f"smartcrop: cannot join the Ray cluster at {address}: nothing answers there "
                                     "(Connection refused)"]
    assert time.monotonic() - t0 < 60 and not (tmp_path / "out").exists()


def test_a_local_ray_is_its_own_with_two_cpus_at_least(monkeypatch):
    """`-j 1` (or a one-core machine) started a Ray of one CPU, which the scoring actor held: the decoding tasks
    waited for ever, without a word.  And with a cluster running on the machine (`ray start --head`), Ray joined
    that one instead of starting a local Ray, and refused the CPU count."""
    import smartcrop.distributed as dist

    calls = []

    class FakeRay:
        @staticmethod
        def is_initialized():
            return False

        @staticmethod
        def init(**kw):
            calls.append(kw)
            signal.signal(signal.SIGTERM, lambda *a: sys.exit(15))  # as ray.init does

    monkeypatch.setattr(dist, "_import_ray", lambda: FakeRay)
    ours = signal.getsignal(signal.SIGTERM)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for asked, cpus in ((1, 2), (3, 3)):
        assert dist.connect(None, asked) is True
        assert calls[-1]["address"] == "local" and calls[-1]["num_cpus"] == cpus
    monkeypatch.setattr(dist, "_check_answers", lambda address: None)
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")  # as in a Ray job: that cluster, its own CPUs
    assert dist.connect(None, 1) is True
    assert calls[-1]["address"] == "head:6379" and "num_cpus" not in calls[-1]
    # Ray's SIGTERM handler (a bare exit 15: no word, no clean-up) does not outlive connect()
    assert signal.getsignal(signal.SIGTERM) is ours


@pytest.mark.parametrize("signum, code, word", [(2, 130, "interrupted"), (15, 143, "terminated")])
def test_a_ray_run_stopped_says_so_as_the_local_engine_does(tmp_path, small_model_file, monkeypatch, signum, code,
                                                            word):
    """SIGTERM ended a Ray run with status 15 and no word (ray.init's handler), and its Ray log stayed in the
    temporary folder; Ctrl-C gave 130 and another sentence than the local engine's."""
    import os

    import smartcrop.distributed as dist

    def stopped(*a, **k):
        if signum == 15:
            os.kill(os.getpid(), signal.SIGTERM)
        raise KeyboardInterrupt

    monkeypatch.setattr(dist, "run_command", stopped)
    before = signal.getsignal(signal.SIGTERM)
    draw_photo(tmp_path / "in" / "a.jpg")
    code_, _, err = run([tmp_path / "in", "--engine", "ray", "-o", tmp_path / "out", "--weights", small_model_file])
    assert code_ == code
    assert err.splitlines() == [f"smartcrop: {word}: finished files are complete, nothing partial was left; crops "
                                "written since the last record may have none: run again with --skip-existing to "
                                "go on"]
    assert signal.getsignal(signal.SIGTERM) is before


def test_only_host_port_addresses_are_tried_before_ray_is_asked():
    import socket

    from smartcrop.distributed import _check_answers
    from smartcrop.errors import UsageError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for address in (f"ray://127.0.0.1:{port}", f"[::1]:{port}", "nohost.invalid:6379"):
        with pytest.raises(UsageError, match=r"cannot join the Ray cluster at .*: nothing answers there \("):
            _check_answers(address, timeout=5)
    with socket.socket() as s:  # one that answers
        s.bind(("127.0.0.1", 0))
        s.listen()
        _check_answers(f"127.0.0.1:{s.getsockname()[1]}")
        _check_answers(f"ray://127.0.0.1:{s.getsockname()[1]}")
    for address in ("auto", "local", "a-head-node"):  # Ray's to read
        _check_answers(address)


def test_ray_engine_gives_the_local_engines_crops_names_and_bytes(tmp_path, small_model_file, ray_2cpu):
    src = tmp_path / "in"
    for k in range(22):
        draw_photo(src / ("sub" if k % 3 == 0 else "") / f"p{k:02d}.jpg", size=(240 + 8 * k, 180), seed=k)
    draw_photo(src / "p01.jpeg", size=(200, 150), seed=50)  # same output names as p01.jpg: -1 by input order
    draw_photo(src / "q.png", size=(160, 200), seed=51)
    args = [src, "-r", "--ratio", "16:9", "--ratio", "1:1", "--json", "--weights", small_model_file]
    code_l, out_l, err_l = run([*args, "-o", tmp_path / "local"])
    code_r, out_r, err_r = run([*args, "-o", tmp_path / "ray", "--engine", "ray"])
    assert code_l == 0, err_l
    assert code_r == 0, err_r
    assert err_r.strip() == ""

    def crops(out, root):
        return {(r["input"], r["ratio"]): (r["box"], Path(r["output"]).relative_to(root).as_posix(), r["size"],
                                           r["score"], r["lossless"]) for r in jsonl(out)}

    local, ray = crops(out_l, tmp_path / "local"), crops(out_r, tmp_path / "ray")
    assert len(local) == 48
    assert ray == local
    names = sorted(v[1] for v in ray.values())
    assert "p01_16x9-1.jpg" in names and "sub/p00_1x1.jpg" in names and "q_16x9.png" in names
    for _, rel, *_ in ray.values():
        assert sha(tmp_path / "ray" / rel) == sha(tmp_path / "local" / rel)  # the very same files

    # a re-run with --skip-existing decodes nothing and writes nothing
    before = {p: sha(p) for p in (tmp_path / "ray").rglob("*") if p.is_file()}
    code, out, err = run([*args, "-o", tmp_path / "ray", "--engine", "ray", "--skip-existing"])
    assert code == 0, err
    again = jsonl(out)
    assert len(again) == 48 and all(r["skipped"] == "exists" for r in again)
    assert {Path(r["output"]).relative_to(tmp_path / "ray").as_posix() for r in again} == set(names)
    assert {p: sha(p) for p in (tmp_path / "ray").rglob("*") if p.is_file()} == before

    # a dry run with --skip-existing marks the crops there as the local engine does (it marked none: it did not
    # look), and writes nothing
    (tmp_path / "ray" / "q_16x9.png").unlink()
    dry = {}
    for engine in ("local", "ray"):
        code, out, err = run([*args, "-o", tmp_path / "ray", "--engine", engine, "--skip-existing", "--dry-run"])
        assert code == 0, err
        dry[engine] = sorted(jsonl(out), key=lambda r: (r["input"], r["ratio"]))
    assert dry["ray"] == dry["local"]
    skipped = {r["input"] for r in dry["ray"] if r.get("skipped") == "exists"}  # q.png's two crops: boxes again
    assert len(skipped) == 23 and all(not i.endswith("q.png") for i in skipped) and len(dry["ray"]) == 48
    assert not (tmp_path / "ray" / "q_16x9.png").exists()


def test_a_corrupt_photo_is_one_error_line_and_exit_1_the_rest_done(tmp_path, small_model_file, ray_2cpu):
    src = tmp_path / "in"
    for k in range(3):
        draw_photo(src / f"good{k}.jpg", size=(200, 160), seed=k)
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"not really a jpeg" * 20)
    # the folder given as an URI: listed and read through pyarrow's file systems, as s3://… would be
    code, out, err = run([src.as_uri(), "--ratio", "4:5", "--json", "-o", tmp_path / "out", "--weights",
                          small_model_file, "--engine", "ray"])
    assert code == 1
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "broken.jpg" in lines[0], lines
    recs = jsonl(out)
    assert sorted(r["input"] for r in recs) == [f"{src.as_uri()}/good{k}.jpg" for k in range(3)]
    assert sorted(Path(r["output"]).name for r in recs) == [f"good{k}_4x5.jpg" for k in range(3)]
    assert all(Path(r["output"]).is_file() for r in recs)
    # every photo bad: the output folders the run made are removed again, as the local engine does
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.jpg").write_bytes((src / "broken.jpg").read_bytes())
    for given in (bad, bad.as_uri()):
        code, out, err = run([given, "--json", "-o", tmp_path / "none" / "deep", "--weights", small_model_file,
                              "--engine", "ray"])
        assert code == 1 and not out and "broken.jpg" in err
        assert not (tmp_path / "none").exists()
    # a ratio too thin for a photo fails alone, named, as in the local engine; its other crops are written; and
    # fewer distinct crops than --top-k asked: one note at the end, as the local engine says it
    thin = tmp_path / "thin"
    draw_photo(thin / "small.png", size=(64, 48), seed=2)
    code, out, err = run([thin, "--ratio", "1:1", "--ratio", "10:1", "--top-k", "20", "--json", "-o",
                          tmp_path / "thin_out", "--weights", small_model_file, "--engine", "ray"])
    recs = jsonl(out)
    assert code == 1 and 1 <= len(recs) < 20 and {r["ratio"] for r in recs} == {"1:1"}
    assert sorted(Path(r["output"]).name for r in recs) == [f"small_1x1_{k}.png" for k in range(1, len(recs) + 1)]
    assert all(Path(r["output"]).is_file() for r in recs)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 2 and "small.png: ratio 10:1: the best crop is only 60x6 pixels" in lines[0], lines
    assert lines[1] == ("smartcrop: note: 1 photo had fewer than 20 distinct crops for a ratio (a crop overlapping "
                        "a better one by more than 60 % is not another)")


def test_wire_round_trips_every_string_and_leaves_valid_names_alone():
    from smartcrop.distributed import unwire, wire

    rng = np.random.default_rng(0)
    pool = ["a", "é", "漢", "\U0001F600", "\x00", "\udce9", "\udcff", "\udc80", "\ud800", "\udfff", "u", "/"]
    for _ in range(300):
        text = "".join(rng.choice(pool, int(rng.integers(0, 12))))
        w = wire(text)
        w.encode("utf-8")  # valid UTF-8: Arrow takes it
        assert unwire(w) == text
    for name in ("photos/IMG_0001.jpg", "s3://bucket/été/漢.png", "u0041", "C:\\x\\y.jpg"):
        assert wire(name) == name == unwire(name)


def test_names_that_are_not_utf8_are_cropped_and_reported_as_the_local_engine_does(tmp_path, small_model_file,
                                                                                  ray_2cpu):
    import os

    src = tmp_path / "in"
    good = os.fsdecode(b"caf\xe9.jpg")
    draw_photo(src / good, size=(200, 150), seed=3)
    draw_photo(src / "plain.jpg", size=(150, 200), seed=4)
    (src / os.fsdecode(b"bad\xff.jpg")).write_bytes(b"not an image")
    args = [src, "--ratio", "1:1", "--json", "--weights", small_model_file]
    out = {}
    for engine in ("local", "ray"):
        code, text, err = run([*args, "-o", tmp_path / engine, "--engine", engine])
        assert code == 1 and err.count("\n") == 1 and "bad\\xff.jpg: not an image file" in err, err
        out[engine] = sorted(jsonl(text), key=lambda r: r["input"])
        assert [Path(r["input"]).name for r in out[engine]] == [good, "plain.jpg"]
        assert sorted(os.fsencode(p.name) for p in (tmp_path / engine).iterdir()) == [b"caf\xe9_1x1.jpg",
                                                                                     b"plain_1x1.jpg"]
    strip = [{k: v for k, v in r.items() if k != "output"} for r in out["local"]]
    assert [{k: v for k, v in r.items() if k != "output"} for r in out["ray"]] == strip
    # the same names in a file list (a byte order mark and CRLF line ends too) are read as bytes, as the OS names
    # them: a --skip-existing re-run from that list finds both crops, by those names, and writes nothing
    lst = tmp_path / "list.txt"
    lst.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(os.fsencode(src / n) for n in (good, "plain.jpg")) + b"\r\n")
    code, text, err = run(["--from-file", lst, *args[1:], "-o", tmp_path / "ray", "--engine", "ray",
                           "--skip-existing"])
    assert code == 0, err
    again = sorted(jsonl(text), key=lambda r: r["input"])
    assert [(Path(r["input"]).name, r.get("skipped")) for r in again] == [(good, "exists"), ("plain.jpg", "exists")]
    assert sorted(os.fsencode(p.name) for p in (tmp_path / "ray").iterdir()) == [b"caf\xe9_1x1.jpg",
                                                                                 b"plain_1x1.jpg"]


def test_a_worker_dying_mid_batch_is_retried_and_the_run_completes(tmp_path, small_model_file, ray_2cpu,
                                                                   monkeypatch):
    died = {stage: tmp_path / f"{stage}.died" for stage in ("score", "finish")}
    monkeypatch.setenv("SMARTCROP_RAY_FAULT", ",".join(f"{s}:{p}" for s, p in died.items()))
    src = tmp_path / "in"
    for k in range(6):
        draw_photo(src / f"p{k}.jpg", size=(220, 160), seed=k)
    code, out, err = run([src, "--ratio", "3:2", "--json", "-o", tmp_path / "out", "--weights", small_model_file,
                          "--engine", "ray"])
    assert code == 0, err
    assert all(p.exists() for p in died.values())  # the scoring actor and a finish task did die once
    recs = jsonl(out)
    assert sorted(Path(r["output"]).name for r in recs) == [f"p{k}_3x2.jpg" for k in range(6)]
    assert all(Path(r["output"]).is_file() for r in recs)


def test_python_entry_point_on_a_from_items_dataset(tmp_path, small_model_file, ray_2cpu):
    from smartcrop.distributed import crop

    photos = [draw_photo(tmp_path / "in" / f"a{k}.jpg", size=(300, 200), seed=k) for k in range(3)]
    items = [{"path": p.as_uri()} for p in photos] + [{"path": str(tmp_path / "in" / "missing.jpg")}]
    out_uri = (tmp_path / "out").as_uri()  # written through pyarrow's file system layer, as s3:// would be
    rows = crop(ray_2cpu.data.from_items(items), ["1:1"], output=out_uri, weights=small_model_file).take_all()
    bad = [r for r in rows if r["error"] is not None]
    ok = sorted((r for r in rows if r["error"] is None), key=lambda r: r["path"])
    assert len(bad) == 1 and bad[0]["path"].endswith("missing.jpg") and bad[0]["box"] is None
    assert [r["path"] for r in ok] == [p.as_uri() for p in photos]
    for r, p in zip(ok, photos):
        assert r["ratio"] == "1:1" and r["output"] == f"{out_uri}/{p.stem}_1x1.jpg"
        x1, y1, x2, y2 = r["box"]
        assert x2 - x1 == y2 - y1 and 0 <= x1 < x2 <= 300 and 0 <= y1 < y2 <= 200
        with Image.open(tmp_path / "out" / f"{p.stem}_1x1.jpg") as im:
            assert list(im.size) == r["size"]

    # the free-ratio candidates as `run --free-grid` (the best anchor itself with fuse=1); a bad grid: before any work
    from smartcrop.anchors import gaic_anchors
    from smartcrop.errors import UsageError

    rows = crop(ray_2cpu.data.from_items([{"path": str(p)} for p in photos]), ["any"], weights=small_model_file,
                free_grid="gaic", fuse=1).take_all()
    assert len(rows) == 3 and all(r["box"] in np.round(gaic_anchors(300, 200)).astype(int).tolist() for r in rows)
    with pytest.raises(UsageError, match="free grid"):
        crop(ray_2cpu.data.from_items(items), ["any"], weights=small_model_file, free_grid="dense")

    # no output folder: the encoded crops come back in the rows
    rows = crop(ray_2cpu.data.from_items([{"path": str(p)} for p in photos]), ["16:9"], return_bytes=True,
                weights=small_model_file).take_all()
    assert len(rows) == 3
    for r in rows:
        assert r["output"] is None
        with Image.open(io.BytesIO(r["data"])) as im:
            assert list(im.size) == r["size"]


def test_ray_engine_keeps_faces_whole_as_the_local_engine_does(tmp_path, input_size_model_file, ray_2cpu):
    """`--faces` reaches the Ray scorers: the same crops as the local engine's with it, not its crops without it
    (the engines give the same crops otherwise: test_ray_engine_gives_the_local_engines_crops_names_and_bytes)."""
    pytest.importorskip("cv2", reason="--faces needs the faces extra (opencv-python-headless)")
    from test_faces import draw_face

    src = tmp_path / "in"
    for k, x in enumerate((50, 80, 120, 150, 165)):
        draw_face(src / f"p{k}.jpg", size=(240, 120), centre=(x, 58), r=22, seed=k)
    boxes = {}
    for engine, flag in (("local", "--faces"), ("ray", "--faces"), ("local", "--no-faces")):
        code, out, err = run([src, "--ratio", "1:1", "--ratio", "4:5", "--json", "--dry-run", "--fuse", "1", flag,
                              "--engine", engine, "--weights", input_size_model_file])
        assert code == 0, err
        boxes[engine, flag] = {(Path(r["input"]).name, r["ratio"]): r["box"] for r in jsonl(out)}
    assert len(boxes["ray", "--faces"]) == 10
    assert boxes["ray", "--faces"] == boxes["local", "--faces"] != boxes["local", "--no-faces"]
