"""Formats photographers have (HEIC/HEIF, AVIF, 16-bit), the metadata they care about (XMP, IPTC next to EXIF
and ICC), camera fields for --json, and file names that cannot mess up a terminal."""

import base64
import functools
import json
import importlib
import io
import os
import struct
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms, IptcImagePlugin, TiffImagePlugin
from PIL.TiffImagePlugin import IFDRational

from smartcrop import imageio
from smartcrop.imageio import (
    IMAGE_EXTENSIONS,
    ImageError,
    camera_fields,
    crop_image,
    default_output_format,
    encode_image,
    is_image_path,
    load_full,
    load_image,
    reset_xmp_orientation,
    safe_name,
    save_image,
)
from test_imageio import GRAY, RED, assert_upright, close, exif_with, opened, stored_for, upright_array

HAS_AVIF = imageio._pillow_has_avif()
needs_avif = pytest.mark.skipif(not HAS_AVIF, reason="this Pillow has no AVIF codec (Pillow >= 11.3 wheels do)")


def xmp_packet(orientation=6, form="attribute"):
    tiff = (f'tiff:Orientation="{orientation}"' if form == "attribute" else "")
    element = f"<tiff:Orientation>{orientation}</tiff:Orientation>" if form == "element" else ""
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
        f'xmlns:dc="http://purl.org/dc/elements/1.1/" {tiff}>{element}'
        "<dc:creator><rdf:Seq><rdf:li>Zoë Photographer</rdf:li></rdf:Seq></dc:creator>"
        '</rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
    ).encode("utf-8")


def iim(dataset, number, value):
    return bytes((0x1C, dataset, number)) + struct.pack(">H", len(value)) + value


IPTC = iim(1, 90, b"\x1b%G") + iim(2, 0, b"\x00\x04") + iim(2, 120, "Ünïcödé caption".encode()) + iim(
    2, 116, b"(c) Zoe")


def segment(marker, payload):
    return bytes((0xFF, marker)) + struct.pack(">H", len(payload) + 2) + payload


def app13(iptc):
    block = b"8BIM\x04\x04\x00\x00" + struct.pack(">I", len(iptc)) + iptc + b"\x00" * (len(iptc) % 2)
    return segment(0xED, b"Photoshop 3.0\x00" + block)


def jpeg_segments(data):
    """[(marker, payload)] of a JPEG up to the start of scan."""
    out, pos = [], 2
    while data[pos] == 0xFF and data[pos + 1] != 0xDA:
        size = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        out.append((data[pos + 1], data[pos + 4:pos + 2 + size]))
        pos += 2 + size
    return out


@functools.cache
def srgb_icc():
    """One sRGB profile per run (the header holds its creation time: two calls a second apart differ)."""
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def tagged_jpeg(path, orientation=6, xmp=None, iptc=IPTC, comment=None):
    """A JPEG as a camera + Lightroom would leave it: stored sideways with EXIF orientation, ICC, XMP, IPTC."""
    stored = np.ascontiguousarray(stored_for(upright_array(60, 40), orientation))
    buf = io.BytesIO()
    kw = {"comment": comment} if comment else {}
    Image.fromarray(stored).save(buf, "JPEG", quality=95, exif=exif_with(orientation, make="Cam"),
                                 icc_profile=srgb_icc(), **kw)
    data = buf.getvalue()
    extra = b""
    if xmp is not None:
        extra += segment(0xE1, b"http://ns.adobe.com/xap/1.0/\x00" + xmp)
    if iptc is not None:
        extra += app13(iptc)
    path.write_bytes(data[:2] + extra + data[2:])  # right after SOI, written by hand (not by the code under test)
    return path


# --------------------------------------------------------------------------------------------- HEIC / HEIF


def heif_encoder():
    return pytest.importorskip("pillow_heif", reason="pillow-heif (the HEIC encoder) is not installed")


def write_heic(path, orientation=1, size=(96, 64), exif=None, xmp=None):
    """A HEIC like an iPhone's: pixels stored sideways, an irot/imir transform *and* the same EXIF orientation."""
    pillow_heif = heif_encoder()
    stored = np.ascontiguousarray(stored_for(upright_array(*size), orientation))
    kw = {"xmp": xmp} if xmp else {}
    pillow_heif.encode("RGB", (stored.shape[1], stored.shape[0]), stored.tobytes(), str(path), quality=95,
                       exif=exif if exif is not None else exif_with(orientation, make="Cam"), **kw)
    return path


def test_new_extensions_are_images():
    assert {".heic", ".heif", ".hif", ".avif"} <= IMAGE_EXTENSIONS
    assert is_image_path("IMG_0001.HEIC") and is_image_path("a/b.avif") and is_image_path("x.hif")


