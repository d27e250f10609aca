"""`smartcrop run` end to end through the CLI (an untrained small model: behaviour, not crop quality)."""

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

pytest.importorskip("torch")
from typer.testing import CliRunner  # noqa: E402

from smartcrop.cli import app  # noqa: E402

from conftest import draw_photo, sha  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run(args, stdin=None):
    r = CliRunner().invoke(app, ["run", *map(str, args)], input=stdin)
    return r.exit_code, r.stdout_bytes, r.stderr


def jsonl(out: bytes):
    return [json.loads(line) for line in out.decode().splitlines() if line.strip()]


def bomb_png(path: Path, w: int = 40000, h: int = 40000) -> Path:
    """A tiny PNG whose header claims w×h pixels (1.6 gigapixels)."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", w, h)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path


def test_folder_two_ratios_json(tmp_path, small_model_file):
    src = tmp_path / "in"
    for k in range(3):
        draw_photo(src / f"p{k}.jpg", size=(300, 200), seed=k)
    before = {p: sha(p) for p in src.iterdir()}
    code, out, _ = run([src, "--ratio", "16:9", "--ratio", "1:1", "--json", "-o", tmp_path / "out",
                        "--weights", small_model_file])
    assert code == 0
    recs = jsonl(out)
    assert len(recs) == 6
    for r in recs:
        x1, y1, x2, y2 = r["box"]
        assert 0 <= x1 < x2 <= 300 and 0 <= y1 < y2 <= 200
        w, h = Image.open(r["output"]).size
        assert [w, h] == r["size"] == [x2 - x1, y2 - y1]
        target = 16 / 9 if r["ratio"] == "16:9" else 1.0
        assert abs(w - h * target) <= target + 1e-6 or abs(h - w / target) <= 1
        assert Path(r["output"]).name == f"{Path(r['input']).stem}_{r['ratio'].replace(':', 'x')}.jpg"
    assert {p: sha(p) for p in src.iterdir()} == before  # inputs untouched
    assert not list((tmp_path / "out").glob(".*"))  # no temporary files left


def test_bad_inputs_are_reported_and_the_rest_is_done(tmp_path, small_model_file):
    src = tmp_path / "in"
    src.mkdir()
    (src / "zero.jpg").write_bytes(b"")
    good = draw_photo(src / "good.jpg", size=(320, 240))
    (src / "truncated.jpg").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (src / "text.jpg").write_text("hello, I am not a photo\n")
    bomb_png(src / "bomb.png")
    rgba = Image.new("RGBA", (120, 80), (255, 0, 0, 0))
    rgba.save(src / "alpha.png")
    Image.fromarray((np.arange(120 * 80).reshape(80, 120) * 6).astype(np.uint16)).save(src / "deep16.png")
    Image.new("CMYK", (100, 80), (0, 255, 255, 0)).save(src / "cmyk.jpg")
    Image.new("L", (90, 70), 128).save(src / "gray.jpg")
    Image.new("P", (90, 70), 3).save(src / "palette.png")
    frames = [Image.new("RGB", (64, 48), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(src / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    Image.new("RGB", (1, 1), (10, 20, 30)).save(src / "one.png")
    Image.new("RGB", (30000, 200), (50, 60, 70)).save(src / "pano.jpg", quality=50)
    code, out, err = run([src, "--ratio", "16:9", "--json", "-o", tmp_path / "out", "--weights", small_model_file])
    assert code == 1
    lines = [ln for ln in err.splitlines() if ln.strip()]
    failed = {n for n in ("zero.jpg", "truncated.jpg", "text.jpg", "bomb.png", "one.png")
              if any(n in ln for ln in lines)}
    assert failed == {"zero.jpg", "truncated.jpg", "text.jpg", "bomb.png", "one.png"}
    assert len(lines) == 5, lines  # one line per failure, nothing else
    assert "at least 16" in next(ln for ln in lines if "one.png" in ln)  # a 1x1 photo has no crop worth writing
    done = {Path(r["input"]).name: r for r in jsonl(out)}
    assert set(done) == {"good.jpg", "alpha.png", "deep16.png", "cmyk.jpg", "gray.jpg", "palette.png", "anim.gif",
                         "pano.jpg"}
    for r in done.values():
        assert Path(r["output"]).is_file()
    assert done["pano.jpg"]["box"][3] <= 200 and done["pano.jpg"]["size"][0] <= 356
    assert Path(done["anim.gif"]["output"]).suffix == ".jpg"  # not writable here, no transparency: JPEG
    assert Image.open(done["alpha.png"]["output"]).mode == "RGBA"  # alpha kept for PNG


# what a viewer applies to the stored pixels for each EXIF orientation (as PIL.ImageOps.exif_transpose)
ORIENT_OPS = {
    1: [], 2: [Image.FLIP_LEFT_RIGHT], 3: [Image.ROTATE_180], 4: [Image.FLIP_TOP_BOTTOM],
    5: [Image.TRANSPOSE], 6: [Image.ROTATE_270], 7: [Image.TRANSVERSE], 8: [Image.ROTATE_90],
}


def stored_for(upright: Image.Image, orientation: int) -> Image.Image:
    """Pixels to store so that applying EXIF `orientation` gives `upright` back (inverse transforms)."""
    inverse = {Image.ROTATE_90: Image.ROTATE_270, Image.ROTATE_270: Image.ROTATE_90}
    img = upright
    for op in ORIENT_OPS[orientation]:
        img = img.transpose(inverse.get(op, op))
    return img


def test_exif_orientations_give_upright_boxes_and_outputs(tmp_path, small_model_file):
    upright_path = draw_photo(tmp_path / "upright.png", size=(240, 160), seed=3)
    upright = Image.open(upright_path).convert("RGB")
    src = tmp_path / "in"
    src.mkdir()
    for o in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = o
        stored_for(upright, o).save(src / f"o{o}.png", exif=exif.tobytes())
    code, out, err = run([src, "--ratio", "4:5", "--json", "-o", tmp_path / "out", "--weights", small_model_file])
    assert code == 0, err
    recs = {Path(r["input"]).stem: r for r in jsonl(out)}
    ref = recs["o1"]
    for o in range(1, 9):
        r = recs[f"o{o}"]
        assert r["box"] == ref["box"], o  # same upright pixels → same crop
        img = Image.open(r["output"])
        assert img.size == tuple(ref["size"])
        assert img.getexif().get(0x0112, 1) == 1
        x1, y1, x2, y2 = ref["box"]
        expected = np.asarray(upright.crop((x1, y1, x2, y2)), dtype=float)
        assert np.abs(np.asarray(img.convert("RGB"), dtype=float) - expected).mean() < 2.0, o


def test_a_jpeg_turned_by_xmp_alone_is_re_encoded_upright(tmp_path, small_model_file):
    """No EXIF orientation, XMP tiff:Orientation 6 (Pillow turns the photo by it, browsers do not): the DCT-domain
    crop read the stored orientation and cut another part of the photo (the box moved by 216 px, the crop came
    out 9:16 in viewers); now such a JPEG is re-encoded upright with the orientation reset."""
    from smartcrop import jpegcrop

    if not jpegcrop.available():
        pytest.skip(f"no lossless JPEG backend here ({jpegcrop.unavailable_reason()})")
    # square, so that the old mapping's box fit the stored photo too (it cut the wrong part, no error)
    upright = Image.open(draw_photo(tmp_path / "upright.png", size=(224, 224), seed=3)).convert("RGB")
    buf = io.BytesIO()
    stored_for(upright, 6).save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    xmp = (b'http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf='
           b'"http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff'
           b'/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    src = tmp_path / "x.jpg"
    src.write_bytes(data[:2] + b"\xff\xe1" + struct.pack(">H", len(xmp) + 2) + xmp + data[2:])
    code, out, err = run([src, "--ratio", "16:9", "--json", "-o", tmp_path / "out", "--weights", small_model_file])
    assert code == 0, err
    (rec,) = jsonl(out)
    assert rec["lossless"] is False and rec["size"][0] > rec["size"][1]
    img = Image.open(rec["output"])
    assert b'tiff:Orientation="6"' not in img.info.get("xmp", b"") and img.getexif().get(0x0112, 1) == 1
    expected = np.asarray(upright.crop(tuple(rec["box"])), dtype=float)
    assert np.abs(np.asarray(img.convert("RGB"), dtype=float) - expected).mean() < 4.0


def test_an_orientation_tag_the_two_exif_readers_read_differently_is_re_encoded_upright(tmp_path, small_model_file):
    """Orientation 6 stored as a signed short: Pillow (which turned the photo for scoring) reads it, the lossless
    path's own parser did not, and cut the upright box out of the stored photo (another region, shown 9:16)."""
    from smartcrop import jpegcrop

    if not jpegcrop.available():
        pytest.skip(f"no lossless JPEG backend here ({jpegcrop.unavailable_reason()})")
    # square, so that the stored photo holds the upright box too (the old cut raised nothing)
    upright = Image.open(draw_photo(tmp_path / "upright.png", size=(224, 224), seed=3)).convert("RGB")
    ifd = struct.pack("<H", 1) + struct.pack("<HHL", 0x0112, 8, 1) + struct.pack("<H", 6).ljust(4, b"\0") + \
        struct.pack("<L", 0)
    src = tmp_path / "x.jpg"
    stored_for(upright, 6).save(src, "JPEG", quality=95, exif=b"Exif\x00\x00II*\x00" + struct.pack("<L", 8) + ifd)
    code, out, err = run([src, "--ratio", "16:9", "--json", "-o", tmp_path / "out", "--weights", small_model_file])
    assert code == 0, err
    (rec,) = jsonl(out)
    img = ImageOps.exif_transpose(Image.open(rec["output"])).convert("RGB")
    assert rec["lossless"] is False and img.size == tuple(rec["size"]) and rec["size"][0] > rec["size"][1]
    expected = np.asarray(upright.crop(tuple(rec["box"])), dtype=float)
    assert np.abs(np.asarray(img, dtype=float) - expected).mean() < 4.0


