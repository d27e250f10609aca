"""Hostile inputs for ``smartcrop run`` (issue 9, "Never lose a photo"): the sweep listed in docs/reliability.md.

Every case asserts, as far as it applies: the exit code; one stderr line per failure, naming the file; the
other photos done; every input byte-identical (sha256 before/after); no temporary or partial file left;
nothing written outside ``-o``; every output complete (decodes) and marked as smartcrop's.

Re-run the sweep:  python -m pytest -q tests/test_hostile.py
(The tests run the CLI in-process with ``-j 1`` and a tiny untrained model on one torch thread: a few seconds
on two busy cores.  Cases that need something this machine lacks -- a tmpfs mount, a non-root user for
permission bits -- are simulated or skipped with the reason.)
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
from typer.testing import CliRunner  # noqa: E402

from smartcrop import imageio  # noqa: E402
from smartcrop.cli import app  # noqa: E402

from conftest import draw_photo, sha  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------- harness


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from smartcrop.model import ModelConfig, SACNet
    from smartcrop.weights import save_model

    torch.manual_seed(0)
    p = tmp_path_factory.mktemp("model") / "small.safetensors"
    save_model(SACNet(ModelConfig(short_side=64, max_long_side=128)).eval(), p, {"training": {"note": "untrained"}})
    return p


@contextlib.contextmanager
def alarm(seconds: int):
    """Fail instead of hanging (a FIFO opened for reading blocks forever)."""
    def boom(*_):
        raise TimeoutError(f"smartcrop did not finish within {seconds} s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _tree(root: Path) -> dict:
    """relative path → what it is (sha256 of a file, a symlink's target, the kind of anything else)."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for n in files + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
            p = Path(dirpath, n)
            st = os.lstat(p)
            rel = os.fsdecode(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = "-> " + os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                out[rel] = sha(p)
            else:
                out[rel] = f"mode {stat.S_IFMT(st.st_mode):o}"
    return out


@dataclass
class Result:
    code: int
    out: bytes
    err: str

    @property
    def lines(self) -> list[str]:
        return [ln for ln in self.err.splitlines() if ln.strip()]

    @property
    def records(self) -> list[dict]:
        return [json.loads(ln) for ln in self.out.decode().splitlines() if ln.strip()]


class Sweep:
    """One case: a source folder ``in/``, an output folder ``out/``, a snapshot of everything before the run."""

    def __init__(self, root: Path, model: Path):
        self.root, self.model = root, model
        self.src = root / "in"
        self.out = root / "out"
        self.src.mkdir(exist_ok=True)
        self.before: dict | None = None

    def photo(self, rel: str, size=(96, 64), seed: int = 0) -> Path:
        return draw_photo(self.src / rel, size=size, seed=seed)

    def snapshot(self) -> None:
        self.before = _tree(self.root)

    def run(self, *args, stdin=None, jobs: bool = True, snapshot: bool = True, timeout: int = 60) -> Result:
        if snapshot:
            self.snapshot()
        argv = ["run", *(os.fsdecode(a) if isinstance(a, (bytes, Path)) else str(a) for a in args),
                "--weights", str(self.model)] + (["-j", "1"] if jobs else [])
        with alarm(timeout):
            r = CliRunner().invoke(app, argv, input=stdin)
        if r.exception is not None and not isinstance(r.exception, SystemExit):
            raise r.exception  # a traceback is never an answer
        return Result(r.exit_code, r.stdout_bytes, r.stderr)

    def check(self, res: Result, code: int, failed=(), done=(), *, outside=(), changed=(), lines: int | None = None):
        """``failed``: names each on exactly one stderr line; ``done``: input names with a JSON record whose output
        exists; ``outside``: paths (relative to the case root) allowed to appear outside out/; ``changed``:
        pre-existing paths allowed to change (--overwrite)."""
        assert res.code == code, (res.code, res.err)
        for name in failed:
            assert sum(name in ln for ln in res.lines) >= 1, (name, res.lines)
        assert len(res.lines) == (len(failed) if lines is None else lines), res.lines
        assert all(ln.startswith("smartcrop: ") for ln in res.lines), res.lines
        if done:
            got = {Path(r["input"]).name for r in res.records if r.get("output") and not r.get("skipped")}
            assert set(done) <= got, (done, got)
        self.assert_intact(outside=outside, changed=changed)

    def assert_intact(self, outside=(), changed=()) -> None:
        after = _tree(self.root)
        for rel, h in self.before.items():
            if rel not in changed:
                assert after.get(rel) == h, f"{rel} was changed or removed"
        for rel, h in after.items():
            if self.before.get(rel) == h:
                continue  # there before, untouched
            name = Path(rel).name
            assert not (name.endswith(".tmp") or name.startswith(".smartcrop-")), f"temporary file left: {rel}"
            assert rel.startswith("out/") or rel in outside or rel in changed, f"written outside -o: {rel}"
            p = self.root / rel
            if p.is_file() and not p.is_symlink():
                with Image.open(p) as im:
                    im.load()  # complete
                assert imageio.written_by_smartcrop(p), rel

    def outputs(self) -> list[str]:
        if not self.out.exists():
            return []
        return sorted(os.fsdecode(p.relative_to(self.out)) for p in self.out.rglob("*") if p.is_file())


@pytest.fixture
def sw(tmp_path, model) -> Sweep:
    return Sweep(tmp_path, model)


def three(sw: Sweep) -> list[Path]:
    return [sw.photo(f"p{k}.jpg", seed=k) for k in range(3)]


# ------------------------------------------------------------------------- originals are untouchable


@pytest.mark.parametrize("flags", [["--overwrite"], [], ["--skip-existing"]])
def test_name_template_onto_the_inputs_is_refused(sw, flags):
    three(sw)
    res = sw.run(sw.src, "-o", sw.src, "--name", "{name}", "--ratio", "16:9", *flags)
    sw.check(res, 2, failed=["p0.jpg"])
    assert "would replace the input" in res.err and res.err.count("p0.jpg") == 2  # both paths named


def test_stem_ext_template_onto_a_png_input_is_refused(sw):
    sw.photo("a.png")
    res = sw.run(sw.src, "-o", sw.src, "--name", "{stem}.{ext}", "--overwrite")
    sw.check(res, 2, failed=["a.png"])


def test_format_jpeg_alias_onto_the_input_is_refused(sw):
    sw.photo("a.jpg")
    res = sw.run(sw.src / "a.jpg", "-o", sw.src, "--name", "{stem}.jpg", "--format", "jpeg", "--overwrite")
    sw.check(res, 2, failed=["a.jpg"])


def test_hard_link_of_an_input_at_the_output_name_is_refused(sw):
    a = sw.photo("a.jpg")
    sw.out.mkdir()
    os.link(a, sw.out / "a_16x9.jpg")
    res = sw.run(a, "-o", sw.out, "--ratio", "16:9", "--overwrite")
    sw.check(res, 2, failed=["a.jpg"])


def test_symlink_to_an_input_at_the_output_name_is_refused(sw):
    a = sw.photo("a.jpg")
    sw.out.mkdir()
    (sw.out / "a_16x9.jpg").symlink_to(a)
    res = sw.run(a, "-o", sw.out, "--ratio", "16:9", "--overwrite")
    sw.check(res, 2, failed=["a.jpg"])


def test_input_given_through_a_symlinked_folder_is_still_protected(sw):
    three(sw)
    (sw.root / "link").symlink_to(sw.src)
    res = sw.run(sw.root / "link", "-o", sw.src, "--name", "{name}", "--overwrite")
    sw.check(res, 2, failed=["p0.jpg"])


def test_runtime_names_with_w_h_never_hit_an_input():
    """Names that depend on the crop size are checked when claimed (here at the namer)."""
    import tempfile

    from smartcrop.inputs import collect_inputs
    from smartcrop.naming import InputCollision, OutputNamer

    d = Path(tempfile.mkdtemp())
    draw_photo(d / "a_80x45.jpg")
    items = collect_inputs([str(d)], False)
    namer = OutputNamer(d, "a_{w}x{h}.{ext}", True, False, items)
    with pytest.raises(InputCollision, match="a_80x45.jpg"):
        namer.claim(items[0], "16:9", 1, "jpg", (80, 45))
    assert namer.claim(items[0], "16:9", 1, "jpg", (64, 36)).path.name == "a_64x36.jpg"


def test_preview_onto_an_input_is_refused(sw):
    a, *_ = three(sw)
    res = sw.run(sw.src, "-o", sw.out, "--preview", a, "--overwrite")
    sw.check(res, 2, failed=["p0.jpg"])
    assert res.err.count("p0.jpg") == 2


def test_preview_onto_an_existing_file_needs_overwrite(sw):
    three(sw)
    (sw.root / "sheet.jpg").write_bytes(b"my own file")
    res = sw.run(sw.src, "-o", sw.out, "--preview", sw.root / "sheet.jpg", "--json")
    sw.check(res, 2, failed=["sheet.jpg"])
    assert not sw.out.exists()


def test_preview_with_overwrite_replaces_it(sw):
    three(sw)
    (sw.root / "sheet.jpg").write_bytes(b"old sheet")
    res = sw.run(sw.src, "-o", sw.out, "--preview", sw.root / "sheet.jpg", "--overwrite", "--json")
    sw.check(res, 0, done=["p0.jpg", "p1.jpg", "p2.jpg"], changed=["sheet.jpg"])
    with Image.open(sw.root / "sheet.jpg") as im:
        im.load()


def test_preview_onto_a_folder_is_refused(sw):
    three(sw)
    (sw.root / "sheet.jpg").mkdir()
    res = sw.run(sw.src, "-o", sw.out, "--preview", sw.root / "sheet.jpg")
    sw.check(res, 2, failed=["sheet.jpg"])


def test_preview_onto_one_of_the_runs_crops_is_refused(sw):
    three(sw)
    res = sw.run(sw.src, "-o", sw.out, "--ratio", "16:9", "--preview", sw.out / "p1_16x9.jpg")
    sw.check(res, 2, failed=["p1_16x9.jpg"])


def test_a_crop_moved_to_a_suffix_never_takes_the_previews_name(sw):
    """p0's crop finds its name taken and moves to the next suffix: that is the preview's name, so it takes the
    one after (it took the preview's, and the sheet then failed: "file exists")."""
    three(sw)
    sw.run(sw.src / "p0.jpg", "-o", sw.out, "--ratio", "1:1")
    sheet = sw.out / "p0_1x1-1.jpg"
    res = sw.run(sw.src / "p0.jpg", "-o", sw.out, "--ratio", "1:1", "--json", "--preview", sheet)
    sw.check(res, 0, done=["p0.jpg"])
    assert [Path(r["output"]).name for r in res.records] == ["p0_1x1-2.jpg"]
    assert Image.open(sheet).size != Image.open(sw.out / "p0_1x1-2.jpg").size  # the sheet, not a crop


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_a_preview_where_no_file_can_be_made_is_refused_before_any_work(sw):
    """/proc passes os.access for root; a file made there (and removed) is the check."""
    three(sw)
    res = sw.run(sw.src, "-o", sw.out, "--preview", "/proc/sheet.jpg")
    sw.check(res, 2, failed=["/proc/sheet.jpg"], lines=1)
    assert "not writable" in res.lines[0] and not sw.out.exists()


def test_a_preview_with_no_photo_cropped_says_so(sw):
    (sw.src / "bad.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    res = sw.run(sw.src, "-o", sw.out, "--preview", sw.root / "sheet.jpg")
    sw.check(res, 1, failed=["bad.jpg"], lines=2)
    assert res.lines[1] == f"smartcrop: {sw.root / 'sheet.jpg'}: note: no photo was cropped, so no preview was written"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_a_write_error_names_the_file_asked_for_not_the_temporary_one():
    from smartcrop.runner import describe_error

    with pytest.raises(OSError) as e:
        imageio.write_file(Path("/proc/x.jpg"), b"data")
    assert e.value.filename == "/proc/x.jpg" and ".smartcrop" not in str(e.value)
    assert describe_error(e.value) == f"{e.value.strerror}: /proc/x.jpg"
    assert describe_error(FileNotFoundError(2, "No such file or directory")) == "No such file or directory"


@pytest.mark.parametrize("flags", [[], ["--dry-run"]])
def test_an_output_folder_in_a_symlink_loop_is_refused(sw, flags):
    three(sw)
    (sw.root / "la").symlink_to(sw.root / "lb")
    (sw.root / "lb").symlink_to(sw.root / "la")
    res = sw.run(sw.src, "-o", sw.root / "la", *flags)
    sw.check(res, 2, failed=["cannot be resolved"])


def test_preview_in_a_missing_folder_is_made_and_under_a_file_refused_before_any_work(sw):
    three(sw)
    (sw.root / "notes").write_text("x")
    res = sw.run(sw.src, "-o", sw.out, "--preview", sw.root / "notes" / "sheet.jpg")
    sw.check(res, 2, failed=["notes"])
    assert not sw.out.exists()
    res = sw.run(sw.src, "-o", sw.out, "--preview", sw.root / "sheets" / "new" / "sheet.jpg", "--json")
    sw.check(res, 0, done=["p0.jpg", "p1.jpg", "p2.jpg"], outside=["sheets/new/sheet.jpg"])
    assert imageio.written_by_smartcrop(sw.root / "sheets" / "new" / "sheet.jpg")


def test_preview_on_a_read_only_file_system_is_refused_before_any_work(sw, tmp_path):
    three(sw)
    ro = tmp_path / "ro"
    ro.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:
        res = sw.run(sw.src, "-o", sw.out, "--preview", ro / "sheet.jpg")
        sw.check(res, 2, failed=["not writable"])
        assert not sw.out.exists()
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)


def test_an_output_folder_that_is_a_dangling_symlink_is_named_so(sw):
    three(sw)
    (sw.root / "d").symlink_to(sw.root / "nowhere" / "x")
    res = sw.run(sw.src, "-o", sw.root / "d")
    sw.check(res, 2, failed=["is a symlink to", "does not exist"], lines=1)


def test_dry_run_with_a_preview_draws_the_sheet_and_writes_no_crop(sw):
    three(sw)
    res = sw.run(sw.src, "-o", sw.out, "--dry-run", "--preview", sw.root / "look.jpg")
    sw.check(res, 0, outside=["look.jpg"])
    assert not sw.out.exists() and len(res.out.decode().splitlines()) == 3


@pytest.mark.parametrize("how", ["missing", "garbage", "not ours", "name"])
def test_a_bad_model_is_refused_before_the_output_folder_is_made(sw, how, monkeypatch):
    three(sw)
    monkeypatch.setenv("SMARTCROP_HOME", str(sw.root / "home"))
    bad = sw.root / "m.safetensors"
    if how == "garbage":
        bad.write_bytes(b"not a model")
    elif how == "not ours":  # a valid safetensors file without smartcrop's header
        from safetensors.numpy import save_file

        save_file({"w": np.zeros(3, np.float32)}, str(bad))
    args = ["--model", "nosuch"] if how == "name" else ["--weights", str(bad)]
    r = CliRunner().invoke(app, ["run", str(sw.src), "-o", str(sw.out), *args])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert ("nosuch" if how == "name" else "m.safetensors") in r.stderr
    assert not sw.out.exists()


# --------------------------------------------------------------------------- every write complete or absent


def _misbehaving_write(monkeypatch, out: Path, mode: str, after: int = 0):
    """os.write misbehaves for files inside ``out`` after ``after`` good writes there."""
    real = os.write
    root = str(out.resolve())
    seen = {"n": 0}

    def write(fd, data):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if not target.startswith(root + os.sep):
            return real(fd, data)
        seen["n"] += 1
        data = bytes(data)
        if mode == "short":  # legal partial writes: must be continued
            return real(fd, data[: max(1, len(data) // 3)])
        if seen["n"] <= after:
            return real(fd, data)
        if mode == "lie":  # claims success, half reached the disk
            real(fd, data[: len(data) // 2])
            return len(data)
        real(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC if mode == "enospc" else errno.EFBIG, "simulated")

    if not os.path.exists("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to tell output files from others")
    monkeypatch.setattr(os, "write", write)


def test_short_writes_are_continued(sw, monkeypatch):
    three(sw)
    _misbehaving_write(monkeypatch, sw.out, "short")
    res = sw.run(sw.src, "-o", sw.out, "--json", "--ratio", "16:9", "--reencode")
    sw.check(res, 0, done=["p0.jpg", "p1.jpg", "p2.jpg"])


@pytest.mark.parametrize("mode", ["enospc", "efbig"])
def test_full_output_disk_fails_that_file_and_says_so(sw, monkeypatch, mode):
    three(sw)
    sw.out.mkdir()
    _misbehaving_write(monkeypatch, sw.out, mode, after=1)
    res = sw.run(sw.src, "-o", sw.out, "--json", "--ratio", "16:9")
    sw.check(res, 1, failed=["p1.jpg", "p2.jpg"], done=["p0.jpg"])
    assert all("output disk is full" in ln and "out/p" in ln for ln in res.lines), res.lines
    assert sw.outputs() == ["p0_16x9.jpg"]


def test_a_lying_write_is_caught_by_the_length_check(sw, monkeypatch):
    three(sw)
    sw.out.mkdir()
    _misbehaving_write(monkeypatch, sw.out, "lie", after=2)
    res = sw.run(sw.src, "-o", sw.out, "--json", "--ratio", "16:9")
    sw.check(res, 1, failed=["p2.jpg"], done=["p0.jpg", "p1.jpg"])
    assert "short write" in res.err and sw.outputs() == ["p0_16x9.jpg", "p1_16x9.jpg"]


def test_failed_fsync_leaves_nothing(sw, monkeypatch):
    three(sw)
    real = os.fsync

    def fsync(fd):
        if stat.S_ISREG(os.fstat(fd).st_mode) and "p1" not in str(calls):
            calls.append("p1")
            raise OSError(errno.EIO, "simulated I/O error")
        return real(fd)

    calls: list = []
    monkeypatch.setattr(os, "fsync", fsync)
    res = sw.run(sw.src, "-o", sw.out, "--json", "--ratio", "16:9")
    sw.check(res, 1, failed=["p0.jpg"], done=["p1.jpg", "p2.jpg"])


def test_failed_rename_leaves_nothing(sw, monkeypatch):
    three(sw)

    def broken(*a, **k):
        raise OSError(errno.EIO, "simulated rename failure")

    monkeypatch.setattr(os, "link", broken)
    monkeypatch.setattr(os, "replace", broken)
    res = sw.run(sw.src, "-o", sw.out, "--json", "--ratio", "16:9")
    sw.check(res, 1, failed=["p0.jpg", "p1.jpg", "p2.jpg"])
    assert sw.outputs() == []


def test_rerun_with_skip_existing_after_a_full_disk_makes_the_missing_crops(sw, monkeypatch):
    three(sw)
    sw.out.mkdir()
    with monkeypatch.context() as m:
        _misbehaving_write(m, sw.out, "enospc", after=1)
        first = sw.run(sw.src, "-o", sw.out, "--json", "--ratio", "16:9")
    assert first.code == 1
    res = sw.run(sw.src, "-o", sw.out, "--json", "--ratio", "16:9", "--skip-existing")
    sw.check(res, 0, done=["p1.jpg", "p2.jpg"])
    assert [r.get("skipped") for r in res.records] == ["exists", None, None]


@pytest.fixture
def tiny_tmpfs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): the full disk is simulated by the "
                    "os.write tests above")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_really_full_tmpfs(sw, tiny_tmpfs):
    rng = np.random.default_rng(0)
    for k in range(4):  # noise: each crop is ~40 KB, the file system holds 96 KB
        Image.fromarray(rng.integers(0, 255, (160, 240, 3), dtype=np.uint8)).save(sw.src / f"n{k}.png")
    out = tiny_tmpfs / "out"
    sw.snapshot()
    res = sw.run(sw.src, "-o", out, "--json", "--ratio", "1:1", snapshot=False)
    assert res.code == 1, res.err
    written = {Path(r["output"]).name for r in res.records}
    assert written and len(res.lines) == 4 - len(written)
    assert all("output disk is full" in ln for ln in res.lines)
    for p in out.iterdir():  # what is there is complete; no temporary file
        assert not p.name.startswith(".")
        with Image.open(p) as im:
            im.load()
    sw.assert_intact(outside=[f"tmpfs/out/{n}" for n in written])


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temps_of_killed_runs_are_removed(sw):
    three(sw)
    dead = _dead_pid()
    (sw.out / "sub").mkdir(parents=True)
    stale = [sw.out / f".smartcrop-{dead}-0123abcd.tmp", sw.out / "sub" / f".smartcrop-{dead}-89abcdef.tmp"]
    live = sw.out / f".smartcrop-{os.getpid()}-00000000.tmp"  # a run that is still going
    other = sw.out / ".notes.tmp"  # not smartcrop's naming
    for p in stale + [live, other]:
        p.write_bytes(b"partial")
    sw.snapshot()
    res = sw.run(sw.src, "-o", sw.out, "--json", snapshot=False)
    assert res.code == 0 and not any(p.exists() for p in stale)
    assert live.exists() and other.exists()
    live.unlink()
    other.unlink()
    for p in stale:
        sw.before.pop(os.fsdecode(p.relative_to(sw.root)))
    sw.before.pop("out/" + live.name)
    sw.before.pop("out/" + other.name)
    sw.assert_intact()


def test_sigkill_mid_write_then_a_run_cleans_up(sw):
    three(sw)
    sw.out.mkdir()
    code = ("import os, sys, time\nfrom smartcrop import imageio\n"
            "os.fsync = lambda fd: (print('writing', flush=True), time.sleep(60))\n"
            f"imageio.write_file({str(sw.out / 'x.jpg')!r}, b'\\xff\\xd8\\xff' + b'x' * 1000)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=ROOT)
    assert p.stdout.readline().strip() == b"writing"
    p.kill()
    p.wait()
    left = [n for n in os.listdir(sw.out) if n.startswith(".smartcrop-")]
    assert len(left) == 1 and not (sw.out / "x.jpg").exists()  # killed: a temp file, never a partial x.jpg
    sw.snapshot()
    sw.before.pop("out/" + left[0])
    res = sw.run(sw.src, "-o", sw.out, "--json", snapshot=False)
    sw.check(res, 0, done=["p0.jpg", "p1.jpg", "p2.jpg"])


@pytest.mark.parametrize("at", ["between photos", "mid-write"])
def test_sigterm_stops_like_ctrl_c(sw, monkeypatch, at):
    three(sw)
    import smartcrop.runner as runner

    if at == "between photos":
        real = runner.finish

        def finish(job):
            out = real(job)
            os.kill(os.getpid(), signal.SIGTERM)
            return out

        monkeypatch.setattr(runner, "finish", finish)
    else:
        real_fsync = os.fsync

        def fsync(fd):
            if stat.S_ISREG(os.fstat(fd).st_mode):
                os.kill(os.getpid(), signal.SIGTERM)
            return real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)
    res = sw.run(sw.src, "-o", sw.out, "--json", "--ratio", "16:9")
    sw.check(res, 143, failed=["terminated"])
    assert "nothing partial" in res.err
    assert len(sw.outputs()) == (1 if at == "between photos" else 0)


def _descendants(pid: int) -> set[int]:
    """Process ids under ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat_line = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat_line.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(d))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _busy_run(sw, n: int = 120) -> subprocess.Popen:
    """A two-worker run over ``n`` photos, started in its own process group and caught once its first crop is
    written (plenty of work left)."""
    for k in range(n):
        sw.photo(f"p{k:03d}.jpg", size=(320, 240), seed=k)
    p = subprocess.Popen([sys.executable, "-m", "smartcrop.cli", "run", str(sw.src), "-o", str(sw.out), "-j", "2",
                          "--ratio", "16:9", "--json", "--weights", str(sw.model)], cwd=ROOT, start_new_session=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         # a suite started in the background inherits SIGINT ignored, and Python then keeps it so
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not (sw.out.is_dir() and any(n.endswith(".jpg") for n in os.listdir(sw.out))):
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.02)
    return p


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc")
def test_workers_exit_when_the_run_is_killed_outright(sw):
    p = _busy_run(sw)
    under = _descendants(p.pid)
    assert under, "the run has worker processes"
    p.kill()  # SIGKILL (or the kernel's OOM killer): no handler runs
    p.wait()
    deadline = time.monotonic() + 10
    while any(_alive(c) for c in under) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(c) for c in under), "orphaned workers still running"
    p.stdout.read(), p.stderr.read()  # every writer of the pipes is gone: this returns (it hung before)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_every_crop_finished_at_an_interrupt_has_its_json_line(sw, sig):
    p = _busy_run(sw)
    p.send_signal(sig)  # the main process only: its workers finish the crops they are writing
    out, err = p.communicate(timeout=60)
    assert p.returncode == (143 if sig == signal.SIGTERM else 130), err
    reported = {Path(json.loads(line)["output"]).name for line in out.decode().splitlines()}
    on_disk = {n for n in os.listdir(sw.out) if not n.startswith(".")}
    assert reported == on_disk and len(on_disk) < 120


def test_sigterm_to_the_whole_process_group_stops_in_one_line(sw):
    p = _busy_run(sw)
    # what a worker stopped mid-write leaves (whether one is, when the signal lands, is down to timing): the
    # temporary file of a process that is gone
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (sw.out / imageio.temp_name(gone.pid)).write_bytes(b"\xff\xd8 half a JPEG")
    os.killpg(p.pid, signal.SIGTERM)  # as timeout, docker stop or systemd do
    out, err = p.communicate(timeout=60)
    lines = err.decode().strip().splitlines()
    assert p.returncode == 143 and len(lines) == 1 and lines[0].startswith("smartcrop: terminated"), lines
    assert not [n for n in os.listdir(sw.out) if n.startswith(".smartcrop-")]  # a worker's unfinished file too
    for n in os.listdir(sw.out):
        with Image.open(sw.out / n) as im:
            im.load()


def test_a_file_in_the_way_of_a_template_sub_folder_fails_that_photo_in_plain_words(sw):
    three(sw)
    sw.out.mkdir()
    (sw.out / "p1").write_text("mine")
    sw.snapshot()
    res = sw.run(sw.src, "-o", sw.out, "--name", "{stem}/{ratio}.jpg", "--ratio", "1:1", "--json", snapshot=False)
    sw.check(res, 1, failed=["a file is in the way of its folder"], done=["p0.jpg", "p2.jpg"])
    assert "p1.jpg" in res.lines[0] and (sw.out / "p1").read_text() == "mine"


@pytest.mark.parametrize("flags", [[], ["--skip-existing"]])
def test_a_name_another_run_takes_meanwhile_is_never_replaced(sw, monkeypatch, flags):
    """Two runs into one folder: a name this run claimed is written by the other before this one commits."""
    three(sw)
    theirs = imageio.encode_image(Image.new("RGB", (8, 8), (0, 200, 0)), "jpg")
    real = imageio.write_file

    def racing(path, data, **kw):
        p = Path(path)
        if p.name == "p1_16x9.jpg" and not p.exists():
            real(p, theirs)  # the other run, just before this one
        return real(path, data, **kw)

    monkeypatch.setattr(imageio, "write_file", racing)
    res = sw.run(sw.src, "-o", sw.out, "--ratio", "16:9", "--json", *flags)
    sw.check(res, 0, done=["p0.jpg", "p2.jpg"])
    assert (sw.out / "p1_16x9.jpg").read_bytes() == imageio.mark_output(theirs)  # theirs, untouched
    p1 = next(r for r in res.records if Path(r["input"]).name == "p1.jpg")
    if flags:
        assert p1["skipped"] == "exists" and p1["output"] == str(sw.out / "p1_16x9.jpg") and "lossless" not in p1
        assert sorted(sw.outputs()) == ["p0_16x9.jpg", "p1_16x9.jpg", "p2_16x9.jpg"]
    else:
        assert p1["output"] == str(sw.out / "p1_16x9-1.jpg") and "skipped" not in p1
        assert sorted(sw.outputs()) == ["p0_16x9.jpg", "p1_16x9-1.jpg", "p1_16x9.jpg", "p2_16x9.jpg"]


@pytest.mark.parametrize("stem_bytes,ok", [(246, True), (250, False)])
def test_long_stems_fit_or_fail_alone(sw, stem_bytes, ok):
    three(sw)
    long = sw.photo("é" * ((stem_bytes - 2) // 2) + "xx"[: stem_bytes - 2 * ((stem_bytes - 2) // 2)] + ".jpg")
    assert len(os.fsencode(long.stem)) == stem_bytes
    res = sw.run(sw.src, "-o", sw.out, "--json", "--ratio", "16:9")
    if ok:  # the final name (stem + "_16x9.jpg") is 255 bytes: it fits, and so does the temporary name
        sw.check(res, 0, done=[long.name, "p0.jpg"])
    else:
        sw.check(res, 1, failed=["255"], done=["p0.jpg", "p1.jpg", "p2.jpg"])


def test_a_name_made_too_long_by_a_planned_clash_suffix_says_why(sw):
    a = sw.photo("s" * 246 + ".jpg")
    b = sw.photo("s" * 246 + ".png", seed=1)
    res = sw.run(a, b, "-o", sw.out, "--ratio", "16:9", "--format", "jpg", "--json")
    sw.check(res, 1, failed=[b.name], done=[a.name], lines=1)
    assert "its name is another input's too, and with the suffix -1 its output name would be 257" in res.lines[0]


def test_a_name_that_fits_until_a_clash_adds_its_suffix_says_why_it_fails(sw):
    long = sw.photo("s" * 246 + ".jpg")  # its crop's name is 255 bytes; with "-1" it would be 257
    sw.run(long, "-o", sw.out, "--ratio", "16:9")
    res = sw.run(long, "-o", sw.out, "--ratio", "16:9")
    sw.check(res, 1, failed=[long.name], lines=1)
    assert "its name is taken, and with the suffix -1 its output name would be 257 bytes long" in res.lines[0]


def test_planted_symlinks_at_probe_names_are_never_followed(sw):
    three(sw)
    sw.out.mkdir()
    victim = sw.root / "victim.txt"
    victim.write_bytes(b"precious")
    for name in [f".smartcrop-write-test-{os.getpid()}", ".smartcrop-probe-x", f".smartcrop-{os.getpid()}-00000000.tmp"]:
        (sw.out / name).symlink_to(victim)
    res = sw.run(sw.src, "-o", sw.out, "--json")
    sw.check(res, 0, done=["p0.jpg"])
    assert victim.read_bytes() == b"precious"


def test_symlink_planted_at_an_output_name_is_not_written_through(sw):
    three(sw)
    sw.out.mkdir()
    victim = sw.root / "victim.jpg"
    victim.write_bytes(b"precious")
    (sw.out / "p0_16x9.jpg").symlink_to(victim)
    res = sw.run(sw.src, "-o", sw.out, "--json", "--ratio", "16:9")
    sw.check(res, 0, done=["p0.jpg"])
    assert {Path(r["output"]).name for r in res.records} == {"p0_16x9-1.jpg", "p1_16x9.jpg", "p2_16x9.jpg"}
    res = sw.run(sw.src, "-o", sw.out, "--json", "--ratio", "16:9", "--overwrite")
    sw.check(res, 0, done=["p0.jpg"], changed=["out/p0_16x9.jpg", "out/p0_16x9-1.jpg", "out/p1_16x9.jpg",
                                               "out/p2_16x9.jpg"])
    assert victim.read_bytes() == b"precious" and not (sw.out / "p0_16x9.jpg").is_symlink()


def test_symlinked_output_subfolder_pointing_outside_is_not_written(sw):
    sw.photo("sub/a.jpg")
    sw.photo("b.jpg")
    elsewhere = sw.root / "elsewhere"
    elsewhere.mkdir()
    sw.out.mkdir()
    (sw.out / "sub").symlink_to(elsewhere)
    res = sw.run(sw.src, "-r", "-o", sw.out, "--json")
    sw.check(res, 1, failed=["a.jpg"], done=["b.jpg"])
    assert list(elsewhere.iterdir()) == []


# ---------------------------------------------------------------------------------------- honest re-runs


def _two_cameras(sw: Sweep) -> list[Path]:
    return [sw.photo("cam1/IMG_0001.jpg", seed=1), sw.photo("cam2/IMG_0001.jpg", seed=2)]


def test_same_name_from_two_cameras_gets_two_stable_outputs(sw):
    a, b = _two_cameras(sw)
    res = sw.run(sw.src / "cam1", sw.src / "cam2", "-o", sw.out, "--json", "--ratio", "16:9")
    sw.check(res, 0)
    assert [(Path(r["input"]).parent.name, Path(r["output"]).name) for r in res.records] == \
        [("cam1", "IMG_0001_16x9.jpg"), ("cam2", "IMG_0001_16x9-1.jpg")]
    res = sw.run(sw.src / "cam1", sw.src / "cam2", "-o", sw.out, "--json", "--ratio", "16:9", "--skip-existing")
    sw.check(res, 0)
    assert [r["skipped"] for r in res.records] == ["exists", "exists"]
    assert sw.outputs() == ["IMG_0001_16x9-1.jpg", "IMG_0001_16x9.jpg"]


def test_a_forced_format_names_clashing_inputs_by_position_and_reruns_skip_them(sw):
    """--format jpg gives a.jpg, a.png and sub/a.jpg one name: suffixes by position, and a re-run with
    --skip-existing skips all three (a.png's clash was planned with its own extension and took -1, -2, …)."""
    ins = [sw.photo("a.jpg"), sw.photo("a.png", seed=1), sw.photo("sub/a.jpg", seed=2)]
    args = [*ins, "-o", sw.out, "--json", "--ratio", "1:1", "--format", "jpg"]
    res = sw.run(*args)
    sw.check(res, 0)
    assert [(Path(r["input"]).relative_to(sw.src).as_posix(), Path(r["output"]).name) for r in res.records] == \
        [("a.jpg", "a_1x1.jpg"), ("a.png", "a_1x1-1.jpg"), ("sub/a.jpg", "a_1x1-2.jpg")]
    for _ in range(2):
        res = sw.run(*args, "--skip-existing")
        sw.check(res, 0)
        assert [r["skipped"] for r in res.records] == ["exists"] * 3
        assert sw.outputs() == ["a_1x1-1.jpg", "a_1x1-2.jpg", "a_1x1.jpg"]


@pytest.mark.parametrize("flag", ["--skip-existing", "--overwrite"])
def test_a_clash_that_could_not_be_planned_adds_no_copy_on_re_runs(sw, flag):
    """A transparent logo.gif is planned as logo_1x1.jpg but written as PNG, onto logo.png's name: logo.png takes
    the next suffix. Re-runs with --skip-existing (or --overwrite) wrote it again as -2, -3 …"""
    gif = Image.new("P", (96, 64), 1)
    gif.paste(0, (0, 0, 96, 16))  # a transparent band
    gif.putpalette([0, 0, 0, 200, 60, 40] + [0] * 762)
    gif.save(sw.src / "logo.gif", transparency=0)
    sw.photo("logo.png", seed=1)
    args = [sw.src / "logo.gif", sw.src / "logo.png", "-o", sw.out, "--json", "--ratio", "1:1"]
    sw.run(*args)
    first = sw.outputs()
    assert first == ["logo_1x1-1.png", "logo_1x1.png"]
    for _ in range(2):
        res = sw.run(*args, flag)
        sw.check(res, 0, changed=[f"out/{n}" for n in first] if flag == "--overwrite" else ())
        assert sw.outputs() == first
        if flag == "--skip-existing":
            assert [r["skipped"] for r in res.records] == ["exists", "exists"]


@pytest.mark.parametrize("flag", ["--skip-existing", "--overwrite"])
def test_a_file_of_the_users_under_a_clash_suffix_is_never_taken_over(sw, flag):
    gif = Image.new("P", (96, 64), 1)
    gif.paste(0, (0, 0, 96, 16))
    gif.putpalette([0, 0, 0, 200, 60, 40] + [0] * 762)
    gif.save(sw.src / "logo.gif", transparency=0)
    sw.photo("logo.png", seed=1)
    mine = draw_photo(sw.out / "logo_1x1-1.png", seed=5)  # the user's own picture, not a crop
    before = sha(mine)
    res = sw.run(sw.src / "logo.gif", sw.src / "logo.png", "-o", sw.out, "--json", "--ratio", "1:1", flag)
    sw.check(res, 0, outside=["out/logo_1x1-1.png"])
    assert sha(mine) == before
    assert [(Path(r["output"]).name, r.get("skipped")) for r in res.records] == \
        [("logo_1x1.png", None), ("logo_1x1-2.png", None)]


def test_one_ratio_spelt_twice_is_one_crop(sw):
    sw.photo("a.jpg")
    res = sw.run(sw.src / "a.jpg", "-o", sw.out, "--json", "--ratio", "16:9", "--ratio", "16x9", "--ratio", "32:18")
    sw.check(res, 0)
    assert [(r["ratio"], Path(r["output"]).name) for r in res.records] == [("16:9", "a_16x9.jpg")]


def test_the_summary_counts_crops_written_not_crops_skipped():
    from smartcrop.plan import RunOptions
    from smartcrop.runner import RunSummary

    opts = RunOptions(out_dir=Path("out"))
    assert RunSummary(images=1, written=0, skipped=1, boxes=1).describe(opts) == \
        "1 photo, 0 crops written, 1 skipped (exist) → out"
    assert RunSummary(images=2, written=1, skipped=1, boxes=2).describe(opts, 1) == \
        "2 photos, 1 crop written, 1 skipped (exist), 1 failed → out"
    dry = RunOptions(out_dir=Path("out"), dry_run=True)
    assert RunSummary(images=3, boxes=3).describe(dry) == "3 photos, 3 boxes computed"


def test_skip_existing_decides_per_input(sw):
    _two_cameras(sw)
    args = [sw.src / "cam1", sw.src / "cam2", "-o", sw.out, "--json", "--ratio", "16:9"]
    sw.run(*args)
    (sw.out / "IMG_0001_16x9-1.jpg").unlink()  # cam2's crop lost: only it is made again, under its own name
    res = sw.run(*args, "--skip-existing")
    sw.check(res, 0, done=["IMG_0001.jpg"])
    assert [(r.get("skipped"), Path(r["output"]).name) for r in res.records] == \
        [("exists", "IMG_0001_16x9.jpg"), (None, "IMG_0001_16x9-1.jpg")]


def test_a_photo_added_that_takes_an_earlier_ones_name_is_cropped_on_a_skip_existing_re_run(sw):
    """b.jpg cropped; then b.jpeg added, which sorts first and so is planned on b_1x1.jpg. --skip-existing took
    b.jpg's crop there for b.jpeg's (reported skipped, never cropped) and wrote b.jpg's again as -1."""
    sw.photo("b.jpg", seed=1)
    args = [sw.src, "-o", sw.out, "--json", "--ratio", "1:1"]
    sw.check(sw.run(*args), 0)
    first = (sw.out / "b_1x1.jpg").read_bytes()
    sw.photo("b.jpeg", seed=2)
    res = sw.run(*args, "--skip-existing")
    sw.check(res, 0, done=["b.jpeg"])
    assert [(Path(r["input"]).name, Path(r["output"]).name, r.get("skipped")) for r in res.records] == \
        [("b.jpeg", "b_1x1-2.jpg", None), ("b.jpg", "b_1x1.jpg", "exists")]
    assert sw.outputs() == ["b_1x1-2.jpg", "b_1x1.jpg"] and (sw.out / "b_1x1.jpg").read_bytes() == first
    for _ in range(2):  # and from then on, both skipped where they are
        res = sw.run(*args, "--skip-existing")
        sw.check(res, 0)
        assert [(Path(r["output"]).name, r.get("skipped")) for r in res.records] == \
            [("b_1x1-2.jpg", "exists"), ("b_1x1.jpg", "exists")]
        assert sw.outputs() == ["b_1x1-2.jpg", "b_1x1.jpg"]


def test_a_skip_existing_re_run_decodes_only_the_photos_with_a_crop_missing(sw, monkeypatch):
    """Resuming an interrupted folder decoded and scored every photo again, those whose every crop exists too."""
    import smartcrop.runner as runner_mod
    from smartcrop import stages

    ins = three(sw) + [sw.photo("p3.jpg", seed=3)]  # --adapt needs 4
    args = [sw.src, "-o", sw.out, "--json", "--ratio", "16:9", "--ratio", "1:1"]
    sw.check(sw.run(*args), 0)
    (sw.out / "p1_1x1.jpg").unlink()
    decoded = []

    def counting(source, *a):
        decoded.append(Path(source).name)
        return stages.prepare(source, *a)

    monkeypatch.setattr(runner_mod, "prepare", counting)
    res = sw.run(*args, "--skip-existing")
    sw.check(res, 0, done=["p1.jpg"])
    assert decoded == ["p1.jpg"]
    assert [(Path(r["output"]).name, r.get("skipped"), r["box"] is None) for r in res.records] == \
        [("p0_16x9.jpg", "exists", True), ("p0_1x1.jpg", "exists", True),
         ("p1_16x9.jpg", "exists", False), ("p1_1x1.jpg", None, False),
         ("p2_16x9.jpg", "exists", True), ("p2_1x1.jpg", "exists", True),
         ("p3_16x9.jpg", "exists", True), ("p3_1x1.jpg", "exists", True)]
    assert res.records[0] == {"input": str(ins[0]), "output": str(sw.out / "p0_16x9.jpg"), "ratio": "16:9",
                              "box": None, "score": None, "size": None, "skipped": "exists"}
    # every crop there: nothing decoded, and no model loaded either
    import smartcrop.cropper as cropper_mod

    monkeypatch.setattr(cropper_mod.Cropper, "__init__", lambda *a, **k: pytest.fail("model loaded"))
    for extra in ([], ["--adapt"]):  # nor fine-tuned for photos it will not crop
        decoded.clear()
        res = sw.run(*args, "--skip-existing", *extra)
        sw.check(res, 0)
        assert decoded == [] and [r["skipped"] for r in res.records] == ["exists"] * 8


def test_a_skip_existing_re_run_finds_its_crop_past_a_gap_in_the_suffixes(sw):
    """b.jpeg, added after b.jpg, was cropped as -2 (-1 is b.jpg's name); b.jpg removed, the search for b.jpeg's
    crop stopped at the missing -1 and wrote it again there."""
    sw.photo("b.jpg", seed=1)
    args = [sw.src, "-o", sw.out, "--json", "--ratio", "1:1", "--skip-existing"]
    sw.run(*args)
    sw.photo("b.jpeg", seed=2)
    sw.run(*args)
    (sw.src / "b.jpg").unlink()
    res = sw.run(*args)
    sw.check(res, 0)
    assert [(Path(r["output"]).name, r.get("skipped")) for r in res.records] == [("b_1x1-2.jpg", "exists")]
    assert sw.outputs() == ["b_1x1-2.jpg", "b_1x1.jpg"]


def test_a_new_photo_is_not_skipped_for_another_ones_crop_under_a_clash_suffix(sw):
    """With a template without {stem} every photo of a folder clashes: a, b, c gave 1x1/1, 1x1/1-1, 1x1/1-2;
    a and c removed and d added, d (planned on -1, which b holds) was skipped against c's crop under -2."""
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        sw.photo(f"{name}.jpg", seed=seed)
    args = [sw.src, "-o", sw.out, "--json", "--ratio", "1:1", "--ratio", "3:2", "--name", "{ratio}/{rank}.{ext}",
            "--skip-existing"]
    sw.run(*args)
    (sw.src / "a.jpg").unlink()
    (sw.src / "c.jpg").unlink()
    (sw.out / "3x2" / "1-1.jpg").unlink()  # b's other crop: b is cropped again, taking its 1:1 name first
    sw.photo("d.jpg", seed=4)
    res = sw.run(*args)
    sw.check(res, 0, done=["d.jpg"])
    assert [(Path(r["input"]).name, Path(r["output"]).relative_to(sw.out).as_posix(), r.get("skipped"))
            for r in res.records] == [("b.jpg", "1x1/1-1.jpg", "exists"), ("b.jpg", "3x2/1-3.jpg", None),
                                      ("d.jpg", "1x1/1-3.jpg", None), ("d.jpg", "3x2/1-1.jpg", None)]


def test_a_folder_cropped_again_from_a_sub_folder_is_skipped(sw):
    """in/ -r wrote out/sub/b_1x1.jpg; in/sub -o out/sub --skip-existing took it for another photo's (the tag was
    the path under the folder given) and wrote b_1x1-1.jpg."""
    sw.photo("sub/b.jpg", seed=1)
    sw.run(sw.src, "-r", "-o", sw.out, "--ratio", "1:1")
    res = sw.run(sw.src / "sub", "-o", sw.out / "sub", "--json", "--ratio", "1:1", "--skip-existing")
    sw.check(res, 0)
    assert [r.get("skipped") for r in res.records] == ["exists"] and sw.outputs() == ["sub/b_1x1.jpg"]


def test_skip_existing_claims_stay_linear_when_every_photo_clashes(tmp_path, monkeypatch):
    """A template without {stem}: each claim whose name was missing read the suffixes one by one from 0 —
    quadratic in the photos (2,000 claims: 214 s)."""
    from smartcrop import naming
    from smartcrop.inputs import InputItem

    out = tmp_path / "out"
    (out / "1x1").mkdir(parents=True)
    items = [InputItem(f"p{k:04d}.jpg", tmp_path / f"p{k:04d}.jpg", Path(""), f"p{k:04d}", ".jpg")
             for k in range(300)]
    for k in range(0, 300, 3):  # an earlier run's crops of every third photo
        imageio.write_file(out / "1x1" / (f"1-{k}.jpg" if k else "1.jpg"), imageio.encode_image(
            Image.new("RGB", (8, 8)), "jpg"), source=naming.source_of(items[k]))
    reads = []
    real = naming.output_source
    monkeypatch.setattr(naming, "output_source", lambda p: reads.append(p) or real(p))
    namer = naming.OutputNamer(out, "{ratio}/{rank}.{ext}", skip_existing=True, items=items)
    claims = [namer.claim(it, "1:1", 1, "jpg", (8, 8)) for it in items]
    assert [c.skip for c in claims] == ["exists" if k % 3 == 0 else None for k in range(300)]
    assert len(reads) <= 2 * 100 + 300


def test_another_folders_photo_of_the_same_name_is_cropped_not_skipped(sw):
    """Card 2 cropped first, then cards 1 and 2 into the same folder: card 1's IMG_0001.jpg (first in order, so
    planned on card 2's crop) was skipped against card 2's crop on every run — the tag named the file name."""
    _two_cameras(sw)
    sw.run(sw.src / "cam2", "-o", sw.out, "--ratio", "16:9")
    args = [sw.src / "cam1", sw.src / "cam2", "-o", sw.out, "--json", "--ratio", "16:9", "--skip-existing"]
    res = sw.run(*args)
    sw.check(res, 0, done=["IMG_0001.jpg"])
    assert [(Path(r["input"]).parent.name, Path(r["output"]).name, r.get("skipped")) for r in res.records] == \
        [("cam1", "IMG_0001_16x9-2.jpg", None), ("cam2", "IMG_0001_16x9.jpg", "exists")]
    res = sw.run(*args)
    assert [r.get("skipped") for r in res.records] == ["exists", "exists"] and len(sw.outputs()) == 2


def test_same_named_photos_of_one_byte_size_from_two_folders_are_both_cropped(sw):
    """Uncompressed TIFFs of one size: the tag (file name and size) was the same, so the second card's photo was
    skipped against the first's crop for ever."""
    sw.photo("cam1/IMG_0001.tif", seed=1)
    sw.photo("cam2/IMG_0001.tif", seed=2)
    assert (sw.src / "cam1/IMG_0001.tif").stat().st_size == (sw.src / "cam2/IMG_0001.tif").stat().st_size
    sw.run(sw.src / "cam2", "-o", sw.out, "--ratio", "16:9")
    args = [sw.src / "cam1", sw.src / "cam2", "-o", sw.out, "--json", "--ratio", "16:9", "--skip-existing"]
    res = sw.run(*args)
    sw.check(res, 0)
    assert [(Path(r["input"]).parent.name, Path(r["output"]).name, r.get("skipped")) for r in res.records] == \
        [("cam1", "IMG_0001_16x9-2.tif", None), ("cam2", "IMG_0001_16x9.tif", "exists")]


def test_a_photo_renamed_but_for_its_extension_keeps_its_crop(sw):
    sw.photo("b.jpg", seed=1)
    args = [sw.src, "-o", sw.out, "--json", "--ratio", "16:9", "--skip-existing"]
    sw.run(*args)
    (sw.src / "b.jpg").rename(sw.src / "b.JPEG")
    res = sw.run(*args)
    sw.check(res, 0)
    assert [r.get("skipped") for r in res.records] == ["exists"] and sw.outputs() == ["b_16x9.jpg"]


def test_a_photo_edited_since_is_cropped_once_more_even_by_a_plan_run_twice(sw):
    """An edited photo (other bytes) gets a new crop under a suffix, the old one kept; running the same plan
    again through the library (a retry) reused the run's listing, without that crop, and added one each time."""
    from smartcrop.plan import plan_run
    from smartcrop.runner import crop_photos

    sw.photo("a.jpg", seed=1)
    sw.run(sw.src, "-o", sw.out, "--ratio", "16:9")
    sw.photo("a.jpg", seed=2)  # edited
    plan = plan_run([str(sw.src)], output=sw.out, ratios=["16:9"], skip_existing=True, workers=1)
    outputs = [[r.output for r in crop_photos(plan, weights=sw.model).records] for _ in range(3)]
    assert outputs == [[str(sw.out / "a_16x9-1.jpg")]] * 3
    assert sw.outputs() == ["a_16x9-1.jpg", "a_16x9.jpg"]


def test_copies_of_one_photo_named_by_size_are_each_made_again_when_missing(sw):
    """Two identical copies (one tag) with --size and {w}x{h} in the name: the names were not planned, so the
    other copy's crop was taken for the missing one's."""
    a = sw.photo("cam1/IMG.jpg", seed=1)
    (sw.src / "cam2").mkdir()
    (sw.src / "cam2" / "IMG.jpg").write_bytes(a.read_bytes())
    args = [sw.src / "cam1", sw.src / "cam2", "-o", sw.out, "--json", "--ratio", "1:1", "--size", "40x40",
            "--name", "{stem}_{w}x{h}.{ext}"]
    sw.run(*args)
    (sw.out / "IMG_40x40.jpg").unlink()
    res = sw.run(*args, "--skip-existing")
    sw.check(res, 0)
    assert [(Path(r["output"]).name, r.get("skipped")) for r in res.records] == \
        [("IMG_40x40.jpg", None), ("IMG_40x40-1.jpg", "exists")]


def test_a_crop_under_a_suffix_beats_a_users_file_under_its_name(sw):
    """The user's own picture at p0_16x9.jpg, the crop written as -1: --skip-existing reported the user's file
    as the crop."""
    sw.photo("p0.jpg")
    draw_photo(sw.out / "p0_16x9.jpg", seed=9)
    args = [sw.src, "-o", sw.out, "--json", "--ratio", "16:9"]
    sw.run(*args)
    res = sw.run(*args, "--skip-existing")
    sw.check(res, 0)
    assert [(Path(r["output"]).name, r.get("skipped")) for r in res.records] == [("p0_16x9-1.jpg", "exists")]


def test_the_namers_of_one_run_read_an_output_folder_once(tmp_path, monkeypatch):
    """The Ray engine makes a namer per photo: each read every marker of the output folder again (quadratic)."""
    from smartcrop import naming
    from smartcrop.inputs import InputItem

    out = tmp_path / "out"
    out.mkdir()
    for k in range(20):
        (out / f"x{k}.jpg").write_bytes(imageio.mark_output(imageio.encode_image(Image.new("RGB", (8, 8)), "jpg"),
                                                             imageio.source_tag(f"x{k}")))
    reads = []
    real = naming.output_source
    monkeypatch.setattr(naming, "output_source", lambda p: reads.append(p) or real(p))
    items = [InputItem(f"p{k}.jpg", tmp_path / f"p{k}.jpg", Path(""), f"p{k}", ".jpg") for k in range(10)]
    for it in items:  # one namer a photo, as in a Ray task
        naming.OutputNamer(out, "{stem}_{ratio}.{ext}", skip_existing=True, items=[it], run_id="run1") \
            .claim(it, "1:1", 1, "jpg", (8, 8))
    assert len(reads) == 20
    naming.OutputNamer(out, "{stem}_{ratio}.{ext}", skip_existing=True, items=items[:1], run_id="run2") \
        .claim(items[0], "1:1", 1, "jpg", (8, 8))
    assert len(reads) == 40  # another run reads it afresh


def test_a_crop_record_without_a_box_prints_dashes_in_a_dry_run_line():
    from smartcrop.runner import CropRecord

    out = io.StringIO()
    CropRecord("a.jpg", "o/a_1x1.jpg", "1:1", None, None, None, "exists").print(as_json=False, dry_run=True, out=out)
    assert out.getvalue() == "a.jpg\t1:1\t-\t-\n"


def test_same_named_photos_of_two_folders_are_each_made_again_when_their_crop_is_missing(sw):
    """Their crops' markers name the same input (IMG_0001.jpg under its folder): the other's crop is not taken
    for the missing one, whichever is missing."""
    _two_cameras(sw)
    args = [sw.src / "cam1", sw.src / "cam2", "-o", sw.out, "--json", "--ratio", "16:9"]
    sw.run(*args)
    (sw.out / "IMG_0001_16x9.jpg").unlink()
    res = sw.run(*args, "--skip-existing")
    sw.check(res, 0, done=["IMG_0001.jpg"])
    assert [(r.get("skipped"), Path(r["output"]).name) for r in res.records] == \
        [(None, "IMG_0001_16x9.jpg"), ("exists", "IMG_0001_16x9-1.jpg")]


def test_rerun_without_flags_never_replaces_and_overwrite_replaces_in_place(sw):
    _two_cameras(sw)
    args = [sw.src / "cam1", sw.src / "cam2", "-o", sw.out, "--json", "--ratio", "16:9"]
    sw.run(*args)
    res = sw.run(*args)
    sw.check(res, 0)
    assert sw.outputs() == ["IMG_0001_16x9-1.jpg", "IMG_0001_16x9-2.jpg", "IMG_0001_16x9-3.jpg",
                            "IMG_0001_16x9.jpg"]
    res = sw.run(*args, "--overwrite")
    sw.check(res, 0, changed=["out/IMG_0001_16x9.jpg", "out/IMG_0001_16x9-1.jpg"])
    assert len(sw.outputs()) == 4


def test_default_output_inside_a_recursive_tree_is_not_cropped_again(sw, monkeypatch):
    three(sw)
    sw.photo("sub/q.jpg")
    monkeypatch.chdir(sw.src)
    sw.run(".", "-r", "--ratio", "16:9", "--json")
    first = sorted(p for p in (sw.src / "cropped").rglob("*") if p.is_file())
    assert len(first) == 4
    res = sw.run(".", "-r", "--ratio", "16:9", "--json", "--skip-existing")
    assert res.code == 0 and len(res.records) == 4 and all(r["skipped"] == "exists" for r in res.records)
    assert sorted(p for p in (sw.src / "cropped").rglob("*") if p.is_file()) == first
    assert not (sw.src / "cropped" / "cropped").exists()


def test_output_folder_equal_to_the_input_folder_is_not_cropped_again(sw):
    three(sw)
    sw.run(sw.src, "-o", sw.src, "--ratio", "16:9", "--json")
    res = sw.run(sw.src, "-o", sw.src, "--ratio", "16:9", "--json")  # no flag: new names for the originals only
    assert res.code == 0 and sorted(Path(r["input"]).name for r in res.records) == ["p0.jpg", "p1.jpg", "p2.jpg"]
    names = sorted(p.name for p in sw.src.iterdir())
    assert names == ["p0.jpg", "p0_16x9-1.jpg", "p0_16x9.jpg", "p1.jpg", "p1_16x9-1.jpg", "p1_16x9.jpg", "p2.jpg",
                     "p2_16x9-1.jpg", "p2_16x9.jpg"]
    sw.assert_intact(outside=[f"in/p{k}_16x9-1.jpg" for k in range(3)])


def test_earlier_outputs_elsewhere_in_the_tree_are_recognised(sw):
    three(sw)
    sw.run(sw.src, "-o", sw.src / "crops1", "--ratio", "1:1")
    res = sw.run(sw.src, "-r", "-o", sw.out, "--ratio", "16:9", "--json")
    sw.check(res, 0, done=["p0.jpg", "p1.jpg", "p2.jpg"], lines=1)
    assert len(res.records) == 3
    assert res.lines[0].startswith("smartcrop: note: in the folders given, 3 files written by smartcrop: not ")
    # a folder holding nothing but earlier crops: why nothing is cropped, and how to crop them anyway
    res = sw.run(sw.src / "crops1", "-o", sw.out / "again", "--ratio", "16:9", "--json")
    assert res.code == 2 and len(res.lines) == 1
    assert "inputs: only 3 files written by smartcrop, which a folder" in res.lines[0]
    assert "-r" not in res.lines[0] and not (sw.out / "again").exists()


def test_a_preview_sheet_in_the_folder_is_passed_over_and_not_called_a_crop(sw):
    """A --preview contact sheet written into the photos' folder carries smartcrop's marker like a crop: the next
    run passes it over and counts it as a file smartcrop wrote, not as a crop."""
    three(sw)
    sw.run(sw.src, "-o", sw.out / "a", "--ratio", "1:1", "--preview", sw.src / "sheet.jpg")
    assert (sw.src / "sheet.jpg").is_file()
    res = sw.run(sw.src, "-o", sw.out / "b", "--ratio", "16:9", "--json")
    sw.check(res, 0, done=["p0.jpg", "p1.jpg", "p2.jpg"], lines=1)
    assert {Path(r["input"]).name for r in res.records} == {"p0.jpg", "p1.jpg", "p2.jpg"}
    assert res.lines == ["smartcrop: note: in the folders given, 1 file written by smartcrop: not cropped again "
                         "(name it as a file to crop it)"]


def test_an_explicitly_named_output_can_still_be_cropped(sw):
    three(sw)
    sw.run(sw.src / "p0.jpg", "-o", sw.src / "crops", "--ratio", "1:1")
    res = sw.run(sw.src / "crops" / "p0_1x1.jpg", "-o", sw.out, "--ratio", "1:1", "--json")
    sw.check(res, 0, done=["p0_1x1.jpg"])


def test_the_readmes_find_pipeline_can_be_run_again(sw, monkeypatch):
    """`find . -name '*.jpg' | smartcrop run -` a second time lists the first run's crops in ./cropped too: they
    are passed over with a note (the run was refused: "would replace the input"), for newline- and NUL-separated
    lists alike, and a run at another ratio does not crop them."""
    three(sw)
    monkeypatch.chdir(sw.src)

    def listed(sep: str) -> str:
        return "".join(f"./{p.relative_to(sw.src).as_posix()}{sep}" for p in sorted(sw.src.rglob("*.jpg")))

    sw.run("-", "--ratio", "3:2", "--json", stdin=listed("\n"))
    for sep in ("\n", "\0"):
        res = sw.run("-", "--ratio", "3:2", "--json", "--skip-existing", stdin=listed(sep))
        assert res.code == 0 and [r["skipped"] for r in res.records] == ["exists"] * 3, res.err
        assert res.lines == ["smartcrop: note: 3 files written by smartcrop in the output folder, never cropped "
                             "into it again (copy them elsewhere or give another -o to crop them)"]
    res = sw.run("-", "--ratio", "1:1", "--json", stdin=listed("\n"))
    assert res.code == 0 and sorted(Path(r["input"]).name for r in res.records) == ["p0.jpg", "p1.jpg", "p2.jpg"]
    assert sorted(p.name for p in (sw.src / "cropped").iterdir()) == \
        sorted(f"p{k}_{r}.jpg" for k in range(3) for r in ("3x2", "1x1"))


@pytest.mark.parametrize("data", [bytes(range(256)) * 20, b"\0" * 100_000, b"<svg>\n<rect/>\n</svg>\n",
                                  b"gone1.jpg\ngone2.jpg\n"])
def test_stdin_that_is_neither_an_image_nor_a_list_of_paths_is_one_line(sw, data):
    res = sw.run("-", "--ratio", "1:1", "-o", sw.out, stdin=data)
    assert res.code == 1 and len(res.lines) == 1, res.err
    assert res.lines[0].startswith("smartcrop: <stdin>: neither an image smartcrop reads nor a list of existing")
    assert len(res.lines[0]) < 200 and not sw.out.exists()


def test_a_list_whose_first_name_starts_like_a_bmp_is_a_list_and_a_bmp_on_stdin_an_image(sw, monkeypatch):
    sw.photo("BMW_0001.jpg")
    other = sw.photo("cat.jpg", seed=1)
    monkeypatch.chdir(sw.src)
    res = sw.run("-", "--ratio", "1:1", "-o", sw.out, "--json", stdin="BMW_0001.jpg\ncat.jpg\n")
    sw.check(res, 0, done=["BMW_0001.jpg", "cat.jpg"])
    buf = io.BytesIO()
    Image.open(other).save(buf, "BMP")
    res = sw.run("-", "--ratio", "1:1", "-o", sw.out, "--json", stdin=buf.getvalue())
    sw.check(res, 0)
    assert [r["input"] for r in res.records] == ["<stdin>"]


def test_a_utf16_list_is_read_and_binary_data_never_walks_the_current_folder(sw, monkeypatch):
    """PowerShell's `>` writes UTF-16 with a byte order mark: read as the list it is (its NUL bytes split it into
    junk, one piece "." — the current folder, walked and cropped whole). A PPM on stdin (not an input format)
    whose pixels hold a "." between NULs: one line, nothing cropped."""
    sw.photo("a.jpg")
    sw.photo("c.jpg", seed=1)
    monkeypatch.chdir(sw.src)
    res = sw.run("-", "--ratio", "1:1", "-o", sw.out, "--json", stdin="\ufeffa.jpg\r\n".encode("utf-16-le"))
    sw.check(res, 0, done=["a.jpg"])
    assert [r["input"] for r in res.records] == ["a.jpg"]
    ppm = Image.new("RGB", (16, 16))
    ppm.putpixel((5, 5), (46, 0, 0))
    buf = io.BytesIO()
    ppm.save(buf, "PPM")
    res = sw.run("-", "--ratio", "1:1", "-o", sw.root / "o2", stdin=buf.getvalue())
    assert res.code == 1 and len(res.lines) == 1 and "neither an image" in res.lines[0], res.err
    assert not (sw.root / "o2").exists()


def test_an_image_given_as_the_file_list_is_a_usage_error(sw):
    a = sw.photo("a.jpg")
    res = sw.run("--from-file", a, "-o", sw.out)
    sw.check(res, 2, failed=["an image, not a list of paths"], lines=1)


def test_a_nul_separated_list_keeps_names_whole(sw):
    odd = sw.photo("new\nline.jpg")
    res = sw.run("-", "--ratio", "1:1", "-o", sw.out, "--json", stdin=os.fsencode(odd) + b"\0")
    sw.check(res, 0)
    assert [r["input"] for r in res.records] == [str(odd)]


def test_links_to_folders_are_not_followed_under_r_and_say_so(sw, tmp_path):
    sw.photo("a.jpg")
    draw_photo(tmp_path / "elsewhere" / "e.jpg")
    (sw.src / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    res = sw.run(sw.src, "-r", "--ratio", "1:1", "-o", sw.out, "--json")
    sw.check(res, 0, lines=1)
    assert [Path(r["input"]).name for r in res.records] == ["a.jpg"]
    assert res.lines == [f"smartcrop: note: 1 symbolic link to folders not followed, {sw.src / 'linked'} (name a "
                         "linked folder to crop what it holds)"]


def test_same_file_given_twice_is_cropped_once(sw):
    a, *_ = three(sw)
    res = sw.run(a, a, sw.src, "-o", sw.out, "--json", "--ratio", "16:9")
    sw.check(res, 0, done=["p0.jpg"])
    assert len(res.records) == 3


# ---------------------------------------------------------------------------------- one file's failures


def test_nonexistent_file_among_others(sw):
    three(sw)
    res = sw.run(sw.src / "p0.jpg", sw.root / "nope.jpg", sw.src / "p1.jpg", "-o", sw.out, "--json")
    sw.check(res, 1, failed=["nope.jpg"], done=["p0.jpg", "p1.jpg"])


def test_only_a_nonexistent_file(sw):
    res = sw.run(sw.root / "nope.jpg", "-o", sw.out)
    sw.check(res, 1, failed=["nope.jpg"])
    assert not sw.out.exists()


def test_path_component_over_255_bytes(sw):
    three(sw)
    res = sw.run(sw.src / ("x" * 300 + ".jpg"), sw.src, "-o", sw.out, "--json")
    sw.check(res, 1, failed=["file name too long"], done=["p0.jpg", "p1.jpg", "p2.jpg"])


@pytest.mark.parametrize("length", [300, 5000])
def test_list_line_too_long(sw, length):
    three(sw)
    lst = sw.root / "list.txt"
    lst.write_text(f"{sw.src / 'p0.jpg'}\n{sw.src / ('y' * length)}.jpg\n{sw.src / 'p1.jpg'}\n")
    res = sw.run("--from-file", lst, "-o", sw.out, "--json")
    sw.check(res, 1, failed=["too long"], done=["p0.jpg", "p1.jpg"])


def test_list_line_with_a_nul_byte(sw):
    three(sw)
    lst = sw.root / "list.txt"
    lst.write_bytes(os.fsencode(f"{sw.src / 'p0.jpg'}\n") + b"bad\x00name.jpg\n")
    res = sw.run("--from-file", lst, "-o", sw.out, "--json")
    sw.check(res, 1, failed=["bad\\x00name.jpg"], done=["p0.jpg"])


def test_list_with_a_byte_order_mark_and_names_ending_in_spaces(sw):
    three(sw)
    sw.photo("q.jpg", seed=3).rename(sw.src / "p3.jpg ")  # a real name ending in a space; no p3.jpg
    sw.photo("p4.jpg", seed=4)
    lst = sw.root / "list.txt"
    lst.write_bytes(b"\xef\xbb\xbf" + os.fsencode(f"{sw.src / 'p0.jpg'}\r\n{sw.src / 'p3.jpg '}\n"
                                                     f"  {sw.src / 'p4.jpg'}  \n   \n"))
    res = sw.run("--from-file", lst, "-o", sw.out, "--json")
    sw.check(res, 0, done=["p0.jpg", "p3.jpg ", "p4.jpg"])
    assert sorted(Path(r["input"]).name for r in res.records) == ["p0.jpg", "p3.jpg ", "p4.jpg"]


def test_an_image_on_stdin_as_the_file_list_is_refused(sw):
    a, *_ = three(sw)
    res = sw.run("--from-file", "-", "-o", sw.out, stdin=a.read_bytes())
    sw.check(res, 2, failed=["holds an image"])
    assert not sw.out.exists()


def test_list_from_a_pipe_works(sw):
    three(sw)
    res = sw.run("-", "-o", sw.out, "--json", stdin=f"{sw.src / 'p0.jpg'}\n{sw.src / 'p2.jpg'}\n".encode())
    sw.check(res, 0, done=["p0.jpg", "p2.jpg"])


@pytest.mark.parametrize("where", ["argument", "in folder"])
def test_fifo_never_hangs(sw, where):
    three(sw)
    fifo = sw.src / "pipe.jpg"
    os.mkfifo(fifo)
    args = [fifo, sw.src / "p0.jpg"] if where == "argument" else [sw.src]
    res = sw.run(*args, "-o", sw.out, "--json", timeout=30)
    sw.check(res, 1, failed=["pipe.jpg: a FIFO"], done=["p0.jpg"])


def test_device_is_refused(sw):
    three(sw)
    res = sw.run("/dev/null", sw.src / "p0.jpg", "-o", sw.out, "--json")
    sw.check(res, 1, failed=["/dev/null: a device"], done=["p0.jpg"])


def test_socket_is_refused(sw):
    three(sw)
    s = socket.socket(socket.AF_UNIX)
    path = sw.src / "s.jpg"
    try:
        s.bind(str(path))
    except OSError as e:
        pytest.skip(f"cannot bind a unix socket here: {e}")
    try:
        res = sw.run(sw.src, "-o", sw.out, "--json")
    finally:
        s.close()
    sw.check(res, 1, failed=["s.jpg: a socket"], done=["p0.jpg"])


@pytest.mark.parametrize("where", ["argument", "in folder"])
def test_dangling_symlink(sw, where):
    three(sw)
    (sw.src / "gone.jpg").symlink_to(sw.root / "deleted.jpg")
    args = [sw.src / "gone.jpg", sw.src / "p1.jpg"] if where == "argument" else [sw.src]
    res = sw.run(*args, "-o", sw.out, "--json")
    sw.check(res, 1, failed=["gone.jpg: dangling symbolic link"], done=["p1.jpg"])


def test_symlink_loop(sw):
    three(sw)
    (sw.src / "loop.jpg").symlink_to(sw.src / "loop.jpg")
    res = sw.run(sw.src / "loop.jpg", sw.src, "-o", sw.out, "--json")
    sw.check(res, 1, failed=["loop.jpg: symbolic link loop"], lines=2, done=["p0.jpg"])  # given and walked


def _deny(monkeypatch, func: str, path: Path):
    """Permission bits do not stop root: make ``os.<func>`` fail with EACCES for ``path`` instead."""
    real = getattr(os, func)
    target = os.fspath(path)

    def denied(p, *a, **k):
        if os.fspath(p) == target:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(p))
        return real(p, *a, **k)

    monkeypatch.setattr(os, func, denied)


def test_unreadable_folder_argument(sw, monkeypatch):
    three(sw)
    locked = sw.root / "locked"
    draw_photo(locked / "x.jpg")
    _deny(monkeypatch, "scandir", locked)
    res = sw.run(locked, sw.src, "-o", sw.out, "--json")
    sw.check(res, 1, failed=["locked: cannot read folder (permission denied)"], done=["p0.jpg", "p1.jpg"])


def test_unreadable_subfolder_under_recursive(sw, monkeypatch):
    three(sw)
    sw.photo("deep/x.jpg")
    _deny(monkeypatch, "scandir", sw.src / "deep")
    res = sw.run(sw.src, "-r", "-o", sw.out, "--json")
    sw.check(res, 1, failed=["deep: cannot read folder"], done=["p0.jpg", "p1.jpg", "p2.jpg"])


def test_listed_path_in_a_locked_folder(sw, monkeypatch):
    three(sw)
    hidden = sw.root / "locked" / "x.jpg"
    draw_photo(hidden)
    _deny(monkeypatch, "stat", hidden)
    lst = sw.root / "list.txt"
    lst.write_text(f"{hidden}\n{sw.src / 'p0.jpg'}\n")
    res = sw.run("--from-file", lst, "-o", sw.out, "--json")
    sw.check(res, 1, failed=["x.jpg: permission denied"], done=["p0.jpg"])


def test_real_permission_bits_when_not_root(sw):
    if os.geteuid() == 0:
        pytest.skip("running as root: permission bits do not stop reads (simulated by the EACCES tests above)")
    three(sw)
    locked = sw.root / "locked"
    draw_photo(locked / "x.jpg")
    locked.chmod(0)
    try:
        res = sw.run(locked, locked / "x.jpg", sw.src, "-o", sw.out, "--json")
    finally:
        locked.chmod(0o755)
    sw.check(res, 1, failed=["locked"], lines=2, done=["p0.jpg"])


def test_input_named_dots_with_a_stem_folder_template(sw):
    three(sw)
    dots = sw.src / "...jpg"
    dots.write_bytes((sw.src / "p0.jpg").read_bytes())
    res = sw.run(dots, sw.src, "-o", sw.out, "--json", "--name", "{stem}/{ratio}.{ext}", "--ratio", "16:9")
    sw.check(res, 1, failed=["...jpg"], done=["p0.jpg", "p1.jpg", "p2.jpg"])
    assert "leave the output folder" in res.err


@pytest.mark.parametrize("template", ["{stem:d}.jpg", "{stem!z}.jpg", "{stem", "{}.jpg", "{0}.jpg",
                                      "{stem.__class__}.jpg", "{stem[0]}.jpg", "{stem}", "{stem}.txt",
                                      "x" * 300 + "{stem}.jpg", "../{stem}.jpg", "/tmp/{stem}.jpg", "{stem}/",
                                      "{rank:>999999999999}.jpg"])
def test_bad_templates_are_usage_errors_before_any_work(sw, template):
    three(sw)
    res = sw.run(sw.src, "-o", sw.out, "--name", template)
    sw.check(res, 2, lines=1)
    assert "template" in res.err and not sw.out.exists()


@pytest.mark.parametrize("template", ["{stem}/", "{stem}/.", "crops/{stem}_{ratio}/"])
def test_a_template_that_names_a_folder_says_so(sw, template):
    three(sw)
    res = sw.run(sw.src, "-o", sw.out, "--name", template)
    sw.check(res, 2, lines=1)
    assert "names a folder, not a file" in res.err and "outside" not in res.err and not sw.out.exists()


@pytest.mark.parametrize("args, words", [
    (["--ratio", "16:9", "--ratio", "1:1", "--name", "{stem}.{ext}"], "ratios 16:9 and 1:1 one name"),
    (["--top-k", "2", "--name", "{stem}_{ratio}.{ext}"], "the 2 best crops one name"),
    # the field is there, but renders the same for every ratio or rank: the first run named the second crop
    # b-1.jpg, and a --skip-existing re-run took b.jpg for both (the 16:9 crop never made again)
    (["--ratio", "1:1", "--ratio", "16:9", "--name", "{stem}{ratio:.0}.{ext}"], "ratios 1:1 and 16:9 one name"),
    (["--ratio", "16:9", "--ratio", "16:10", "--name", "{stem}_{ratio:.2}.{ext}"], "ratios 16:9 and 16:10 one name"),
    (["--top-k", "12", "--name", "{stem}_{rank!s:.1}.{ext}"], "the 12 best crops one name")])  # 1 and 10
def test_templates_that_merge_crops_are_refused(sw, args, words):
    three(sw)
    res = sw.run(sw.src, "-o", sw.out, *args)
    sw.check(res, 2, lines=1)
    assert words in res.err and not sw.out.exists(), res.err


@pytest.mark.parametrize("ratio,code", [("11:1", 2), ("1:11", 2), ("10.5", 2), ("10:1", 0), ("1:10", 0)])
def test_ratio_limit(sw, ratio, code):
    sw.photo("wide.jpg", size=(400, 400))
    res = sw.run(sw.src, "-o", sw.out, "--ratio", ratio, "--json")
    sw.check(res, code, lines=1 if code else 0, done=[] if code else ["wide.jpg"])


def test_broken_files_among_good_ones(sw):
    three(sw)
    (sw.src / "empty.jpg").write_bytes(b"")
    (sw.src / "text.jpg").write_text("not a photo\n")
    good = (sw.src / "p0.jpg").read_bytes()
    (sw.src / "cut.jpg").write_bytes(good[: len(good) // 2])
    res = sw.run(sw.src, "-o", sw.out, "--json")
    sw.check(res, 1, failed=["empty.jpg", "text.jpg", "cut.jpg"], done=["p0.jpg", "p1.jpg", "p2.jpg"])


def test_bad_inputs_with_worker_processes(sw):
    """The same guarantees through the default process pool (the other cases run in-process, ``-j 1``)."""
    three(sw)
    (sw.src / "text.jpg").write_text("not a photo\n")
    os.mkfifo(sw.src / "pipe.jpg")
    res = sw.run(sw.src, sw.root / "nope.jpg", "-o", sw.out, "--json", "-j", "2", jobs=False, timeout=60)
    sw.check(res, 1, failed=["text.jpg", "pipe.jpg", "nope.jpg"], done=["p0.jpg", "p1.jpg", "p2.jpg"])


@pytest.mark.parametrize("jobs", [True, False])
def test_a_run_that_writes_nothing_leaves_no_output_folder_it_made(sw, jobs):
    """Every photo fails: the folders the run created for -o are removed again; one that existed stays."""
    for k in range(2):
        (sw.src / f"bad{k}.jpg").write_bytes(b"\xff\xd8 not a photo")
    extra = [] if jobs else ["-j", "2"]
    res = sw.run(sw.src, "-o", sw.out / "a" / "b", "--json", *extra, jobs=jobs)
    sw.check(res, 1, failed=["bad0.jpg", "bad1.jpg"])
    assert not sw.out.exists()
    sw.out.mkdir()
    res = sw.run(sw.src, "-o", sw.out, "--json", *extra, jobs=jobs)
    sw.check(res, 1, failed=["bad0.jpg", "bad1.jpg"])
    assert sw.out.is_dir() and not list(sw.out.iterdir())
    sw.photo("good.jpg")
    res = sw.run(sw.src, "-o", sw.out / "a" / "b", "--json", *extra, jobs=jobs)
    sw.check(res, 1, failed=["bad0.jpg", "bad1.jpg"], done=["good.jpg"])
    assert [p.name for p in (sw.out / "a" / "b").iterdir()] == ["good_any.jpg"]


def test_crop_smaller_than_16_pixels_fails_that_file(sw):
    three(sw)
    Image.new("RGB", (12, 40), (200, 100, 50)).save(sw.src / "sliver.png")
    res = sw.run(sw.src, "-o", sw.out, "--json", "--ratio", "1:1")
    sw.check(res, 1, failed=["sliver.png"], done=["p0.jpg"])
    assert "16" in res.err


def test_size_never_upscales_unless_asked(sw):
    three(sw)
    res = sw.run(sw.src, "-o", sw.out, "--json", "--size", "320x180")
    sw.check(res, 1, failed=["p0.jpg", "p1.jpg", "p2.jpg"])
    assert "--upscale" in res.err
    res = sw.run(sw.src, "-o", sw.out, "--json", "--size", "320x180", "--upscale")
    sw.check(res, 0, done=["p0.jpg", "p1.jpg", "p2.jpg"])
    assert all(Image.open(r["output"]).size == (320, 180) for r in res.records)


def test_an_output_folder_or_file_that_cannot_be_made_is_said_as_the_outputs_fault(sw, monkeypatch):
    """A name template's sub-folder on a full disk said "No space left on device: out/p1" (raw), a read-only
    output "Read-only file system: out/p2_1x1.jpg": now "cannot write …" as every other output failure, the
    full disk as write_file says it; the other photos are cropped."""
    import pathlib

    import smartcrop.imageio as imageio

    three(sw)
    real_mkdir, real_write = pathlib.Path.mkdir, imageio.write_file

    def mkdir(self, *a, **k):
        if self.name == "p1":
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_mkdir(self, *a, **k)

    def write_file(path, *a, **k):
        if Path(path).parent.name == "p2":
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_write(path, *a, **k)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    monkeypatch.setattr(imageio, "write_file", write_file)
    res = sw.run(sw.src, "-o", sw.out, "--ratio", "1:1", "--name", "{stem}/{ratio}.{ext}", "--json")
    sw.check(res, 1, failed=["p1.jpg", "p2.jpg"], done=["p0.jpg"])
    one = sw.out / "p1" / "1x1.jpg"
    assert f"p1.jpg: cannot write {one}: the output disk is full (No space left on device)" in res.lines[0]
    assert f"p2.jpg: cannot write {sw.out / 'p2' / '1x1.jpg'} (Read-only file system)" in res.lines[1]


def test_out_of_memory_while_decoding_fails_that_photo(sw, monkeypatch):
    three(sw)
    import smartcrop.runner as runner

    real = runner.prepare

    def prepare(source, *a):
        if str(source).endswith("p1.jpg"):
            raise MemoryError()
        return real(source, *a)

    monkeypatch.setattr(runner, "prepare", prepare)
    res = sw.run(sw.src, "-o", sw.out, "--json")
    sw.check(res, 1, failed=["p1.jpg"], done=["p0.jpg", "p2.jpg"])


def test_out_of_memory_while_scoring_fails_that_photo(sw, monkeypatch):
    three(sw)
    sw.photo("huge.jpg", size=(100, 70))
    from smartcrop.cropper import Cropper

    real = Cropper.best_crops_batch

    def scored(self, images, *a, **k):
        if any(tuple(size) == (100, 70) for _, size in images):
            raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 4294967296 bytes")
        return real(self, images, *a, **k)

    monkeypatch.setattr(Cropper, "best_crops_batch", scored)
    res = sw.run(sw.src, "-o", sw.out, "--json", "--batch", "4")
    sw.check(res, 1, failed=["huge.jpg"], done=["p0.jpg", "p1.jpg", "p2.jpg"])
    assert res.lines[0].endswith("huge.jpg: out of memory while scoring this photo"), res.lines


@pytest.mark.parametrize("error", ["MemoryError()", "RuntimeError('std::bad_alloc')",
                                   "RuntimeError(\"[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
                                   "can't allocate memory: you tried to allocate 4718592 bytes\")"])
def test_out_of_memory_before_any_photo_is_one_line_not_a_traceback(error):
    """Under a memory limit (`ulimit -v`) importing torch or loading the model failed with a 50-line traceback:
    now one line, exit 1.  Another RuntimeError still shows its traceback (a bug to report)."""
    code = ("import sys, smartcrop.cli as cli\n"
            "def boom(*a, **k):\n    raise ERROR\n"
            "cli.app = boom\ncli.main()\n")
    r = subprocess.run([sys.executable, "-c", code.replace("ERROR", error)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and r.stderr.splitlines() == [
        "smartcrop: out of memory: stopped (files already written are complete; fewer jobs, -j, need less)"], r.stderr
    r = subprocess.run([sys.executable, "-c", code.replace("ERROR", "RuntimeError('a bug')")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and "Traceback" in r.stderr and "a bug" in r.stderr


def test_control_characters_in_names_are_escaped(sw):
    three(sw)
    evil = "evil\x1b[31m\nsmartcrop: all good\u202e.jpg"
    (sw.src / evil).write_text("not a photo")
    res = sw.run(sw.src, "-o", sw.out, "--json")
    sw.check(res, 1, failed=["evil\\x1b[31m\\x0asmartcrop: all good\\u202e.jpg"], done=["p0.jpg"])
    assert "\x1b" not in res.err and "\u202e" not in res.err


def test_control_characters_in_dry_run_lines_are_escaped(sw):
    sw.photo("tab\there.jpg")
    res = sw.run(sw.src, "--dry-run", "-o", sw.out)
    assert res.code == 0 and res.out.decode().count("\t") == 3 and "tab\\x09here.jpg" in res.out.decode()
    sw.assert_intact()


def test_undecodable_file_name_is_cropped(sw):
    three(sw)
    raw = os.path.join(os.fsencode(sw.src), b"caf\xe9.jpg")
    with open(raw, "wb") as f:
        f.write((sw.src / "p0.jpg").read_bytes())
    res = sw.run(sw.src, "-o", sw.out, "--json", "--ratio", "16:9")
    sw.check(res, 0, done=["p0.jpg"])
    assert os.path.exists(os.path.join(os.fsencode(sw.out), b"caf\xe9_16x9.jpg"))


def test_output_folder_that_is_a_file(sw):
    three(sw)
    (sw.root / "afile").write_text("x")
    res = sw.run(sw.src, "-o", sw.root / "afile")
    sw.check(res, 2, failed=["afile"])


def test_empty_folder(sw):
    res = sw.run(sw.src, "-o", sw.out)
    sw.check(res, 2, lines=1)
    assert "no image files" in res.err


def test_overwrite_and_skip_existing_together(sw):
    three(sw)
    sw.check(sw.run(sw.src, "--overwrite", "--skip-existing", "-o", sw.out), 2, lines=1)


def test_stdin_image_with_several_crops_needs_an_output_folder(sw):
    a, *_ = three(sw)
    res = sw.run("-", "--ratio", "16:9", "--ratio", "1:1", stdin=a.read_bytes())
    sw.check(res, 2, lines=1)
    assert res.out == b""


def _cli(args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from smartcrop.cli import main; main()", *args], cwd=ROOT,
                          capture_output=True, timeout=120, **kw)


def test_the_real_command_exits_at_once_with_every_byte_and_its_exit_code(sw):
    """main() leaves through os._exit once torch is loaded (no slow interpreter shutdown): what a pipeline reads
    must still be whole — the image on stdout, every JSON line, each error line — and the exit code kept."""
    a, b, _ = three(sw)
    (sw.src / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    r = _cli(["run", "-", "--ratio", "16:9", "--weights", str(sw.model)], input=a.read_bytes())
    assert r.returncode == 0 and r.stderr == b""
    out = sw.root / "folder"
    r2 = _cli(["run", str(a), "--ratio", "16:9", "--weights", str(sw.model), "-o", str(out)])
    assert r2.returncode == 0
    with Image.open(io.BytesIO(r.stdout)) as got, Image.open(out / "p0_16x9.jpg") as want:
        got.load()  # a truncated JPEG fails here
        assert got.size == want.size and r.stdout.endswith(b"\xff\xd9")
    r3 = _cli(["run", str(sw.src), "--ratio", "1:1", "--json", "--weights", str(sw.model), "-o", str(sw.root / "j")])
    assert r3.returncode == 1
    records = [json.loads(ln) for ln in r3.stdout.decode().splitlines()]
    assert sorted(Path(rec["input"]).name for rec in records) == ["p0.jpg", "p1.jpg", "p2.jpg"]
    assert all(Path(rec["output"]).is_file() for rec in records)
    assert len(r3.stderr.splitlines()) == 1 and b"bad.jpg" in r3.stderr


def _open_files_limit(soft: int, hard: int):
    def limit():
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return limit


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX resource limits")
def test_a_low_open_files_limit_runs_fewer_workers_with_a_note_instead_of_hanging(sw):
    """`ulimit -n 16` (soft and hard) with `-j 2`: the worker pool failed to start (a traceback: "Too many open
    files"), then the process waited for ever.  The pool now takes as many workers as the limit holds, here none
    beside the main process, and says so in one note; with only the soft limit low, it is raised instead."""
    three(sw)
    args = ["run", str(sw.src), "--ratio", "1:1", "-j", "2", "--json", "--weights", str(sw.model)]
    r = _cli([*args, "-o", str(sw.out / "a")], preexec_fn=_open_files_limit(16, 16))
    assert r.returncode == 0, r.stderr
    assert r.stderr.decode().splitlines() == ["smartcrop: note: -j 1 instead of 2: the open-files limit (ulimit -n) "
                                              "holds no more; raise it to 40 for -j 2"]
    assert len(r.stdout.splitlines()) == 3 and len(list((sw.out / "a").iterdir())) == 3
    r = _cli([*args, "-o", str(sw.out / "b")], preexec_fn=_open_files_limit(16, 4096))
    assert r.returncode == 0 and r.stderr == b"" and len(list((sw.out / "b").iterdir())) == 3


def test_workers_fit_the_open_files_limit():
    """How many workers a limit holds (in a child process: the limit is its own)."""
    code = """
import resource
from smartcrop.pool import FILES_BASE, FILES_PER_WORKER, workers_for_open_files
need = lambda j: FILES_BASE + FILES_PER_WORKER * j
resource.setrlimit(resource.RLIMIT_NOFILE, (10, need(8) + 5))  # the soft limit alone too low: raised
print(workers_for_open_files(8), resource.getrlimit(resource.RLIMIT_NOFILE)[0] == need(8))
resource.setrlimit(resource.RLIMIT_NOFILE, (need(3), need(3)))
print(workers_for_open_files(2), workers_for_open_files(3), workers_for_open_files(8), workers_for_open_files(1))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["8", "True", "2", "3", "3", "1"], r.stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (a stdout whose disk is full)")
@pytest.mark.parametrize("args", [["--json"], ["--dry-run"], ["-"]])
def test_stdout_that_cannot_be_written_stops_the_run_with_one_line(sw, args):
    """JSON lines, dry-run lines or an image to a full stdout: one line naming standard output, exit 1 (as a
    failed write gives elsewhere; 2 is for refused requests), no traceback, every file written is complete and
    no temporary file is left."""
    a, *_ = three(sw)
    out = sw.root / "o"
    cmd = ["run", *(["-"] if args == ["-"] else [str(sw.src), *args, "-o", str(out)]), "--ratio", "16:9",
           "--weights", str(sw.model)]
    with open("/dev/full", "wb") as full, open(a, "rb") as stdin:
        r = subprocess.run([sys.executable, "-c", "from smartcrop.cli import main; main()", *cmd], stdout=full,
                           stdin=stdin, stderr=subprocess.PIPE, cwd=ROOT, timeout=120)
    assert r.returncode == 1, r.stderr
    assert r.stderr.decode().splitlines() == [
        "smartcrop: cannot write to standard output (No space left on device): stopped; the files already "
        "written are complete"]
    for f in out.rglob("*") if out.exists() else []:
        assert not f.name.startswith(".smartcrop-")
        with Image.open(f) as im:
            im.load()


def test_an_image_to_a_reader_that_stops_early_is_one_line_and_exit_1(sw):
    """``smartcrop run - < big.jpg | head -c 10``: the write that the pipe took only part of was ignored, so
    the run passed a cut image on with exit 0 and no word (a crop larger than the pipe's 64 KiB buffer)."""
    rng = np.random.default_rng(0)
    big = sw.root / "noise.jpg"
    Image.fromarray((rng.random((400, 400, 3)) * 255).astype(np.uint8)).save(big, quality=100)
    with open(big, "rb") as stdin:
        p = subprocess.Popen([sys.executable, "-c", "from smartcrop.cli import main; main()", "run", "-", "-j", "1",
                              "--ratio", "1:1", "--weights", str(sw.model)], stdin=stdin, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, cwd=ROOT)
        assert len(p.stdout.read(10)) == 10
        p.stdout.close()  # the reader stops, as `head -c 10` does
        err = p.stderr.read().decode()
        assert p.wait(timeout=120) == 1, err
    assert err.splitlines() == ["smartcrop: cannot write to standard output (Broken pipe): stopped; the files "
                                "already written are complete"]


def test_stdout_that_is_the_input_file_is_refused(sw):
    """``smartcrop run - < a.jpg 1<> a.jpg`` (stdout opened on the input without truncating it) would write the
    crop over the original: refused in one line, exit 2, the photo unchanged."""
    a, *_ = three(sw)
    before = sha(a)
    with open(a, "rb") as stdin, open(a, "r+b") as stdout:
        r = subprocess.run([sys.executable, "-c", "from smartcrop.cli import main; main()", "run", "-", "--ratio",
                            "1:1", "--weights", str(sw.model)], stdin=stdin, stdout=stdout, stderr=subprocess.PIPE,
                           cwd=ROOT, timeout=120)
    assert r.returncode == 2 and b"input image itself" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    assert sha(a) == before


@pytest.mark.parametrize("args, code, words", [
    (["-"], 2, "standard output is closed: give an output folder"),
    (["IN", "--json", "-o", "OUT"], 1, "cannot write to standard output (closed): stopped"),
])
def test_closed_stdout_is_one_line_not_a_traceback(sw, args, code, words):
    """Started with file descriptor 1 closed (``>&-``): an image for stdout is refused before any work, JSON lines
    stop the run at the first line; one line either way, and every file written is complete."""
    a, *_ = three(sw)
    cmd = [str(sw.src) if x == "IN" else str(sw.out) if x == "OUT" else x for x in args]
    with open(a, "rb") as stdin:
        r = subprocess.run([sys.executable, "-c", "from smartcrop.cli import main; main()", "run", *cmd, "--ratio",
                            "1:1", "--weights", str(sw.model)], stdin=stdin, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, cwd=ROOT, timeout=120, preexec_fn=lambda: os.close(1))
    lines = r.stderr.decode().splitlines()
    assert r.returncode == code and len(lines) == 1 and words in lines[0], lines
    for f in sw.out.rglob("*") if sw.out.exists() else []:
        with Image.open(f) as im:
            im.load()


@pytest.mark.parametrize("args", [["--help"], ["models"]])
def test_help_and_tables_to_a_closed_or_full_stdout_are_one_line(args):
    """Not only `run`'s lines: help or a table that standard output cannot take is one line and exit 1."""
    cmd = [sys.executable, "-c", "from smartcrop.cli import main; main()", *args]
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT, timeout=120,
                       preexec_fn=lambda: os.close(1))
    assert r.returncode == 1 and r.stderr.decode().splitlines() == [
        "smartcrop: cannot write to standard output (closed)"], r.stderr
    if os.path.exists("/dev/full"):
        with open("/dev/full", "wb") as full:
            r = subprocess.run(cmd, stdout=full, stderr=subprocess.PIPE, cwd=ROOT, timeout=120)
        assert r.returncode == 1 and r.stderr.decode().splitlines() == [
            "smartcrop: cannot write (No space left on device)"], r.stderr


def test_help_shows_the_extras_to_install():
    """Rich markup must not swallow the extras' names in brackets."""
    r = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "400"})
    assert r.exit_code == 0 and "pip install 'opencv-python-headless<5'" in r.stdout and "'ray[data]>=2.40'" in r.stdout


@pytest.mark.parametrize("data", [b"", b"\n \n"])
def test_an_empty_stdin_is_an_empty_list_not_a_broken_image(sw, data):
    """`find . -name '*.jpg' | smartcrop run -` where find matched nothing: said as an empty folder is ("no image
    files found", exit 2, nothing made), not as a broken image on stdin (it was "<stdin>: empty file", exit 1);
    beside other inputs they are cropped."""
    three(sw)
    for flags in (["-"], ["--from-file", "-"]):
        res = sw.run(*flags, "--ratio", "1:1", "-o", sw.out, stdin=data)
        sw.check(res, 2, lines=1)
        assert "no image files found in the inputs: standard input is empty" in res.err and not sw.out.exists()
    res = sw.run("-", sw.src / "p0.jpg", "--ratio", "1:1", "-o", sw.out, "--json", stdin=data)
    sw.check(res, 0, done=["p0.jpg"])
    assert len(res.records) == 1


def test_bad_sizes_ratios_and_repeated_stdin_are_usage_errors(sw):
    """A --size whose ratio is out of range, a ratio with '_' or '/' in a plain number (it would become a sub-folder
    in the output name) and '-' twice: exit 2, one line each, nothing written."""
    three(sw)
    for args, words in ((["--size", "11x1"], "output size 11x1"), (["--size", "1x65535"], "between 1:10"),
                        (["--ratio", "2_0/1_0"], "bad aspect ratio"), (["--ratio", "1e3"], "bad aspect ratio")):
        res = sw.run(sw.src, *args, "-o", sw.out)
        sw.check(res, 2, lines=1)
        assert words in res.err and sw.outputs() == [], res.err
    res = sw.run("-", "-", stdin=b"")
    assert res.code == 2 and "'-' (stdin) can be given once" in res.err
    res = sw.run(sw.src, "--ratio", "1.5", "--json", "-o", sw.out)  # a plain decimal number stays a ratio
    sw.check(res, 0)
    assert {r["ratio"] for r in res.records} == {"1.5"}
    assert {Path(r["output"]).parent for r in res.records} == {sw.out}


def test_deep_sources_get_a_note_with_their_own_depth(sw):
    """A 32-bit float TIFF is cropped in 8 bits and the note says 32-bit (not '16-bit colour')."""
    Image.fromarray((np.random.default_rng(0).random((64, 96)) * 0.8).astype(np.float32), "F").save(
        sw.src / "deep.tif")
    res = sw.run(sw.src, "--ratio", "1:1", "-o", sw.out)
    sw.check(res, 0, lines=1)
    assert res.lines == [f"smartcrop: {sw.src / 'deep.tif'}: note: 32-bit samples reduced to 8 bits in the crops"]


@pytest.mark.parametrize("fmt, reduced", [("png", False), ("tif", False), ("jpg", True), ("webp", True)])
def test_sixteen_bit_grayscale_gets_the_note_where_its_crops_lose_the_depth(sw, fmt, reduced):
    """16-bit grayscale keeps its depth in PNG and TIFF crops; written as JPEG or WebP it lost it without the note
    every other deep source gets."""
    a = (np.arange(64 * 96).reshape(64, 96) * 10 % 65536).astype(np.uint16)
    Image.fromarray(a).save(sw.src / "gray16.png")
    res = sw.run(sw.src, "--ratio", "1:1", "--format", fmt, "--json", "-o", sw.out)
    sw.check(res, 0, lines=int(reduced))
    note = f"smartcrop: {sw.src / 'gray16.png'}: note: 16-bit samples reduced to 8 bits in the crops"
    assert res.lines == ([note] if reduced else [])
    with Image.open(res.records[0]["output"]) as out:
        assert (out.mode in ("L", "RGB")) == reduced


def test_image_to_a_terminal_is_refused(sw):
    pty = pytest.importorskip("pty")
    a, *_ = three(sw)
    master, slave = pty.openpty()
    try:
        with open(a, "rb") as f:
            r = subprocess.run([sys.executable, "-c", "from smartcrop.cli import main; main()", "run", "-",
                                "--weights", str(sw.model)], stdin=f, stdout=slave, stderr=subprocess.PIPE,
                               cwd=ROOT, timeout=120)
    finally:
        os.close(slave)
        os.close(master)
    assert r.returncode == 2 and b"terminal" in r.stderr and len(r.stderr.splitlines()) == 1


@pytest.mark.parametrize("flags", [["--json"], ["--dry-run"]])
def test_records_stay_on_a_redirected_stdout_while_the_bar_shows_on_a_terminal(sw, flags):
    """stderr a terminal (the progress bar shows), stdout redirected: every record reaches stdout (rich used to
    send stdout into the bar's console on stderr, leaving `--json > out.jsonl` empty)."""
    import threading

    pty = pytest.importorskip("pty")
    three(sw)
    master, slave = pty.openpty()
    shown = bytearray()
    reader = threading.Thread(target=lambda: _drain(master, shown), daemon=True)
    reader.start()
    try:
        r = subprocess.run([sys.executable, "-c", "from smartcrop.cli import main; main()", "run", str(sw.src),
                            "--ratio", "1:1", "-o", str(sw.out), "-j", "1", "--weights", str(sw.model), *flags],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, cwd=ROOT, timeout=120)
    finally:
        os.close(slave)
        reader.join(timeout=10)
        os.close(master)
    assert r.returncode == 0, bytes(shown)
    lines = r.stdout.decode().splitlines()
    assert len(lines) == 3 and [any(f"p{k}.jpg" in ln for ln in lines) for k in range(3)] == [True] * 3, r.stdout
    if flags == ["--json"]:
        assert sorted(Path(json.loads(ln)["input"]).name for ln in lines) == ["p0.jpg", "p1.jpg", "p2.jpg"]
    assert b"p0.jpg" not in bytes(shown)  # nothing of the records drawn on the terminal


def _drain(fd: int, into: bytearray) -> None:
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the other end closed
            return
        if not chunk:
            return
        into += chunk


def test_stdin_from_a_terminal_is_refused(sw):
    pty = pytest.importorskip("pty")
    master, slave = pty.openpty()
    try:
        r = subprocess.run([sys.executable, "-c", "from smartcrop.cli import main; main()", "run", "-",
                            "--weights", str(sw.model)], stdin=slave, capture_output=True, cwd=ROOT, timeout=120)
    finally:
        os.close(slave)
        os.close(master)
    assert r.returncode == 2 and b"terminal" in r.stderr


# ---------------------------------------------------------------------------------------------- the CLI


def test_version():
    from smartcrop import __version__

    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout.strip() == f"smartcrop {__version__}"


def test_help_shows_plain_flags_and_describes_every_option():
    import click
    import typer

    for args in (["--help"], ["run", "--help"], ["train", "--help"], ["finetune", "--help"]):
        r = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
        assert r.exit_code == 0 and "<bool>" not in r.stdout, args

    def walk(cmd, path):
        for p in cmd.params:
            if isinstance(p, click.Option):
                assert (p.help or "").strip(), f"{path} {p.opts[0]} has no help"
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, f"{path} {name}")

    walk(typer.main.get_command(app), "smartcrop")


def test_marker_survives_every_output_format(tmp_path):
    img = Image.new("RGBA", (40, 30), (200, 10, 10, 128))
    for ext in ["jpg", "png", "webp", "tif"] + (["avif"] if imageio._pillow_has_avif() else []):
        p = imageio.save_image(img, tmp_path / f"o.{ext}")
        assert imageio.written_by_smartcrop(p)
        with Image.open(p) as im:
            im.load()
            assert im.size == (40, 30)
        q = tmp_path / f"plain.{ext}"
        q.write_bytes(imageio.encode_image(img, ext))
        assert not imageio.written_by_smartcrop(q)


def test_a_crops_marker_names_its_input_by_a_tag_in_every_output_format(tmp_path):
    img = Image.new("RGBA", (40, 30), (200, 10, 10, 128))
    tag = imageio.source_tag("sub/IMG_0001.jpg")
    assert len(tag) == 12 and tag != imageio.source_tag("sub/IMG_0001.jpeg") and b"IMG" not in tag
    for ext in ["jpg", "png", "webp", "tif"] + (["avif"] if imageio._pillow_has_avif() else []):
        data = imageio.encode_image(img, ext)
        p = imageio.write_file(tmp_path / f"o.{ext}", data, source=tag)
        assert imageio.written_by_smartcrop(p) and imageio.output_source(p) == tag, ext
        with Image.open(p) as im:
            im.load()
            assert im.size == (40, 30)
        old = imageio.write_file(tmp_path / f"old.{ext}", data)  # as earlier versions marked: no tag
        assert imageio.written_by_smartcrop(old) and imageio.output_source(old) is None, ext


def test_a_crop_of_a_crop_is_marked_with_its_own_input_only(tmp_path):
    """A JPEG crop keeps its source's comments (losslessly cut, or re-encoded by Pillow, which writes the comment
    it read back): the marker of the crop it was cut from must not stay in front of its own."""
    first = imageio.mark_output(imageio.encode_image(Image.new("RGB", (64, 48), (9, 99, 9)), "jpg"),
                                imageio.source_tag("a.jpg"))
    again = imageio.mark_output(first, imageio.source_tag("a_1x1.jpg"))
    assert again.count(imageio.OUTPUT_MARKER) == 1
    p = tmp_path / "c.jpg"
    p.write_bytes(again)
    assert imageio.output_source(p) == imageio.source_tag("a_1x1.jpg")
    with Image.open(p) as im:
        im.load()
        assert im.size == (64, 48)
    assert imageio.mark_output(again, imageio.source_tag("a_1x1.jpg")) == again


def test_remarking_a_jpeg_replaces_only_the_old_marker_comment():
    """The first version dropped the two bytes after SOI (the first APPn's marker) with the old comment: a
    camera JPEG (Exif first, with a thumbnail) cropped twice would not decode."""
    plain = imageio.encode_image(Image.new("RGB", (64, 48), (9, 99, 9)), "jpg")
    app1 = imageio._jpeg_segment(0xE1, b"Exif\x00\x00" + b"\x11" * 300)
    exif_first = plain[:2] + app1 + plain[2:]
    for data in (plain, exif_first):
        a, b = imageio.source_tag("a.jpg"), imageio.source_tag("a_1x1.jpg")
        first = imageio.mark_output(data, a)
        again = imageio.mark_output(first, b)
        com = lambda tag: imageio._jpeg_segment(0xFE, imageio.OUTPUT_MARKER + b" from " + tag)  # noqa: E731
        assert first.count(com(a)) == 1 and again == first.replace(com(a), com(b))
        with Image.open(io.BytesIO(again)) as im:
            im.load()


def test_a_marker_starting_near_the_end_of_the_first_4_kib_is_read_whole(tmp_path):
    """A comment starting a few bytes before 4096 (after a 4 KiB Exif) was read cut at 4096: untagged."""
    plain = imageio.encode_image(Image.new("RGB", (64, 48), (9, 99, 9)), "jpg")
    tag = imageio.source_tag("b.jpg")

    def marked(n: int) -> bytes:
        app1 = imageio._jpeg_segment(0xE1, b"Exif\x00\x00" + b"x" * n)
        return imageio.mark_output(plain[:2] + app1 + plain[2:], tag)

    base = marked(0).index(imageio.OUTPUT_MARKER)
    for start in (4050, 4070, 4080, 4090, 4100, 5000):
        data = marked(start - base)
        assert data.index(imageio.OUTPUT_MARKER) == start
        p = tmp_path / f"m{start}.jpg"
        p.write_bytes(data)
        assert imageio.output_source(p) == tag, start


def test_temp_names_are_short_and_carry_the_pid():
    name = imageio.temp_name()
    assert len(name.encode()) <= 32 and imageio.temp_owner(name) == os.getpid()
    assert imageio.temp_owner(".IMG_0001.jpg.abcd1234.tmp") is None


@pytest.mark.parametrize("argv, words", [
    (["run", "a.jpg", "--quality", "500"], "Invalid value for '--quality'"),
    (["run", "a.jpg", "--bogus"], "No such option: --bogus"),
    (["finetune", "album", "-o", "m.safetensors", "--epochs", "0"], "Invalid value for '--epochs'"),
    (["eval", "fcdb"], "Missing argument"),
    (["bogus"], "No such command 'bogus'"),
    (["--bogus"], "No such option: --bogus"),
])
def test_a_command_line_that_cannot_be_parsed_is_one_line_and_exit_2(tmp_path, argv, words):
    """Click drew a box of five lines (usage, a hint, a framed error) for these: a pipeline's log wants one."""
    r = CliRunner().invoke(app, argv)
    assert r.exit_code == 2 and r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("smartcrop: ") and words in lines[0] and "--help)" in lines[0], \
        r.stderr