def test_heic_read_directly(tmp_path):
    path = write_heic(tmp_path / "IMG_0001.HEIC")
    li = load_image(path)
    assert li.format == "HEIF" and li.full_size == (96, 64) and li.image.mode == "RGB"
    assert_upright(li.image)
    exif = Image.Exif()
    exif.load(li.exif)
    assert exif[0x0112] == 1 and exif[0x010F] == "Cam"
    assert li.bit_depth == 8 and not li.reduced_depth
    assert load_image(path.read_bytes()).format == "HEIF"  # from bytes (stdin) too


@pytest.fixture(params=["pi_heif", "pillow_heif"])
def heif_plugin(request, monkeypatch):
    """Each HEIF decoder that is installed, registered as Pillow's HEIF opener for the test."""
    module = pytest.importorskip(request.param, reason=f"{request.param} is not installed")
    default = imageio.heif_decoder()
    module.register_heif_opener()
    monkeypatch.setattr(imageio, "_heif_plugin", request.param)
    yield module
    importlib.import_module(default).register_heif_opener()


@pytest.mark.parametrize("resets_exif", [True, False])
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_heic_orientation_applied_exactly_once(tmp_path, heif_plugin, monkeypatch, orientation, resets_exif):
    pillow_heif = heif_encoder()
    path = write_heic(tmp_path / "o.heic", orientation)
    raw = pillow_heif.open_heif(str(path))  # not the Pillow plugin: the file as stored
    stored_exif = Image.Exif()
    stored_exif.load(raw.info["exif"])
    assert stored_exif[0x0112] == orientation  # the EXIF tag is there as well as the irot transform
    if not resets_exif:  # a plugin version leaving the EXIF tag as stored, after libheif applied irot/imir
        monkeypatch.setattr(heif_plugin.as_plugin, "set_orientation", lambda info: None)
    for li in (load_image(path), load_full(path), load_image(path, target_short_side=32)):
        assert li.format == "HEIF" and li.full_size == (96, 64)
        assert_upright(li.image)
    assert_upright(load_full(path).original)


# 48x32 upright (stored 32x48 with irot and EXIF orientation 6, made by write_heic's pillow_heif.encode call):
# decoding needs only pi-heif, the decode-only plugin, where pillow-heif (the encoder) is not installed.
HEIC_SAMPLE = base64.b64decode(
    "AAAAHGZ0eXBoZWljAAAAAG1pZjFoZWljbWlhZgAAAchtZXRhAAAAAAAAACFoZGxyAAAAAAAAAABwaWN0AAAAAAAAAAAAAAAAAAAA"
    "ADRpbG9jAAAAAERAAAIAAQAAAAAB7AABAAAAAAAAAOwAAgAAAAAC2AABAAAAAAAAADAAAAA4aWluZgAAAAAAAgAAABVpbmZlAgAA"
    "AAABAABodmMxAAAAABVpbmZlAgAAAQACAABFeGlmAAAAAA5waXRtAAAAAAABAAABB2lwcnAAAADmaXBjbwAAAHZodmNDAQNwAAAA"
    "kAAAAAAAHvAA/P34+AAADwNgAAEAGEABDAH//wNwAAADAJAAAAMAAAMAHroCQGEAAQAqQgEBA3AAAAMAkAAAAwAAAwAeoCCBBZbq"
    "5Ka5uAhoMCAAAAMDIAAAAwAhYgABAAZEAcFzwIkAAAATY29scm5jbHgAAQANAAaAAAAAFGlzcGUAAAAAAAAAQAAAAEAAAAAoY2xh"
    "cAAAACAAAAABAAAAMAAAAAH////gAAAAAv////AAAAACAAAAEHBpeGkAAAAAAwgICAAAAAlpcm90AwAAABlpcG1hAAAAAAAAAAEA"
    "AQaBAgMFhIYAAAAaaXJlZgAAAAAAAAAOY2RzYwACAAEAAQAAASRtZGF0AAAA6CgBrwY4XJWr18aT///lFz//7FykL51s5H5Rc5v6"
    "xq7Elvaya3K0hfgUMvmGm9hjsF2vvgUOr4cO6yOUWRzlVupWqtI5k5uBLPv4siKJ+7Qk4JgBG+YVeLgm3oH1h5N/7n+Q33FKPDQi"
    "eDz2K1V5WHBqtLE2WUcsEtQ31b5szjQWmMImQHT4MXckggDL2ldErrEnNpMuBaNUVa6odmhp+VQr/eY5hq0UAUFahTnQGTqaxBzY"
    "Fir7BXfI3FHoMXh+HjQRqKDomVXrzRJ37eK0Ksx/1wB8Z/M77+zufVcyt82VRuwE2nY/TmAAAAAGRXhpZgAATU0AKgAAAAgAAgEP"
    "AAIAAAAEQ2FtAAESAAMAAAABAAYAAAAAAAA="
)