def test_stdin_image_to_stdout_and_stdin_list(tmp_path, small_model_file):
    p = draw_photo(tmp_path / "a.jpg", size=(300, 200))
    code, out, err = run(["-", "--ratio", "1:1", "--weights", small_model_file], stdin=p.read_bytes())
    assert code == 0, err
    img = Image.open(io.BytesIO(out))
    # a square crop of the upright photo, at most its short side, at full resolution
    assert img.format == "JPEG" and img.size[0] == img.size[1] and 140 <= img.size[0] <= 200
    q = draw_photo(tmp_path / "b.png", size=(200, 300))
    code, out, err = run(["-", "--ratio", "1:1", "--json", "-o", tmp_path / "o", "--weights", small_model_file],
                         stdin=f"{p}\n{q}\n".encode())
    assert code == 0, err
    assert sorted(Path(r["output"]).name for r in jsonl(out)) == ["a_1x1.jpg", "b_1x1.png"]
    # two lists: Click kept the last, and the first list's photos were dropped without a word
    (tmp_path / "la.txt").write_text(f"{p}\n")
    (tmp_path / "lb.txt").write_text(f"{q}\n")
    code, out, err = run(["--from-file", tmp_path / "la.txt", "--from-file", tmp_path / "lb.txt", "--dry-run",
                          "--weights", small_model_file])
    assert code == 2 and not out and err.strip() == ("smartcrop: --from-file is given more than once: give one list "
                                                     "(e.g. cat a.txt b.txt | smartcrop run --from-file -)")


def test_names_clashes_reruns_and_mirroring(tmp_path, small_model_file):
    src = tmp_path / "in"
    draw_photo(src / "x" / "same.jpg")
    draw_photo(src / "y" / "same.jpg")
    draw_photo(src / "y" / "dup.jpg")
    draw_photo(src / "y" / "dup.png")
    out = tmp_path / "out"
    args = [src, "-r", "--ratio", "16:9", "-o", out, "--weights", small_model_file, "--json"]
    code, o1, _ = run(args)
    assert code == 0
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert names == ["x/same_16x9.jpg", "y/dup_16x9.jpg", "y/dup_16x9.png", "y/same_16x9.jpg"]
    first = {p: sha(p) for p in out.rglob("*") if p.is_file()}
    code, o2, _ = run(args)  # re-run: nothing overwritten, new names
    assert code == 0
    assert all(sha(p) == h for p, h in first.items())
    assert (out / "x" / "same_16x9-1.jpg").is_file()
    code, o3, _ = run(args + ["--skip-existing"])
    assert code == 0 and {r["skipped"] for r in jsonl(o3)} == {"exists"} and len(jsonl(o3)) == 4
    code, o4, _ = run(args + ["--overwrite"])
    assert code == 0 and {Path(r["output"]).name for r in jsonl(o4)} == {"same_16x9.jpg", "dup_16x9.jpg",
                                                                         "dup_16x9.png"}
    # two inputs of one run never share an output: a template without {ext}
    code, o5, _ = run([src / "y", "--ratio", "1:1", "-o", tmp_path / "o5", "--name", "{stem}.jpg",
                       "--weights", small_model_file, "--json"])
    assert code == 0
    assert sorted(Path(r["output"]).name for r in jsonl(o5)) == ["dup-1.jpg", "dup.jpg", "same.jpg"]


@pytest.mark.parametrize("args", [
    ["--ratio", "16:0"], ["--ratio", "abc"], ["--name", "../{stem}.jpg"], ["--name", "/tmp/{stem}.jpg"],
    ["--name", "{nope}.jpg"], ["--size", "12xx"], ["--overwrite", "--skip-existing"],
    ["--size", "320x180", "--max-side", "100"],  # --max-side was dropped silently (320 x 180 written)
])
def test_usage_errors_exit_2(tmp_path, small_model_file, args):
    p = draw_photo(tmp_path / "a.jpg")
    code, out, err = run([p, "-o", tmp_path / "o", "--weights", small_model_file, *args])
    assert code == 2
    assert err.strip() and len(err.strip().splitlines()) == 1


def test_options_that_change_nothing_are_noted(tmp_path, small_model_file):
    """--upscale without --size, --refine and --free-grid without a free ratio were accepted without effect."""
    p = draw_photo(tmp_path / "a.jpg")
    code, out, err = run([p, "--ratio", "16:9", "--upscale", "--refine", "--free-grid", "gaic", "--dry-run",
                          "--weights", small_model_file])
    assert code == 0 and out
    notes = err.strip().splitlines()
    assert len(notes) == 3 and all(n.startswith("smartcrop: note: --") for n in notes)
    assert [n.split()[2] for n in notes] == ["--upscale", "--refine", "--free-grid"]
    code, _, err = run([p, "--ratio", "any", "--refine", "--free-grid", "gaic", "--dry-run",
                        "--weights", small_model_file])
    assert code == 0 and "note" not in err
    # fewer distinct crops than --top-k asked: said once, at the end
    code, out, err = run([p, "--ratio", "1:1", "--top-k", "20", "--dry-run", "--weights", small_model_file])
    assert code == 0 and 1 <= len(out.splitlines()) < 20
    assert err.strip() == ("smartcrop: note: 1 photo had fewer than 20 distinct crops for a ratio (a crop "
                           "overlapping a better one by more than 60 % is not another)")


def test_missing_input_exit_1_and_unwritable_output_exit_2(tmp_path, small_model_file):
    code, _, err = run([tmp_path / "nope.jpg", "--weights", small_model_file])  # one failed input (README: exit 1)
    assert code == 1 and "nope.jpg" in err and len(err.strip().splitlines()) == 1
    p = draw_photo(tmp_path / "a.jpg")
    (tmp_path / "afile").write_text("x")
    code, _, err = run([p, "-o", tmp_path / "afile", "--weights", small_model_file])
    assert code == 2 and "afile" in err
    # a missing path in a file list is one failed input: the others are still cropped, exit 1
    lst = tmp_path / "list.txt"
    lst.write_text(f"{tmp_path / 'gone.jpg'}\n{p}\n")
    code, out, err = run(["--from-file", lst, "-o", tmp_path / "o", "--json", "--weights", small_model_file])
    assert code == 1 and "gone.jpg" in err and len(err.strip().splitlines()) == 1
    assert [Path(r["input"]).name for r in jsonl(out)] == ["a.jpg"]


def test_an_empty_output_folder_is_refused_not_taken_as_the_current_one(tmp_path, small_model_file, monkeypatch):
    """`-o "$DIR"` with DIR unset must not scatter crops into wherever the shell stands; `-o .` does that."""
    p = draw_photo(tmp_path / "in" / "a.jpg")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code, out, err = run([p, "--ratio", "1:1", "-o", "", "--weights", small_model_file])
    assert code == 2 and "--output is empty" in err and len(err.strip().splitlines()) == 1, err
    code, out, err = run([p, "--ratio", "1:1", "-o", ".", "--name", "", "--weights", small_model_file])  # the same
    assert code == 2 and "--name is empty" in err and len(err.strip().splitlines()) == 1, err
    assert list(work.iterdir()) == [] and sorted(q.name for q in p.parent.iterdir()) == ["a.jpg"]
    code, out, err = run([p, "--ratio", "1:1", "-o", ".", "--weights", small_model_file, "--json"])
    assert code == 0 and [q.name for q in work.iterdir()] == ["a_1x1.jpg"], err


def test_size_max_side_top_k_preview_dry_run(tmp_path, small_model_file):
    p = draw_photo(tmp_path / "a.jpg", size=(400, 300))
    code, out, _ = run([p, "--size", "64x36", "-o", tmp_path / "s", "--json", "--weights", small_model_file])
    assert code == 0 and jsonl(out)[0]["size"] == [64, 36] and Image.open(jsonl(out)[0]["output"]).size == (64, 36)
    code, out, _ = run([p, "--ratio", "1:1", "--max-side", "50", "-o", tmp_path / "m", "--json",
                        "--weights", small_model_file])
    assert code == 0 and jsonl(out)[0]["size"] == [50, 50]
    wide = draw_photo(tmp_path / "w.jpg", size=(640, 240))  # room for three squares overlapping little
    code, out, _ = run([wide, "--ratio", "1:1", "--top-k", "3", "-o", tmp_path / "k", "--json", "--preview",
                        tmp_path / "sheet.jpg", "--weights", small_model_file])
    recs = jsonl(out)
    assert code == 0 and len(recs) == 3 and len({tuple(r["box"]) for r in recs}) == 3
    assert [Path(r["output"]).name for r in recs] == ["w_1x1_1.jpg", "w_1x1_2.jpg", "w_1x1_3.jpg"]
    assert recs[0]["score"] >= recs[1]["score"] >= recs[2]["score"]
    assert Image.open(tmp_path / "sheet.jpg").size[0] > 100
    code, out, _ = run([p, "--ratio", "1:1", "--dry-run", "--json", "-o", tmp_path / "d", "--weights",
                        small_model_file])
    assert code == 0 and jsonl(out)[0]["output"] is None and not (tmp_path / "d").exists()


def test_python_api(tmp_path, small_model_file):
    from smartcrop import Cropper

    p = draw_photo(tmp_path / "a.jpg", size=(300, 200))
    c = Cropper(weights=small_model_file, device="cpu")
    crops = c.crop(p, ratios=["16:9", "any"])
    assert [k.ratio for k in crops] == ["16:9", "any"]
    x1, y1, x2, y2 = crops[0].box
    assert abs((x2 - x1) - (y2 - y1) * 16 / 9) <= 16 / 9 + 1e-6
    # a path is decoded with JPEG draft mode, an Image as given: same boxes, near-identical scores
    again = c.crop(Image.open(p), ratios=["16:9", "any"])
    assert [k.box for k in again] == [k.box for k in crops]
    assert all(abs(a.score - b.score) < 0.05 for a, b in zip(again, crops))
    assert c.crop(p, ratios=["16:9", "any"]) == crops  # deterministic


def test_metadata_kept_or_stripped_formats_and_quality(tmp_path, small_model_file):
    from PIL import ImageCms

    src = tmp_path / "in"
    src.mkdir()
    base = Image.open(draw_photo(tmp_path / "base.png", size=(320, 240), seed=5)).convert("RGB")
    exif = Image.Exif()
    exif[0x010F] = "TestCam"  # Make
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    base.save(src / "cam.jpg", exif=exif.tobytes(), icc_profile=icc, quality=95)
    base.save(src / "scan.tif")
    code, out, err = run([src, "--ratio", "4:3", "--json", "-o", tmp_path / "keep", "--weights", small_model_file])
    assert code == 0, err
    outs = {Path(r["input"]).name: Path(r["output"]) for r in jsonl(out)}
    kept = Image.open(outs["cam.jpg"])
    assert kept.getexif().get(0x010F) == "TestCam" and kept.info.get("icc_profile") == icc
    assert outs["scan.tif"].suffix == ".tif" and Image.open(outs["scan.tif"]).format == "TIFF"

    code, out, _ = run([src / "cam.jpg", "--ratio", "4:3", "--json", "-o", tmp_path / "strip", "--strip",
                        "--weights", small_model_file])
    stripped = Image.open(jsonl(out)[0]["output"])
    assert code == 0 and 0x010F not in stripped.getexif() and "icc_profile" not in stripped.info

    sizes = {}
    for q in (30, 95):
        code, out, _ = run([src / "cam.jpg", "--ratio", "4:3", "--json", "-o", tmp_path / f"q{q}", "--quality", q,
                            "--weights", small_model_file])
        sizes[q] = Path(jsonl(out)[0]["output"]).stat().st_size
    assert sizes[30] < sizes[95]

    code, out, _ = run([src / "cam.jpg", "--ratio", "4:3", "--json", "-o", tmp_path / "w", "--format", "webp",
                        "--weights", small_model_file])
    w = Path(jsonl(out)[0]["output"])
    assert code == 0 and w.suffix == ".webp" and Image.open(w).format == "WEBP"