def test_heic_sample_with_each_decoder(tmp_path, heif_plugin):
    (tmp_path / "IMG_0003.HEIC").write_bytes(HEIC_SAMPLE)
    for li in (load_image(tmp_path / "IMG_0003.HEIC"), load_full(HEIC_SAMPLE)):
        assert li.format == "HEIF" and li.full_size == (48, 32)
        assert_upright(li.image)
        assert li.camera == {"make": "Cam"}


def test_heic_crop_written_as_jpeg_upright_with_metadata(tmp_path):
    path = write_heic(tmp_path / "o.heic", 6, xmp=xmp_packet(6))
    li = load_full(path)
    assert default_output_format(path.suffix, li.format) == "jpg"
    assert b'tiff:Orientation="6"' not in li.xmp and b"Zo\xc3\xab" in li.xmp
    out = save_image(crop_image(li.original, (0, 0, 48, 32)), tmp_path / "o.jpg", exif=li.exif, icc=li.icc,
                     xmp=li.xmp)
    back = load_image(out)
    assert back.full_size == (48, 32) and close(back.image.getpixel((5, 5)), RED)
    assert back.camera == {"make": "Cam"}


def test_heic_opener_registered_lazily_and_once():
    if imageio.heif_decoder() is None:
        pytest.skip("neither pi-heif nor pillow-heif is installed")
    code = (
        "import sys, io\n"
        "import smartcrop.imageio as m\n"
        "from PIL import Image\n"
        "assert not {'pillow_heif', 'pi_heif'} & set(sys.modules), 'imported with the module'\n"
        "buf = io.BytesIO(); Image.new('RGB', (8, 8)).save(buf, 'PNG'); m.load_image(buf.getvalue())\n"
        "assert not {'pillow_heif', 'pi_heif'} & set(sys.modules), 'imported for a PNG'\n"
        "name = m.heif_decoder(); assert name in sys.modules and m.heif_decoder() == name\n"
        "assert Image.ID.count('HEIF') == 1\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_heic_concurrent_first_loads(tmp_path, monkeypatch):
    paths = [write_heic(tmp_path / f"{i}.heic", (1, 3, 6, 8)[i % 4]) for i in range(8)]
    monkeypatch.setattr(imageio, "_heif_plugin", None)  # as in a fresh process: every thread races to register
    with ThreadPoolExecutor(4) as pool:
        for li in pool.map(load_image, paths):
            assert li.format == "HEIF" and li.full_size == (96, 64)
            assert_upright(li.image)
    assert Image.ID.count("HEIF") == 1


def test_heic_without_decoder_says_what_to_install(tmp_path, monkeypatch):
    path = tmp_path / "IMG_0002.heic"
    path.write_bytes(HEIC_SAMPLE)
    Image.init()  # every built-in plugin registered now, not into the patched list below
    monkeypatch.setattr(imageio, "_heif_plugin", "")  # as if neither pi-heif nor pillow-heif were installed
    monkeypatch.setattr(Image, "ID", [i for i in Image.ID if i != "HEIF"])
    with pytest.raises(ImageError, match=r"HEIC/HEIF image, but no HEIF decoder .*pi-heif"):
        load_image(path)


# ------------------------------------------------------------------------------------------------------ AVIF


@needs_avif
@pytest.mark.parametrize("orientation", [1, 6, 7])
def test_avif_read_directly_with_orientation(tmp_path, orientation):
    stored = np.ascontiguousarray(stored_for(upright_array(96, 64), orientation))
    path = tmp_path / "a.avif"
    Image.fromarray(stored).save(path, "AVIF", quality=95, exif=exif_with(orientation, make="Cam"))
    for li in (load_image(path), load_full(path), load_image(path, target_short_side=32)):
        assert li.format == "AVIF" and li.full_size == (96, 64)
        assert_upright(li.image)
    assert camera_fields(load_image(path).exif) == {"make": "Cam"}


@needs_avif
def test_avif_orientation_only_in_xmp_is_not_applied(tmp_path):
    """In HEIF containers irot/imir rule; XMP's tiff:Orientation is informational (libheif and browsers agree)."""
    path = tmp_path / "x.avif"
    Image.fromarray(upright_array(96, 64)).save(path, "AVIF", quality=95, xmp=xmp_packet(6))
    li = load_image(path)
    assert li.full_size == (96, 64)
    assert_upright(li.image)
    assert b'tiff:Orientation="1"' in li.xmp


@needs_avif
def test_avif_is_a_writable_output(tmp_path):
    src = tagged_jpeg(tmp_path / "src.jpg", xmp=xmp_packet(6))
    li = load_full(src)
    out = save_image(crop_image(li.original, (0, 0, 30, 40)), tmp_path / "c.avif", exif=li.exif, icc=li.icc,
                     xmp=li.xmp, iptc=li.iptc)
    back = load_full(out)
    assert back.format == "AVIF" and back.full_size == (30, 40)  # stored upright, no irot
    assert close(back.image.getpixel((4, 4)), RED, 20)
    assert back.icc == li.icc and back.camera == {"make": "Cam"}
    assert b'tiff:Orientation="1"' in back.xmp and b"Zo\xc3\xab" in back.xmp
    assert default_output_format(".avif", "AVIF") == "avif"


@needs_avif
def test_format_avif_is_accepted_by_run(tmp_path, small_model_file):
    from typer.testing import CliRunner

    from smartcrop.cli import app

    src = tagged_jpeg(tmp_path / "src.jpg")
    r = CliRunner().invoke(app, ["run", str(src), "--format", "AVIF", "--ratio", "1:1", "-o", str(tmp_path / "o"),
                                 "--json", "--weights", str(small_model_file)])
    assert r.exit_code == 0, r.stderr
    out = Path(json.loads(r.stdout)["output"])
    assert out.suffix == ".avif" and load_full(out).format == "AVIF"


def test_avif_output_refused_cleanly_without_codec(tmp_path, monkeypatch):
    monkeypatch.setattr(imageio, "_pillow_has_avif", lambda: False)
    with pytest.raises(ImageError, match="AVIF output needs Pillow"):
        save_image(Image.new("RGB", (4, 4)), tmp_path / "x.avif")
    assert list(tmp_path.iterdir()) == []
    assert default_output_format(".avif", "AVIF") == "jpg"
    from smartcrop.errors import UsageError
    from smartcrop.plan import parse_format

    with pytest.raises(UsageError, match="AVIF output needs Pillow"):
        parse_format("avif")
    assert parse_format("TIFF") == "tif"


@pytest.mark.parametrize("suffix,decoded,kw,expected", [
    (".heic", "HEIF", {}, "jpg"),
    (".HEIF", None, {}, "jpg"),
    (".hif", "HEIF", {"has_alpha": True}, "png"),
    (".JPEG", "JPEG", {}, "jpg"),
    (".jpg", "MPO", {}, "jpg"),
    (".tiff", "TIFF", {}, "tiff"),
    (".PNG", "PNG", {}, "png"),
    (".dat", "PNG", {}, "png"),  # named oddly: the decoded format decides
    ("", "WEBP", {}, "webp"),  # stdin
    ("", None, {}, "jpg"),
    (".bmp", "BMP", {}, "jpg"),
    (".gif", "GIF", {}, "jpg"),
    (".gif", "GIF", {"has_alpha": True}, "png"),
])
def test_default_output_format(suffix, decoded, kw, expected):
    assert default_output_format(suffix, decoded, **kw) == expected


# ------------------------------------------------------------------------------------------- XMP and IPTC


def test_reset_xmp_orientation():
    assert b'tiff:Orientation="1"' in reset_xmp_orientation(xmp_packet(6))
    assert b"<tiff:Orientation>1</tiff:Orientation>" in reset_xmp_orientation(xmp_packet(8, form="element"))
    assert reset_xmp_orientation(b"<x tiff:Orientation = '5'/>") == b"<x tiff:Orientation = '1'/>"
    assert reset_xmp_orientation(xmp_packet(6).decode()) == reset_xmp_orientation(xmp_packet(6))  # str accepted
    assert reset_xmp_orientation(b"<x exif:Orientation='6' tiff:ImageWidth='6'/>") == (
        b"<x exif:Orientation='6' tiff:ImageWidth='6'/>")
    assert reset_xmp_orientation(None) is None and reset_xmp_orientation(b"") is None


def test_jpeg_metadata_captured(tmp_path):
    li = load_full(tagged_jpeg(tmp_path / "t.jpg", xmp=xmp_packet(6)))
    assert li.iptc == IPTC
    assert b'tiff:Orientation="1"' in li.xmp and b'tiff:Orientation="6"' not in li.xmp
    assert li.icc == srgb_icc() and li.exif is not None
    assert_upright(li.original)


@pytest.mark.parametrize("ext,keeps_iptc", [("jpg", True), ("png", True), ("tif", True), ("webp", False)]
                         + ([("avif", False)] if HAS_AVIF else []))
def test_metadata_round_trip(tmp_path, ext, keeps_iptc):
    li = load_full(tagged_jpeg(tmp_path / "t.jpg", xmp=xmp_packet(6)))
    crop = crop_image(li.original, (0, 0, 40, 30))
    data = encode_image(crop, ext, exif=li.exif, icc=li.icc, xmp=li.xmp, iptc=li.iptc)
    back = load_full(data)
    assert back.full_size == (40, 30)  # upright: neither EXIF nor XMP rotates it again
    assert close(back.image.getpixel((4, 4)), RED, 20)
    assert back.icc == srgb_icc()
    assert back.camera == {"make": "Cam"} and Image.Exif().load(back.exif) is None
    exif = Image.Exif()
    exif.load(back.exif)
    assert exif[0x0112] == 1
    assert b"Zo\xc3\xab Photographer" in back.xmp and b'tiff:Orientation="1"' in back.xmp
    assert back.iptc == (IPTC if keeps_iptc else None)
    if ext in ("jpg", "tif"):  # and Pillow's independent IPTC reader agrees
        assert IptcImagePlugin.getiptcinfo(opened(data))[(2, 120)] == "Ünïcödé caption".encode()


def test_jpeg_segment_layout(tmp_path):
    li = load_full(tagged_jpeg(tmp_path / "t.jpg", xmp=xmp_packet(6)))
    data = encode_image(li.original, "jpg", exif=li.exif, icc=li.icc, xmp=li.xmp, iptc=li.iptc)
    markers = [(m, p[:14]) for m, p in jpeg_segments(data)]
    app1 = [p for m, p in jpeg_segments(data) if m == 0xE1]
    assert [p[:6] for p in app1] == [b"Exif\x00\x00", b"http:/"]  # EXIF first, then XMP
    assert (0xED, b"Photoshop 3.0\x00") in markers
    assert sum(m == 0xE2 for m, _ in markers) == 1  # one ICC segment


@pytest.mark.parametrize("ext", ["jpg", "png", "webp", "tif"] + (["avif"] if HAS_AVIF else []))
def test_strip_drops_all_metadata(tmp_path, ext):
    li = load_full(tagged_jpeg(tmp_path / "t.jpg", xmp=xmp_packet(6), comment=b"private note"))
    data = encode_image(li.original, ext, exif=None, icc=None, xmp=None, iptc=None)
    back = load_full(data)
    assert (back.exif, back.icc, back.xmp, back.iptc) == (None, None, None, None)
    info = opened(data).info
    assert not {"exif", "icc_profile", "xmp", "photoshop", "comment", "XML:com.adobe.xmp"} & set(info)
    if ext == "jpg":
        assert {m for m, _ in jpeg_segments(data)} & {0xE1, 0xE2, 0xED, 0xFE} == set()
    assert b"private note" not in data and b"Cam" not in data and b"caption" not in data


def test_xmp_only_orientation_is_reset_in_the_output(tmp_path):
    """No EXIF orientation, only XMP's (Pillow honours it): applied once, and the written XMP says 1."""
    stored = np.ascontiguousarray(stored_for(upright_array(60, 40), 6))
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    path = tmp_path / "x.jpg"
    path.write_bytes(data[:2] + segment(0xE1, b"http://ns.adobe.com/xap/1.0/\x00" + xmp_packet(6)) + data[2:])
    li = load_full(path)
    assert li.full_size == (60, 40)
    assert_upright(li.original)
    for ext in ("jpg", "png", "webp", "tif"):
        back = load_full(encode_image(li.original, ext, exif=li.exif, xmp=li.xmp))
        assert back.full_size == (60, 40), ext
        assert_upright(back.image)


def exif_with_sub_ifd(width=900, height=600):
    exif = Image.Exif()
    exif[0x010F] = "Cam"
    sub = exif.get_ifd(0x8769)
    sub[0xA002], sub[0xA003], sub[0x9003] = width, height, "2020:01:02 03:04:05"
    return exif.tobytes()


@pytest.mark.parametrize("ext", ["jpg", "png", "webp", "tif"])
def test_a_crop_states_its_own_pixel_size_in_exif(ext):
    """PixelXDimension/PixelYDimension said the whole photo's size (900 x 600) in every re-encoded crop."""
    data = encode_image(Image.fromarray(upright_array(60, 40)), ext, exif=exif_with_sub_ifd())
    sub = opened(data).getexif().get_ifd(0x8769)
    assert (sub[0xA002], sub[0xA003]) == (60, 40) and sub[0x9003] == "2020:01:02 03:04:05"


@pytest.mark.parametrize("src", ["png", "jpg", "tif"])
def test_a_re_encoded_crop_keeps_the_source_resolution(tmp_path, src):
    """A 300 dpi photo's re-encoded crop said no resolution at all in PNG and JPEG (TIFF keeps it with the
    source's EXIF tags)."""
    path = tmp_path / f"p.{src}"
    Image.fromarray(upright_array(60, 40)).save(path, dpi=(300, 300))
    crop = load_full(path).original.crop((0, 0, 30, 20))
    for ext in ("png", "jpg"):
        assert [round(v) for v in opened(encode_image(crop, ext)).info["dpi"]] == [300, 300], (src, ext)


def test_a_compressed_tiff_with_an_exif_sub_ifd_is_written_uncompressed(tmp_path):
    """libtiff (every TIFF compression) cannot write an EXIF sub-IFD ("Error setting from dictionary"): a crop of
    an LZW camera TIFF with EXIF failed to write, so the photo was lost. It is now written uncompressed, the
    metadata whole; without a sub-IFD the compression stays."""
    Image.fromarray(upright_array(60, 40)).save(tmp_path / "lzw.tif", compression="tiff_lzw")
    crop = load_full(tmp_path / "lzw.tif").original.crop((0, 0, 30, 20))
    back = opened(encode_image(crop, "tif", exif=exif_with_sub_ifd()))
    assert back.info["compression"] == "raw" and back.getexif().get_ifd(0x8769)[0x9003] == "2020:01:02 03:04:05"
    assert opened(encode_image(crop, "tif", exif=exif_with(1, make="Cam"))).info["compression"] == "tiff_lzw"


@pytest.mark.parametrize("ext", ["jpg", "png", "webp", "tif"])
def test_encode_resets_a_raw_xmp_orientation(ext):
    """A caller passing the source's XMP as is still gets orientation 1 written (the pixels are upright)."""
    data = encode_image(Image.fromarray(upright_array(60, 40)), ext, xmp=xmp_packet(6, form="element"))
    back = load_full(data)
    assert b"<tiff:Orientation>1</tiff:Orientation>" in back.xmp
    assert back.full_size == (60, 40)
    assert_upright(back.image)


def test_xmp_and_iptc_read_from_png_tiff_webp(tmp_path):
    img = Image.fromarray(upright_array(30, 20))
    # TIFF: XMP in tag 700, IPTC as LONGs in tag 33723 (how Photoshop writes it: the IIM bytes, padded)
    padded = IPTC + b"\x00" * (-len(IPTC) % 4)
    xmp = xmp_packet(3)
    (tmp_path / "t.tif").write_bytes(tiff_file(upright_array(30, 20), [(700, 1, len(xmp), xmp),
                                                                       (33723, 4, len(padded) // 4, padded)]))
    li = load_full(tmp_path / "t.tif")
    assert li.iptc == padded and b'tiff:Orientation="1"' in li.xmp
    assert li.full_size == (30, 20)  # the XMP orientation 3 was applied, once (a 180 degree turn)
    assert close(li.image.getpixel((26, 17)), RED)
    # IPTC as UNDEFINED (how Pillow and ExifTool write it)
    ifd = TiffImagePlugin.ImageFileDirectory_v2()
    ifd[33723] = IPTC
    img.save(tmp_path / "u.tif", tiffinfo=ifd)
    assert load_image(tmp_path / "u.tif").iptc == IPTC
    # PNG: iTXt XMP and the ImageMagick/ExifTool raw IPTC profile
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_itxt("XML:com.adobe.xmp", xmp_packet(1).decode(), zip=False)
    info.add_text("Raw profile type iptc", "\niptc\n" + f"{len(IPTC):8d}\n" + IPTC.hex() + "\n", zip=True)
    img.save(tmp_path / "t.png", pnginfo=info)
    li = load_image(tmp_path / "t.png")
    assert li.iptc == IPTC and b"Zo\xc3\xab" in li.xmp
    img.save(tmp_path / "t.webp", xmp=xmp_packet(1))
    assert b"Zo\xc3\xab" in load_image(tmp_path / "t.webp").xmp


def test_garbage_iptc_is_ignored(tmp_path):
    li = load_image(tagged_jpeg(tmp_path / "t.jpg", iptc=b"\x00\x01garbage"))
    assert li.iptc is None


def test_oversized_metadata_dropped_for_jpeg_only():
    img = Image.new("RGB", (8, 8))
    big_xmp = b"<x:xmpmeta>" + b" " * 70_000 + b"</x:xmpmeta>"
    exif = Image.Exif()
    exif[0x010F] = "Cam"
    exif.get_ifd(0x8769)[0x927C] = b"\x01" * 70_000  # a huge MakerNote, possible in TIFF/PNG/HEIC sources
    exif = exif.tobytes()
    data = encode_image(img, "jpg", exif=exif, xmp=big_xmp)
    assert "xmp" not in opened(data).info and "exif" not in opened(data).info
    back = opened(encode_image(img, "png", exif=exif, xmp=big_xmp))
    assert back.info["xmp"] == big_xmp and back.getexif()[0x010F] == "Cam"


# ------------------------------------------------------------------------------------------------- 16 bits


def png16(a):
    """A 16-bit PNG (gray, gray+alpha, RGB or RGBA by the last axis) written by hand: Pillow cannot write these."""
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[a.shape[2] if a.ndim == 3 else 1]

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in a)
    ihdr = struct.pack(">IIBBBBB", a.shape[1], a.shape[0], 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def tiff_file(a, extra=()):
    """An uncompressed little-endian RGB TIFF (8 or 16 bits per sample, by ``a``'s dtype) written by hand, with
    ``extra`` (tag, type, count, payload bytes) entries: Pillow writes neither 16-bit RGB nor LONG-typed IPTC."""
    h, w, _ = a.shape
    bits = a.dtype.itemsize * 8
    pixels = a.astype(f"<u{a.dtype.itemsize}").tobytes()
    short = lambda *v: struct.pack(f"<{len(v)}H", *v)  # noqa: E731
    entries = sorted([(256, 3, 1, short(w)), (257, 3, 1, short(h)), (258, 3, 3, short(bits, bits, bits)),
                      (259, 3, 1, short(1)), (262, 3, 1, short(2)), (273, 4, 1, None), (277, 3, 1, short(3)),
                      (278, 3, 1, short(h)), (279, 4, 1, struct.pack("<I", len(pixels))), *extra])
    heap_at = 8 + 2 + 12 * len(entries) + 4
    heap, offsets = b"", {}
    for tag, _, _, payload in entries:
        if payload is not None and len(payload) > 4:
            offsets[tag] = heap_at + len(heap)
            heap += payload + b"\x00" * (len(payload) % 2)
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, payload in entries:
        payload = struct.pack("<I", heap_at + len(heap)) if tag == 273 else payload
        field = struct.pack("<I", offsets[tag]) if tag in offsets else payload.ljust(4, b"\x00")
        ifd += struct.pack("<HHI", tag, kind, count) + field
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + heap + pixels


def gray16():
    a = np.zeros((20, 30), np.uint16)
    a[:, :10] = 1000
    a[:, 10:20] = 40000
    a[:, 20:] = 65535
    a[0, 0] = 1  # below 8-bit resolution: lost if reduced
    return a


def test_16bit_gray_keeps_its_depth(tmp_path):
    (tmp_path / "g.png").write_bytes(png16(gray16()))
    li = load_full(tmp_path / "g.png")
    assert li.bit_depth == 16 and not li.reduced_depth
    assert li.original.mode == "I;16" and li.image.mode == "RGB"
    crop = crop_image(li.original, (0, 0, 30, 20), size=(15, 10))  # resized too
    assert crop.mode == "I;16"
    for ext in ("png", "tif"):
        back = opened(save_image(li.original, tmp_path / f"out.{ext}"))
        assert back.mode.startswith("I;16"), ext
        assert np.array_equal(np.asarray(back).astype(np.uint16), gray16()), ext
    jpg = opened(encode_image(li.original, "jpg"))
    assert jpg.mode == "L" and close([jpg.getpixel((15, 5))], [round(40000 / 257)], 2)
    assert opened(encode_image(li.original, "webp")).mode == "RGB"


def test_16bit_big_endian_gray_tiff_keeps_values(tmp_path):
    Image.frombytes("I;16B", (30, 20), gray16().astype(">u2").tobytes()).save(tmp_path / "g.tif")
    li = load_full(tmp_path / "g.tif")
    assert li.original.mode == "I;16" and not li.reduced_depth
    assert np.array_equal(np.asarray(li.original).astype(np.uint16), gray16())


@pytest.mark.parametrize("kind", ["png-rgb", "png-rgba", "png-la", "tiff-rgb"])
def test_16bit_colour_is_reduced_and_says_so(tmp_path, kind):
    g = gray16()
    channels = {"png-rgb": 3, "png-rgba": 4, "png-la": 2, "tiff-rgb": 3}[kind]
    a = np.stack([g] * channels, axis=-1)
    if channels in (2, 4):
        a[..., -1] = 65535
    path = tmp_path / ("d.tif" if kind.startswith("tiff") else "d.png")
    path.write_bytes(tiff_file(a) if kind.startswith("tiff") else png16(a))
    for li in (load_image(path), load_full(path)):
        assert li.bit_depth == 16 and li.reduced_depth
        assert close(li.image.getpixel((15, 5)), (155, 155, 155), 1)  # 40000 / 257


def test_eight_bit_and_float_depths(tmp_path):
    Image.new("RGB", (4, 4), GRAY).save(tmp_path / "e.png")
    li = load_image(tmp_path / "e.png")
    assert li.bit_depth == 8 and not li.reduced_depth
    Image.new("F", (4, 4), 0.5).save(tmp_path / "f.tif")
    li = load_full(tmp_path / "f.tif")
    assert li.bit_depth == 32 and li.reduced_depth and li.original.mode == "L"


# ----------------------------------------------------------------------------------------- names and errors


@pytest.mark.parametrize("raw,shown", [
    ("a\nb.jpg", "a\\x0ab.jpg"),
    ("\x1b[2J\x1b]0;pwned\x07.jpg", "\\x1b[2J\\x1b]0;pwned\\x07.jpg"),
    ("tab\there\r", "tab\\x09here\\x0d"),
    ("del\x7f c1\x9b", "del\\x7f c1\\x9b"),
    ("photo\u202egpj.exe", "photo\\u202egpj.exe"),
    ("iso\u2066late\u2069 \u200fmark", "iso\\u2066late\\u2069 \\u200fmark"),
    ("line\u2028sep", "line\\u2028sep"),
    ("Ünïcödé 写真 🙂 café.jpg", "Ünïcödé 写真 🙂 café.jpg"),
    ("C:\\Users\\me\\p.jpg", "C:\\Users\\me\\p.jpg"),
])
def test_safe_name(raw, shown):
    assert safe_name(raw) == shown
    assert safe_name(safe_name(raw)) == shown  # idempotent


def test_safe_name_bytes_and_paths(tmp_path):
    undecodable = os.fsdecode(b"caf\xe9\n.jpg")  # a Latin-1 name on a UTF-8 system
    assert safe_name(undecodable) == "caf\\xe9\\x0a.jpg"
    assert safe_name(b"a\x1bb") == "a\\x1bb"
    assert safe_name(tmp_path / "x\ny") == str(tmp_path) + "/x\\x0ay"
    safe_name(undecodable).encode("utf-8")  # printable without UnicodeEncodeError


def test_error_messages_escape_control_characters(tmp_path):
    with pytest.raises(ImageError) as ei:
        save_image(Image.new("RGB", (4, 4)), tmp_path / "evil\x1b[31m\nname.xyz")
    msg = str(ei.value)
    assert "\\x1b[31m" in msg and "\\x0aname.xyz" in msg and "\x1b" not in msg and "\n" not in msg
    assert str(ImageError("bad\x1b[0m \u202eeman")) == "bad\\x1b[0m \\u202eeman"


# ---------------------------------------------------------------------------------------------- camera fields


def camera_exif(**overrides):
    exif = Image.Exif()
    exif[0x010F] = "Canon\x00"
    exif[0x0110] = " Canon EOS R5 "
    sub = exif.get_ifd(0x8769)
    sub[0xA434] = "RF24-70mm F2.8 L IS USM"
    sub[0x9003] = "2023:08:14 18:42:07"
    sub[0x9011] = "+02:00"
    sub[0x829D] = IFDRational(28, 10)
    sub[0x829A] = IFDRational(1, 250)
    sub[0x8827] = 400
    sub[0x920A] = IFDRational(50, 1)
    sub[0xA405] = 50
    for tag, value in overrides.items():
        sub[int(tag[1:], 16)] = value
    return exif.tobytes()


def test_camera_fields(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "c.jpg", exif=camera_exif())
    assert load_image(tmp_path / "c.jpg").camera == {
        "make": "Canon", "model": "Canon EOS R5", "lens": "RF24-70mm F2.8 L IS USM",
        "datetime_original": "2023-08-14T18:42:07+02:00", "f_number": 2.8, "exposure_time": 0.004, "iso": 400,
        "focal_length": 50.0, "focal_length_35mm": 50,
    }


def test_camera_fields_invalid_values_left_out():
    fields = camera_fields(camera_exif(x829D=IFDRational(0, 0), x9003="0000:00:00 00:00:00", x8827=0,
                                       x9011="garbage"))
    assert "f_number" not in fields and "datetime_original" not in fields and "iso" not in fields
    assert fields["make"] == "Canon"
    assert camera_fields(None) == {} and camera_fields(b"") == {}
    assert camera_fields(b"Exif\x00\x00not a tiff header") == {}