def test_tiff_crops_keep_a_compression_that_suits_them_and_honour_quality(tmp_path, small_model_file):
    """TIFF crops took the source's compression as it was: a bilevel Group 4 TIFF failed to write ("encoder
    error -2", a libtiff line on stderr, exit 1) and JPEG-compressed ones ignored --quality."""
    src = tmp_path / "in"
    src.mkdir()
    photo = Image.open(draw_photo(tmp_path / "p.png", size=(240, 160), seed=4)).convert("RGB")
    photo.convert("1").save(src / "fax.tif", compression="group4")
    photo.save(src / "lzw.tif", compression="tiff_lzw")
    photo.save(src / "dct.tif", compression="jpeg", quality=90)
    sizes = {}
    for q in ("30", "95"):
        code, out, err = run([src, "--ratio", "16:9", "--json", "--quality", q, "-o", tmp_path / q,
                              "--weights", small_model_file])
        assert code == 0 and err == "", err
        recs = {Path(r["input"]).stem: r for r in jsonl(out)}
        got = {k: Image.open(r["output"]) for k, r in recs.items()}
        assert got["fax"].info["compression"] == "tiff_adobe_deflate" and got["fax"].mode == "L"
        assert got["lzw"].info["compression"] == "tiff_lzw" and got["dct"].info["compression"] == "jpeg"
        for im in got.values():
            im.load()
        sizes[q] = Path(recs["dct"]["output"]).stat().st_size
    assert sizes["30"] < sizes["95"] / 2


def test_a_lossless_webp_is_cropped_to_a_lossless_webp(tmp_path, small_model_file):
    """A lossless WebP (still or animated) came out lossy (pixels off by up to 137); a lossy one stays lossy."""
    photo = Image.open(draw_photo(tmp_path / "p.png", size=(240, 160), seed=4)).convert("RGB")
    src = tmp_path / "in"
    src.mkdir()
    photo.save(src / "still.webp", lossless=True)
    photo.save(src / "anim.webp", lossless=True, save_all=True, append_images=[photo.rotate(180)], duration=100)
    photo.save(src / "lossy.webp", quality=80)
    code, out, err = run([src, "--ratio", "16:9", "--json", "-o", tmp_path / "out", "--weights", small_model_file])
    assert code == 0, err
    for rec in jsonl(out):
        got = np.asarray(Image.open(rec["output"]).convert("RGB"), dtype=int)
        want = np.asarray(Image.open(rec["input"]).convert("RGB").crop(tuple(rec["box"])), dtype=int)
        assert (np.abs(got - want).max() == 0) == ("lossy" not in rec["input"]), rec["input"]


def test_a_re_encoded_jpeg_crop_keeps_the_source_chroma_subsampling(tmp_path, small_model_file):
    """Re-encoded JPEG crops were always 4:2:0, halving a 4:4:4 photo's colour detail."""
    from PIL import JpegImagePlugin

    photo = Image.open(draw_photo(tmp_path / "p.png", size=(240, 160), seed=4)).convert("RGB")
    src = tmp_path / "in"
    src.mkdir()
    for code in (0, 1, 2):
        photo.save(src / f"s{code}.jpg", quality=95, subsampling=code)
    code, out, err = run([src, "--ratio", "1:1", "--json", "--max-side", "100", "-o", tmp_path / "out",
                          "--weights", small_model_file])
    assert code == 0, err
    for rec in jsonl(out):
        assert rec["lossless"] is False
        want = int(Path(rec["input"]).stem[1])
        assert JpegImagePlugin.get_sampling(Image.open(rec["output"])) == want, rec["input"]


def test_a_ratio_too_thin_for_the_photo_fails_alone_and_is_named(tmp_path, small_model_file):
    """One impossible ratio (10:1 of a 64 x 48 photo: 60 x 6 px) failed the photo's every crop, in a line that did
    not name the ratio; now the other ratios' crops are written, the line names it, the run exits 1."""
    photo = draw_photo(tmp_path / "small.png", size=(64, 48), seed=2)
    out = tmp_path / "out"
    code, stdout, err = run([photo, "--ratio", "1:1", "--ratio", "10:1", "--json", "-o", out,
                             "--weights", small_model_file])
    assert code == 1
    (rec,) = jsonl(stdout)
    assert rec["ratio"] == "1:1" and Image.open(rec["output"]).size == tuple(rec["size"])
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "small.png: ratio 10:1: the best crop is only 60x6 pixels" in lines[0]
    code, _, err = run([photo, "--ratio", "10:1", "-o", tmp_path / "out2", "--weights", small_model_file])
    assert code == 1 and "the best crop is only" in err and not (tmp_path / "out2").exists()
    # with --top-k, one line a ratio, however many of its crops are left out
    code, stdout, err = run([photo, "--ratio", "1:1", "--ratio", "10:1", "--ratio", "1:10", "--top-k", "3",
                             "--dry-run", "--json", "--weights", small_model_file])
    lines = [ln for ln in err.splitlines() if "ratio 1" in ln and "left out" in ln]
    assert code == 1 and len(lines) == 2 and {r["ratio"] for r in jsonl(stdout)} == {"1:1"}


def test_the_vote_never_shrinks_a_tiny_photos_crop_below_the_smallest_written(tmp_path, small_model_file):
    """On a 16 x 16 photo the score-weighted vote averaged the whole frame with smaller anchors into 14 x 14,
    which was then refused as too small; the best anchor itself (16 x 16) is written instead."""
    photo = draw_photo(tmp_path / "tiny.png", size=(16, 16), seed=2)
    code, stdout, err = run([photo, "--ratio", "1:1", "--json", "-o", tmp_path / "out", "--weights", small_model_file])
    assert code == 0, err
    (rec,) = jsonl(stdout)
    assert min(rec["size"]) >= 16


def test_python_api_flip_tta_averages_with_the_mirrored_image(tmp_path, small_model_file):
    from smartcrop import Cropper

    img = Image.open(draw_photo(tmp_path / "a.png", size=(256, 256), seed=3)).convert("RGB")
    boxes = np.array([[0, 0, 200, 150], [40, 30, 256, 256], [10, 60, 180, 240]], np.float32)
    mirrored = np.stack([256 - boxes[:, 2], boxes[:, 1], 256 - boxes[:, 0], boxes[:, 3]], axis=1)
    plain = Cropper(weights=small_model_file, device="cpu")
    s = plain.score_boxes(img, None, {"b": boxes})["b"]
    s_m = plain.score_boxes(img.transpose(Image.FLIP_LEFT_RIGHT), None, {"b": mirrored})["b"]
    assert not np.allclose(s, s_m, atol=1e-4)  # the model is not flip-invariant, so the check below has teeth
    tta = Cropper(weights=small_model_file, device="cpu", tta=True).score_boxes(img, None, {"b": boxes})["b"]
    np.testing.assert_allclose(tta, (s + s_m) / 2, atol=1e-4)


def test_python_api_bfloat16_autocast_scores_close_to_float32(tmp_path, small_model_file):
    from smartcrop import Cropper

    img = Image.open(draw_photo(tmp_path / "a.png", size=(320, 240), seed=4)).convert("RGB")
    boxes = np.array([[0, 0, 200, 150], [40, 30, 320, 240], [10, 60, 180, 240], [0, 0, 320, 240]], np.float32)
    s32 = Cropper(weights=small_model_file, device="cpu").score_boxes(img, None, {"b": boxes})["b"]
    s16 = Cropper(weights=small_model_file, device="cpu", amp=True).score_boxes(img, None, {"b": boxes})["b"]
    assert s16.dtype == np.float32 and s16.shape == s32.shape
    assert not np.array_equal(s16, s32)  # autocast did run in bfloat16 ...
    np.testing.assert_allclose(s16, s32, atol=0.05 * (np.abs(s32).max() + 1e-3))  # ... and stays close


def test_template_extension_decides_the_written_format(tmp_path, small_model_file):
    """'{stem}.png' on a JPEG writes a PNG (not JPEG bytes, lossless or not, under a .png name)."""
    p = draw_photo(tmp_path / "a.jpg", size=(320, 240))
    code, out, err = run([p, "--ratio", "4:3", "--name", "{stem}.png", "-o", tmp_path / "o", "--json",
                          "--weights", small_model_file])
    assert code == 0, err
    rec = jsonl(out)[0]
    assert rec["output"].endswith("a.png") and rec["lossless"] is False
    assert Image.open(rec["output"]).format == "PNG"


def _finish_dying_once(job):
    """stages.finish, except that the first call anywhere kills its worker process (as the OOM killer would)
    in the middle of writing a crop: its temporary file (in the folder ``o`` beside the flag) is left behind."""
    import os

    from smartcrop.imageio import temp_name
    from smartcrop.stages import finish

    flag = os.environ["SMARTCROP_TEST_DIE_ONCE"]
    try:
        os.close(os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return finish(job)
    (Path(flag).parent / "o" / temp_name()).write_bytes(b"\xff\xd8 half a JPEG")
    os._exit(3)


def test_a_dying_worker_is_replaced_and_its_photos_retried(tmp_path, small_model_file, monkeypatch):
    src = tmp_path / "in"
    for k in range(4):
        draw_photo(src / f"p{k}.jpg", size=(320, 240), seed=k)
    flag = tmp_path / "died"
    monkeypatch.setenv("SMARTCROP_TEST_DIE_ONCE", str(flag))
    monkeypatch.setattr("smartcrop.runner.finish", _finish_dying_once)
    code, out, err = run([src, "--ratio", "4:3", "-o", tmp_path / "o", "--json", "-j", "2", "--weights",
                          small_model_file])
    assert flag.exists()  # a worker did die
    assert code == 0, err
    recs = jsonl(out)
    assert sorted(Path(r["input"]).name for r in recs) == ["p0.jpg", "p1.jpg", "p2.jpg", "p3.jpg"]
    assert all(Image.open(r["output"]).size == tuple(r["size"]) for r in recs)
    # what the dead worker (or a fellow worker stopped with its pool) was writing is gone: outputs alone remain
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [f"p{k}_4x3.jpg" for k in range(4)]


def _finish_after_a_photo_was_replaced(job):
    """stages.finish, with the photo named by $SMARTCROP_TEST_REPLACE replaced by a smaller one first: the file
    changed between scoring and writing (up to 64 photos are decoded ahead of their writes)."""
    from smartcrop.stages import finish

    if Path(job.source).name == os.environ["SMARTCROP_TEST_REPLACE"]:
        draw_photo(Path(job.source), size=(200, 150), seed=9)
    return finish(job)


@pytest.mark.parametrize("name, flags", [("p1.jpg", []), ("p1.jpg", ["--reencode"]), ("p1.png", []),
                                         ("p1.jpg", ["-j", "2"])])
def test_a_photo_replaced_after_scoring_fails_alone_and_no_crop_of_it_is_written(tmp_path, small_model_file,
                                                                                    monkeypatch, name, flags):
    """Its boxes were chosen on the photo scored: they were clamped into the new picture, giving 1x1-pixel or
    non-square "1:1" crops while the records said the planned sizes, exit 0.  Now that photo fails in one line
    before any of its crops is written; the others are cropped."""
    src = tmp_path / "in"
    for stem in ("p0", "p2"):
        draw_photo(src / f"{stem}.jpg", size=(320, 240), seed=int(stem[1]))
    draw_photo(src / name, size=(320, 240), seed=1)
    monkeypatch.setenv("SMARTCROP_TEST_REPLACE", name)
    monkeypatch.setattr("smartcrop.runner.finish", _finish_after_a_photo_was_replaced)
    code, out, err = run([src, "--ratio", "1:1", "--ratio", "16:9", "-o", tmp_path / "o", "--json",
                          "--weights", small_model_file, *(["-j", "1"] if "-j" not in flags else []), *flags])
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and name in lines[0] and "changed while it was being cropped" in lines[0], err
    assert "240" in lines[0] and "200x150" in lines[0]
    recs = [r for r in jsonl(out) if r.get("output")]
    assert sorted(Path(r["input"]).name for r in recs) == ["p0.jpg", "p0.jpg", "p2.jpg", "p2.jpg"]
    assert all(Image.open(r["output"]).size == tuple(r["size"]) for r in recs)
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == \
        sorted(f"{s}_{r}.jpg" for s in ("p0", "p2") for r in ("1x1", "16x9"))


def _hold_pixels(pixels: int, die: bool) -> int:
    """A decode holding ``pixels`` of the pool's budget; with ``die`` its worker is killed meanwhile (as the OOM
    killer would, so the budget's release never runs)."""
    from smartcrop.pool import pixel_budget

    with pixel_budget(pixels):
        if die:
            os._exit(3)
        return pixels


def test_a_worker_killed_while_decoding_leaves_no_pixel_budget_held():
    """The retry of a photo whose decode killed its worker must not wait for the dead worker's share of the
    pixel budget (it waited for ever)."""
    from concurrent.futures import BrokenExecutor, TimeoutError as FutureTimeout

    from smartcrop.pool import WorkerPool

    pool = WorkerPool(2, pixel_budget=100)
    try:
        with pytest.raises(BrokenExecutor):
            pool.submit(_hold_pixels, 80, True).result(timeout=60)
        try:
            got = pool.submit(_hold_pixels, 80, False).result(timeout=30)
        except FutureTimeout:
            got = "still waiting for the dead worker's pixels"
        assert got == 80
    finally:  # a waiting worker would keep close() waiting too
        for proc in list((pool._executor._processes or {}).values()):
            proc.kill()
        pool._executor.shutdown(wait=False, cancel_futures=True)


def test_workers_keep_freed_memory_for_the_next_photo():
    """After keep_freed_memory() (done in every worker), a photo-sized buffer comes from the heap, which is kept
    for the next photo, instead of a fresh mapping unmapped again when freed (glibc's mallinfo2: hblkhd is the
    memory held in such mappings).  Each case in a fresh interpreter: glibc's threshold moves with a process's
    history."""
    import ctypes
    import subprocess
    import sys

    try:
        ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        pytest.skip("not glibc 2.33 or later: the setting and the check are glibc's")
    mapped = {}
    for tune in (False, True):
        r = subprocess.run([sys.executable, "-c", _MAPPED_WHILE_HOLDING_A_PHOTO, str(int(tune))], capture_output=True,
                           text=True, timeout=60, check=True)
        mapped[tune] = int(r.stdout)
    assert mapped[False] >= 24 << 20 and mapped[True] < 1 << 20, mapped


def _mapped_while_holding_a_photo() -> int:
    """In a worker: bytes held in fresh mappings while a 24 MB buffer is allocated (see below)."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
    libc.mallinfo2.restype = MallInfo2
    before = libc.mallinfo2().hblkhd
    buf = libc.malloc(24 << 20)
    try:
        return libc.mallinfo2().hblkhd - before
    finally:
        libc.free(buf)


def test_only_small_pools_keep_freed_memory():
    """Workers keep freed memory for the next photo only in pools of at most KEEP_FREED_MAX_WORKERS (8) workers:
    beyond that it would take a run past its memory budget.  Fork-server workers start from a fresh
    interpreter, so glibc's moving threshold has no history from this process."""
    import ctypes

    from smartcrop.pool import KEEP_FREED_MAX_WORKERS, WorkerPool

    try:
        ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        pytest.skip("not glibc 2.33 or later: the setting and the check are glibc's")
    assert KEEP_FREED_MAX_WORKERS == 8
    mapped = {}
    for n in (2, KEEP_FREED_MAX_WORKERS + 1):
        with WorkerPool(n, start_method="forkserver") as pool:
            mapped[n] = pool.submit(_mapped_while_holding_a_photo).result(timeout=60)
    assert mapped[2] < 1 << 20 and mapped[KEEP_FREED_MAX_WORKERS + 1] >= 24 << 20, mapped



_INTERRUPTED_WITH_A_FORKSERVER_POOL = """
import os, sys
from smartcrop.pool import WorkerPool

def prepare():
    pool = WorkerPool(2, start_method="forkserver")
    try:
        assert pool.submit(abs, -3).result(timeout=60) == 3
        raise KeyboardInterrupt
    finally:
        pool.close(cancel=True)

try:
    prepare()
except KeyboardInterrupt as e:
    stop = e  # kept, as the CLI's handler keeps it (the next exception's context), with prepare()'s frame
    print("interrupted", file=sys.stderr, flush=True)
    os._exit(130)  # as the CLI leaves (cli._exit)
"""


def test_a_forkserver_pool_closed_by_an_interrupt_leaves_no_semaphores_behind():
    """`train -j 2` stopped by Ctrl-C while preparing images: its fork-server pool is closed by the interrupt, the
    CLI leaves with ``os._exit`` while the interrupt's traceback still holds the pool, and multiprocessing's
    resource tracker then warned "There appear to be 4 leaked semaphore objects" (seen in the twenty-fifth
    session).  Closing the pool now lets its semaphores go."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _INTERRUPTED_WITH_A_FORKSERVER_POOL], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONWARNINGS": "default"})
    assert r.returncode == 130 and r.stderr.strip() == "interrupted", r.stderr

_MAPPED_WHILE_HOLDING_A_PHOTO = """
import ctypes, sys
from smartcrop.pool import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "1":
    assert keep_freed_memory()
before = libc.mallinfo2().hblkhd
buf = libc.malloc(24 << 20)  # a 12 MP photo's luminance coefficients
print(libc.mallinfo2().hblkhd - before)
libc.free(buf)
"""


def test_scoring_in_the_workers_writes_what_the_main_process_writes(tmp_path, small_model_file):
    """--scoring workers (the workers score, the many-core CPU path; the model loaded by their fork server): the
    same boxes, scores and bytes as scoring in the main process, records in input order, a bad file reported on
    one line."""
    src = tmp_path / "in"
    for k in range(5):
        draw_photo(src / f"p{k}.jpg", size=(320 + 16 * k, 240), seed=k)
    (src / "p2b.jpg").write_text("not a photo\n")
    before = {p: sha(p) for p in src.iterdir()}
    got = {}
    for scoring in ("main", "workers"):
        code, out, err = run([src, "--ratio", "16:9", "--ratio", "any", "--json", "-j", "2", "--scoring", scoring,
                              "-o", tmp_path / scoring, "--weights", small_model_file])
        assert code == 1
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and "p2b.jpg" in lines[0], lines
        got[scoring] = jsonl(out)
    names = [Path(r["input"]).name for r in got["workers"]]
    assert names == [f"p{k}.jpg" for k in range(5) for _ in range(2)]  # input order, two ratios each
    for a, b in zip(got["main"], got["workers"]):
        assert (a["input"], a["ratio"], a["box"], a["size"]) == (b["input"], b["ratio"], b["box"], b["size"])
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)
        assert sha(Path(a["output"])) == sha(Path(b["output"]))
    assert {p: sha(p) for p in src.iterdir()} == before  # inputs untouched


@pytest.mark.parametrize("env, loaded", [({}, True), ({"OMP_NUM_THREADS": "2"}, False)])
def test_the_scoring_fork_server_loads_the_model_once_and_freezes_it(small_model_file, env, loaded):
    """smartcrop.preload (imported by the scoring workers' fork server): the model named by the environment in
    its scoring form, one torch thread, the collector frozen; with OMP_NUM_THREADS set it computes nothing."""
    import subprocess
    import sys

    from smartcrop.stages import PRELOAD_ENV

    code = ("import gc, torch, smartcrop.preload\n"
            "from smartcrop import stages\n"
            "c = stages._worker_croppers.get(%r)\n"
            "print(c is not None and c._scorer is not None, gc.get_freeze_count() > 0, torch.get_num_threads())\n"
            % str(small_model_file))
    env = {**{k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}, PRELOAD_ENV: str(small_model_file),
           **env}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    has_model, frozen, threads = out.split()
    assert has_model == str(loaded) and frozen == "True"
    assert threads == ("1" if loaded else "2")
    env[PRELOAD_ENV] = str(small_model_file) + ".missing"  # a bad model: the workers report it per photo
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split()[:2] == ["False", "True"]


def test_the_preload_variable_is_set_only_while_the_scoring_pool_starts(monkeypatch):
    from smartcrop.runner import _preload_model
    from smartcrop.stages import PRELOAD_ENV

    monkeypatch.delenv(PRELOAD_ENV, raising=False)
    with _preload_model("/m/a.safetensors"):
        assert os.environ[PRELOAD_ENV] == "/m/a.safetensors"
    assert PRELOAD_ENV not in os.environ
    monkeypatch.setenv(PRELOAD_ENV, "user's")
    with pytest.raises(KeyError):
        with _preload_model("/m/b.safetensors"):
            raise KeyError
    assert os.environ[PRELOAD_ENV] == "user's"


def test_photos_are_decoded_ahead_while_the_model_loads(tmp_path, small_model_file, monkeypatch):
    """Start-up: the workers decode up to EARLY_PER_WORKER photos each (more than the run's window) before the
    model is loaded; the run's output is the same."""
    from smartcrop import runner
    from smartcrop.cropper import Cropper

    src = tmp_path / "in"
    for k in range(12):
        draw_photo(src / f"p{k:02d}.jpg", size=(160, 120), seed=k)
    decoded, at_model_load = [], []
    real_prepare, real_init = runner.prepare, Cropper.__init__

    def prepare(*a, **k):
        decoded.append(a[0])
        return real_prepare(*a, **k)

    def init(self, *a, **k):
        at_model_load.append(len(decoded))
        real_init(self, *a, **k)

    monkeypatch.setattr(runner, "prepare", prepare)
    monkeypatch.setattr(Cropper, "__init__", init)
    monkeypatch.setattr(runner, "EARLY_PER_WORKER", 10)  # -j 1: the window is 8, 10 decoded ahead
    code, out, err = run([src, "--ratio", "1:1", "--json", "-j", "1", "-o", tmp_path / "out",
                          "--weights", small_model_file])
    assert code == 0, err
    assert at_model_load == [10] and len(decoded) == 12 and len(set(decoded)) == 12  # each photo decoded once
    assert sorted(Path(r["input"]).name for r in jsonl(out)) == [f"p{k:02d}.jpg" for k in range(12)]


def test_where_photos_are_scored(monkeypatch):
    from smartcrop.errors import UsageError
    from smartcrop.runner import WORKER_SCORING_MIN_WORKERS as N, scoring_in_workers

    monkeypatch.setattr("smartcrop.runner._accelerator_present", lambda: False)
    assert scoring_in_workers("auto", "auto", N) and scoring_in_workers("auto", "cpu", N + 8)
    assert not scoring_in_workers("auto", "auto", N - 1)  # few cores: one scoring process keeps up
    assert not scoring_in_workers("auto", "cuda", N) and not scoring_in_workers("main", "cpu", 64)
    assert not scoring_in_workers("auto", "cpu", N, adapt=True)  # the adapted model lives in the main process
    assert not scoring_in_workers("auto", "cpu", N, known_size=None)
    assert scoring_in_workers("workers", "cpu", 1)
    monkeypatch.setattr("smartcrop.runner._accelerator_present", lambda: True)
    assert not scoring_in_workers("auto", "auto", 64)  # a GPU: the main process resolves and uses it
    assert scoring_in_workers("auto", "cpu", 64)
    for bad in [("workers", "cuda", 8, {}), ("workers", "cpu", 8, {"adapt": True}), ("nope", "cpu", 8, {})]:
        with pytest.raises(UsageError):
            scoring_in_workers(*bad[:3], **bad[3])


def test_the_main_process_leaves_the_cores_to_the_workers(monkeypatch):
    from smartcrop.runner import scoring_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert scoring_threads("cpu", 16, cores=16) == 5  # it scores: a third of the cores
    assert scoring_threads("cpu", 2, cores=2) == 1
    assert scoring_threads("cuda", 16, cores=16) == 1 and scoring_threads("cuda:1", 4, cores=4) == 1  # the GPU scores
    assert scoring_threads("cuda", 1, cores=16) is None and scoring_threads("cpu", 1, cores=16) is None  # no workers
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert scoring_threads("cpu", 16, cores=16) is None and scoring_threads("cuda", 16, cores=16) is None


def test_a_photo_the_worker_cannot_score_fails_alone(tmp_path, small_model_file, monkeypatch):
    from smartcrop import stages
    from smartcrop.stages import ScoringError, WorkerModel, prepare_and_score

    photo = draw_photo(tmp_path / "a.jpg", size=(320, 240))
    wm = WorkerModel(str(small_model_file), ("16:9",), 1, 256, 512)
    monkeypatch.setattr(stages, "_worker_croppers", {})
    p, crops = prepare_and_score(str(photo), wm)
    assert p.full_size == (320, 240) and len(crops) == 1 and crops[0].ratio == "16:9"
    cropper = stages._worker_croppers[str(small_model_file)]  # loaded once, kept for the next photo
    assert prepare_and_score(str(photo), wm)[1][0].box == crops[0].box and stages._worker_croppers[wm.path] is cropper

    def oom(*a, **k):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(cropper, "best_crops_batch", oom)
    with pytest.raises(ScoringError, match="^out of memory while scoring this photo$"):
        prepare_and_score(str(photo), wm)

    def bug(*a, **k):
        raise RuntimeError("shapes do not match")

    monkeypatch.setattr(cropper, "best_crops_batch", bug)
    with pytest.raises(ScoringError, match=r"cannot score this photo \(shapes do not match\)"):
        prepare_and_score(str(photo), wm)


@pytest.mark.parametrize("scoring", ["main", "workers"])
def test_fuse_1_writes_the_best_anchor_itself(tmp_path, small_model_file, scoring):
    from smartcrop.anchors import anchors_for, refine_anchors

    src = tmp_path / "in"
    for k in range(3):
        draw_photo(src / f"p{k}.jpg", size=(400, 300), seed=k)
    got = {}
    for fuse in (1, 3):
        code, out, err = run([src, "--ratio", "16:9", "--ratio", "any", "--json", "--dry-run", "--fuse", fuse,
                              "--scoring", scoring, "-j", "2", "--weights", small_model_file])
        assert code == 0, err
        got[fuse] = {(Path(r["input"]).name, r["ratio"]): r["box"] for r in jsonl(out)}
    assert got[1].keys() == got[3].keys() and len(got[1]) == 6
    for (_, ratio), box in got[1].items():
        anchors = np.round(anchors_for(400, 300, ratio)).astype(int).tolist()
        assert box in anchors
    assert any(got[1][k] != got[3][k] for k in got[1])  # the default fuses: some box is between anchors
    # --refine: a free crop may be a neighbour of the best GAIC anchor (the workers get the option too)
    code, out, err = run([src, "--ratio", "any", "--json", "--dry-run", "--fuse", 1, "--refine",
                          "--scoring", scoring, "-j", "2", "--weights", small_model_file])
    assert code == 0, err
    refined = {Path(r["input"]).name: r["box"] for r in jsonl(out)}
    grid = anchors_for(400, 300, "any")
    near = np.round(np.concatenate([grid] + [refine_anchors(a, 400, 300) for a in grid])).astype(int).tolist()
    assert len(refined) == 3 and all(b in near for b in refined.values())
    assert any(refined[name] != got[1][(name, "any")] for name in refined)  # some crop left the grid


def test_cli_works_with_a_typer_without_the_help_hook():
    """typer < 0.28 has no ``TyperOption.display_type_rich`` (a lent machine's typer 0.27.2 failed at import):
    the CLI must import and run without it (typer 0.29's own help rendering needs the hook, so only
    ``--version`` is invoked here)."""
    import subprocess
    import sys

    code = ("import typer.core as c\n"
            "for k in [c.TyperOption, *c.TyperOption.__mro__]:\n"
            "    k.__dict__.get('display_type_rich') and delattr(k, 'display_type_rich')\n"
            "assert not hasattr(c.TyperOption, 'display_type_rich')\n"
            "from typer.testing import CliRunner\n"
            "from smartcrop.cli import app\n"
            "r = CliRunner().invoke(app, ['--version'])\n"
            "assert r.exit_code == 0 and r.output.startswith('smartcrop '), r.output\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


WARMED = False  # set in a worker process by _warm_up


def _warm_up():
    global WARMED
    WARMED = True


def _warm_fails():
    raise OSError("no such library")


def _warmed():
    return WARMED


def test_each_worker_warms_up_before_its_first_task():
    """WorkerPool(warm=f): every worker calls f when it starts (the run loads the lossless JPEG backend so, while
    torch is imported); a warm-up that fails leaves the pool working."""
    from smartcrop.pool import WorkerPool

    with WorkerPool(2, warm=_warm_up) as pool:
        assert all(pool.submit(_warmed).result() for _ in range(4))
    with WorkerPool(2) as pool:
        assert not any(pool.submit(_warmed).result() for _ in range(4))
    with WorkerPool(2, warm=_warm_fails) as pool:
        assert pool.submit(_warmed).result() is False


def test_a_run_warms_the_lossless_backend_only_when_it_may_crop_losslessly(tmp_path, small_model_file, monkeypatch):
    from smartcrop import runner

    seen = []
    real = runner.WorkerPool

    def pool(*a, **k):
        seen.append(k.get("warm"))
        return real(*a, **k)

    monkeypatch.setattr(runner, "WorkerPool", pool)
    photo = draw_photo(tmp_path / "in" / "a.jpg", size=(320, 240))
    for extra in ([], ["--reencode"], ["--quality", "80"], ["--dry-run"]):
        code, _, err = run([photo, "--ratio", "1:1", "-o", tmp_path / f"out{len(seen)}", "--weights",
                            small_model_file, "-j", "2", *extra])
        assert code == 0, err
    assert seen == [runner.warm_lossless, None, None, None]


def test_may_crop_losslessly_follows_the_options_that_rule_it_out():
    """The run warms the lossless backend in its workers unless its options rule every lossless crop out."""
    from smartcrop.plan import RunOptions
    from smartcrop.stages import may_crop_losslessly

    assert may_crop_losslessly(RunOptions())
    assert may_crop_losslessly(RunOptions(max_side=800, strip=True))  # a crop under the cap is still lossless
    for opts in (RunOptions(reencode=True), RunOptions(quality=90), RunOptions(dry_run=True),
                 RunOptions(size=(640, 360))):
        assert not may_crop_losslessly(opts), opts


@pytest.mark.parametrize("freeze", [False, True])
def test_import_torch_runs_no_collection_and_freezes_only_when_asked(freeze):
    """In a fresh interpreter (torch not yet imported): no cyclic collection during the import, the collector
    on again afterwards, and its objects frozen out of the collector's view only with ``freeze``."""
    import subprocess
    import sys

    code = f"""
import gc, sys
from smartcrop.pool import import_torch
def importing():
    spec = getattr(sys.modules.get("torch"), "__spec__", None)
    return bool(getattr(spec, "_initializing", False))
during = []
gc.callbacks.append(lambda phase, info: during.append(importing()) if phase == "start" else None)
assert "torch" not in sys.modules and gc.get_freeze_count() == 0
torch = import_torch(freeze={freeze})
assert torch is sys.modules["torch"] and import_torch() is torch and gc.isenabled()
gc.collect()
assert during and not importing()  # the callback works (the collect above) and the import is over
print(sum(during), gc.get_freeze_count())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    collections, frozen = int(out[0]), int(out[1])
    assert collections == 0
    assert (frozen > 50_000) if freeze else frozen == 0


def test_free_grid_chooses_among_its_own_candidates_in_every_scoring_path(tmp_path, small_model_file):
    """--free-grid border: the free crop (the best anchor, --fuse 1) is one of anchors.border_anchors, in the main
    process and in the workers, and by default; gaic: one of GAIC's; a grid that does not exist: a usage
    error."""
    from smartcrop.anchors import border_anchors, gaic_anchors

    src = tmp_path / "in"
    for k in range(3):
        draw_photo(src / f"p{k}.jpg", size=(360 + 24 * k, 240), seed=k)
    for grid, make in (("border", border_anchors), ("gaic", gaic_anchors), (None, border_anchors)):
        for scoring in ("main", "workers"):
            extra = ["--free-grid", grid] if grid else []
            code, out, err = run([src, "--ratio", "any", "--fuse", "1", "--json", "--dry-run", "-j", "2",
                                  "--scoring", scoring, "--weights", small_model_file, *extra])
            assert code == 0, err
            recs = jsonl(out)
            assert len(recs) == 3
            for r in recs:
                w, h = Image.open(r["input"]).size
                cands = np.round(make(w, h)).astype(int).tolist()
                assert r["box"] in cands, (grid, scoring, r["box"])
    code, out, err = run([src, "--free-grid", "dense", "--weights", small_model_file])
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "--free-grid" in lines[0] and not out
    code, out, err = run([src / "p0.jpg", "--ratio", "any", "--fuse", "1", "--json", "--dry-run", "--free-grid",
                          "GAIC", "--weights", small_model_file])  # any case, as --scoring
    assert code == 0, err
    w, h = Image.open(src / "p0.jpg").size
    assert jsonl(out)[0]["box"] in np.round(gaic_anchors(w, h)).astype(int).tolist()


def test_a_dry_run_refuses_what_the_run_would(tmp_path, small_model_file):
    """A dry run passed requests the run refuses (an output over its input, a file as output folder) and listed
    as to be made the crops `--skip-existing` would skip."""
    p = draw_photo(tmp_path / "in" / "a.jpg", size=(300, 200))
    base = ["--dry-run", "--json", "--ratio", "1:1", "--weights", small_model_file]
    code, out, err = run([p, "-o", tmp_path / "in", "--name", "{stem}.{ext}", "--overwrite", *base])
    assert code == 2 and not out and "would replace the input" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "afile").write_text("notes\n")
    code, out, err = run([p, "-o", tmp_path / "afile", *base])
    assert code == 2 and not out and err.strip() == f"smartcrop: {tmp_path / 'afile'}: the output folder is a file"
    assert run([p, "-o", tmp_path / "o", "--ratio", "1:1", "--weights", small_model_file])[0] == 0
    code, out, err = run([p, "-o", tmp_path / "o", "--skip-existing", *base])
    assert code == 0 and [r["skipped"] for r in jsonl(out)] == ["exists"], err
    code, out, err = run([p, "-o", tmp_path / "new", *base])
    assert code == 0 and [r["output"] for r in jsonl(out)] == [None] and not (tmp_path / "new").exists()
