"""Lossless JPEG crops (smartcrop.jpegcrop): coefficients, pixels, metadata, orientation, snapping, fallback.

Fixtures are drawn here with Pillow.  Coefficients are read back with jpeglib's public API (``read_dct``), which
is independent of the C entry points jpegcrop calls.  Tests that need the backend skip when jpeglib is not
installed (it is the optional ``lossless`` extra); structure validation, box snapping and the fallback run
always.
"""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image, ImageOps

from smartcrop import jpegcrop
from smartcrop.jpegcrop import LosslessUnsupported, lossless_crop, snap_box

SUBSAMPLING = {"444": 0, "422": 1, "420": 2}
IMCU = {"444": (8, 8), "422": (16, 8), "420": (16, 16)}
ICC = b"\x00\x01fake-icc-profile" * 4700  # ~80 KB: Pillow splits it over two APP2 chunks
XMP = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF/></x:xmpmeta>'
IPTC = b"Photoshop 3.0\x008BIM\x04\x04\x00\x00\x00\x00\x00\x07\x1c\x02x\x00\x02hi"


def _turbo_loads() -> bool:
    return jpegcrop._TurboBackend.load() is not None


# every backend test runs with each backend this machine has: jpeglib (pip) and libjpeg-turbo (system library)
@pytest.fixture(autouse=True, params=["jpeglib", "turbo"])
def backend(request, monkeypatch):
    monkeypatch.setattr(jpegcrop, "_backend_cache", None)
    monkeypatch.setenv("SMARTCROP_JPEG_BACKEND", request.param)
    return request.param


def needs_backend(which=None):
    """Skip unless the parametrised backend is installed (``which``: only for that backend).  Coefficients are
    read back with jpeglib in either case, so it is needed too."""
    import os

    kind = os.environ["SMARTCROP_JPEG_BACKEND"]
    if which is not None and kind != which:
        pytest.skip(f"specific to the {which} backend")
    pytest.importorskip("jpeglib", reason="lossless crops need the optional jpeglib backend (the lossless extra)")
    if kind == "turbo" and not _turbo_loads():
        pytest.skip("libjpeg-turbo backend not installed (the turbo extra and the system "
                    "libturbojpeg)")
    if not jpegcrop.available():
        pytest.skip(jpegcrop.unavailable_reason())
    assert jpegcrop.backend_name() == ("libjpeg-turbo" if kind == "turbo" else "jpeglib")


def photo(size, seed=0, mode="RGB"):
    """Gradient + blocky texture + noise, so every DCT block has non-trivial coefficients."""
    w, h = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([255 * x / w, 255 * y / h, 128 + 100 * np.sin(x / 7.0 + y / 11.0)], -1)
    tex = np.kron(rng.normal(0, 40, (h // 5 + 1, w // 5 + 1, 3)), np.ones((5, 5, 1)))[:h, :w]
    arr = np.clip(base + tex + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(arr)
    return im.convert(mode) if mode != "RGB" else im


def segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def add_segments(data: bytes, *segs: bytes) -> bytes:
    """Insert segments right after the APPn segments that follow SOI."""
    pos = 2
    while data[pos] == 0xFF and 0xE0 <= data[pos + 1] <= 0xEF:
        pos += 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]
    return data[:pos] + b"".join(segs) + data[pos:]


def make_jpeg(size=(203, 151), sub="420", orientation=None, progressive=False, restart=False, mode="RGB",
              metadata=True, seed=0, quality=90) -> bytes:
    im = photo(size, seed, mode)
    kw = dict(quality=quality, progressive=progressive)
    if mode != "L":
        kw["subsampling"] = SUBSAMPLING[sub]
    if metadata:
        exif = Image.Exif()
        exif[0x010F] = "SmartcropTest"
        exif[0x0112] = orientation or 1
        kw.update(exif=exif.tobytes(), icc_profile=ICC, comment=b"a comment")
    if restart:
        kw["restart_marker_rows"] = 1
    buf = io.BytesIO()
    im.save(buf, "JPEG", **kw)
    data = buf.getvalue()
    if restart and b"\xff\xdd" not in data[:data.find(b"\xff\xda")]:
        pytest.skip("this Pillow cannot write restart markers")
    if metadata:
        data = add_segments(data, segment(0xE1, b"http://ns.adobe.com/xap/1.0/\x00" + XMP), segment(0xED, IPTC))
    return data


def header_segments(data: bytes) -> list[bytes]:
    """Raw APPn/COM segments before the first scan."""
    out, pos = [], 2
    while data[pos + 1] != 0xDA:
        end = pos + 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]
        if 0xE0 <= data[pos + 1] <= 0xEF or data[pos + 1] == 0xFE:
            out.append(data[pos:end])
        pos = end
    return out


def dct(tmp_path, data: bytes, name: str):
    """(components [Y, Cb, Cr] as block arrays, per-component quant tables) via jpeglib's public reader."""
    import jpeglib

    path = tmp_path / name
    path.write_bytes(data)
    j = jpeglib.read_dct(str(path))
    comps = [j.Y] + ([j.Cb, j.Cr] if j.has_chrominance else [])
    qts = [j.get_component_qt(i) for i in range(len(comps))]
    return comps, qts


def assert_blocks_equal(tmp_path, data, out, sbox, sub):
    """The crop's coefficients are the original's blocks at the crop's block offset, all of them."""
    src, qsrc = dct(tmp_path, data, "src.jpg")
    dst, qdst = dct(tmp_path, out, "dst.jpg")
    assert len(src) == len(dst)
    hmax, vmax = (1, 1) if len(src) == 1 else (IMCU[sub][0] // 8, IMCU[sub][1] // 8)
    x0, y0, x1, y1 = sbox
    for c, (a, b) in enumerate(zip(src, dst)):
        h, v = (hmax, vmax) if c == 0 else (1, 1)
        bx, by = x0 * h // (8 * hmax), y0 * v // (8 * vmax)
        nbx, nby = -(-(x1 - x0) * h // (8 * hmax)), -(-(y1 - y0) * v // (8 * vmax))
        assert b.shape[:2] == (nby, nbx)
        np.testing.assert_array_equal(b, a[by:by + nby, bx:bx + nbx])
        np.testing.assert_array_equal(qdst[c], qsrc[c])


def pixels(data: bytes, upright=False) -> np.ndarray:
    im = Image.open(io.BytesIO(data))
    if upright:
        im = ImageOps.exif_transpose(im)
    return np.asarray(im.convert("RGB"), dtype=np.int16)


def luma(data: bytes) -> np.ndarray:
    """Decoded Y plane (stored orientation): no chroma upsampling involved, so equal up to the crop's edges."""
    im = Image.open(io.BytesIO(data))
    if im.mode != "L":
        im.draft("YCbCr", im.size)
        assert im.mode == "YCbCr"
    return np.asarray(im.getchannel(0), dtype=np.int16)[..., None]


def assert_pixels_equal(orig: np.ndarray, crop: np.ndarray, box, margin: int):
    x0, y0, x1, y1 = box
    ref = orig[y0:y1, x0:x1]
    assert crop.shape == ref.shape
    m = margin
    inner_ref, inner = ref[m:ref.shape[0] - m, m:ref.shape[1] - m], crop[m:crop.shape[0] - m, m:crop.shape[1] - m]
    assert inner.size > 0
    np.testing.assert_array_equal(inner, inner_ref)


# ------------------------------------------------------------------------------ coefficients and pixels


@pytest.mark.parametrize("sub", ["444", "422", "420"])
@pytest.mark.parametrize("kind", ["baseline", "progressive", "restart", "progressive+restart"])
def test_crop_keeps_coefficients_and_pixels(tmp_path, sub, kind):
    needs_backend()
    data = make_jpeg(sub=sub, progressive="progressive" in kind, restart="restart" in kind)
    box = (37, 21, 37 + 128, 21 + 72)  # 16:9, corner off the grid
    out, used = lossless_crop(data, box, 1)
    mw, mh = IMCU[sub]
    assert used == (37 // mw * mw, 21 // mh * mh, 37 // mw * mw + 128, 21 // mh * mh + 72)
    assert Image.open(io.BytesIO(out)).size == (128, 72)
    assert_blocks_equal(tmp_path, data, out, used, sub)
    assert_pixels_equal(luma(data), luma(out), used, margin=0)
    # 4:4:4 has no chroma upsampling: every pixel is equal; otherwise skip the one-block border it reads across
    assert_pixels_equal(pixels(data), pixels(out), used, margin=0 if sub == "444" else 8)


# jpeglib's samp_factor rows are (v, h): the files hold luma 2×2 (h×v) and chroma 2×1 / 1×2
@pytest.mark.parametrize("factors,grid", [(((2, 2), (1, 2), (1, 2)), {"jpeglib": (8, 16), "turbo": (16, 16)}),
                                          (((2, 2), (2, 1), (2, 1)), {"jpeglib": (16, 8), "turbo": (16, 16)})])
def test_non_standard_sampling_factors_crop_to_the_size_asked(tmp_path, backend, factors, grid):
    """Luma sampled 2×2 with chroma 2×1 or 1×2 (cameras write such files): libjpeg-turbo's transform cuts on
    the raw factors' 16 × 16 grid (given the reduced one it moved the origin 8 px and widened the crop, the
    reported box being false); jpeglib's coefficient copy cuts on the reduced grid."""
    needs_backend()
    import jpeglib

    im = jpeglib.from_spatial(np.ascontiguousarray(photo((200, 152))))
    im.samp_factor = np.array(factors)
    im.write_spatial(str(tmp_path / "odd.jpg"), qt=90)
    data = (tmp_path / "odd.jpg").read_bytes()
    box = (24, 24, 24 + 100, 24 + 56)
    out, used = lossless_crop(data, box, 1)
    gw, gh = grid[backend]
    assert used == (24 // gw * gw, 24 // gh * gh, 24 // gw * gw + 100, 24 // gh * gh + 56)
    assert Image.open(io.BytesIO(out)).size == (100, 56)
    assert_pixels_equal(luma(data), luma(out), used, margin=0)


@pytest.mark.parametrize("sub", ["444", "420"])
def test_decoded_pixels_differ_only_near_the_border(sub):
    """Guards the margin used above: with 4:2:0 the border does differ (so the check is not vacuous), and
    inside it nothing does."""
    needs_backend()
    data = make_jpeg(size=(160, 120), sub=sub)
    out, used = lossless_crop(data, (16, 16, 144, 104), 1)
    diff = np.abs(pixels(out) - pixels(data)[16:104, 16:144]).max(axis=2)
    if sub == "444":
        assert diff.max() == 0
    else:
        assert diff.max() > 0
        assert diff[8:-8, 8:-8].max() == 0


@pytest.mark.parametrize("size,box", [
    ((203, 151), (187, 135, 203, 151)),  # bottom-right corner, partial blocks, odd sizes
    ((203, 151), (0, 0, 203, 151)),  # the whole image
    ((203, 151), (50, 3, 51, 4)),  # 1x1
    ((97, 255), (13, 201, 90, 254)),
])
@pytest.mark.parametrize("sub", ["444", "420"])
def test_odd_sizes_and_edges(tmp_path, size, box, sub):
    needs_backend()
    data = make_jpeg(size=size, sub=sub, seed=3)
    out, used = lossless_crop(data, box, 1)
    w, h = box[2] - box[0], box[3] - box[1]
    assert (used[2] - used[0], used[3] - used[1]) == (w, h)
    assert 0 <= box[0] - used[0] < IMCU[sub][0] and 0 <= box[1] - used[1] < IMCU[sub][1]
    assert Image.open(io.BytesIO(out)).size == (w, h)
    assert_blocks_equal(tmp_path, data, out, used, sub)
    assert_pixels_equal(luma(data), luma(out), used, margin=0)
    if min(w, h) > 16 or sub == "444":
        assert_pixels_equal(pixels(data), pixels(out), used, margin=0 if sub == "444" else 8)


def test_grayscale(tmp_path):
    needs_backend()
    data = make_jpeg(size=(150, 101), mode="L")
    assert jpegcrop.imcu_size(data) == (8, 8)
    out, used = lossless_crop(data, (11, 13, 140, 100), 1)
    assert used == (8, 8, 137, 95)
    assert Image.open(io.BytesIO(out)).mode == "L"
    assert_blocks_equal(tmp_path, data, out, used, "444")
    assert_pixels_equal(pixels(data), pixels(out), used, margin=0)


# ------------------------------------------------------------------------------------ orientation, metadata


@pytest.mark.parametrize("orientation", range(1, 9))
def test_all_exif_orientations(tmp_path, orientation):
    needs_backend()
    data = make_jpeg(size=(203, 151), sub="422", orientation=orientation, seed=orientation)
    assert jpegcrop.read_orientation(data) == orientation
    upright = pixels(data, upright=True)
    full = (upright.shape[1], upright.shape[0])
    assert jpegcrop.upright_size(data) == full
    box = (29, 37, 29 + 96, 37 + 54)
    out, used = lossless_crop(data, box)  # orientation read from the file
    assert (used[2] - used[0], used[3] - used[1]) == (96, 54)
    assert all(abs(u - b) < 16 for u, b in zip(used, box))
    assert used == snap_box(box, full, orientation, (16, 8))
    # the output keeps the tag: its upright view is exactly the upright box used
    assert jpegcrop.read_orientation(out) == orientation
    assert_pixels_equal(upright, pixels(out, upright=True), used, margin=8)
    # and in stored orientation it is the original's blocks
    stored = Image.open(io.BytesIO(data)).size
    sbox = jpegcrop._map_box(used, orientation, stored, to_stored=True)
    assert sbox[0] % 16 == 0 and sbox[1] % 8 == 0
    assert_blocks_equal(tmp_path, data, out, sbox, "422")


def test_damaged_scan_data_is_re_encoded_not_warned_about_without_a_name(recwarn, capfd):
    """libjpeg steps over damaged entropy-coded data with a warning, which PyTurboJPEG raised as a bare Python
    UserWarning and jpeglib's libjpeg printed on stderr, naming no file: the crop is now refused, so the
    caller re-encodes it from the decoded photo, and nothing reaches stderr."""
    needs_backend()
    data = bytearray(make_jpeg(size=(320, 240), seed=5))
    mid = len(data) * 9 // 10
    for i in range(mid, mid + 40, 4):
        data[i] ^= 0x5A
    with pytest.raises(LosslessUnsupported, match="damaged JPEG data"):
        lossless_crop(bytes(data), (16, 16, 200, 150))
    assert not [w for w in recwarn if "turbojpeg" in w.filename]
    lossless_crop(make_jpeg(size=(320, 240), seed=5), (16, 16, 200, 150))  # undamaged: cropped
    assert "Corrupt" not in capfd.readouterr().err


def test_metadata_segments_copied_verbatim():
    needs_backend()
    data = make_jpeg(orientation=6)
    out, _ = lossless_crop(data, (10, 10, 100, 100), 6)
    src, dst = header_segments(data), header_segments(out)
    assert dst == src  # EXIF, XMP, ICC chunks, IPTC and the comment, same bytes, same order, nothing added
    kinds = [s[1] for s in dst]
    assert kinds.count(0xE2) == 2 and 0xED in kinds and 0xFE in kinds
    im = Image.open(io.BytesIO(out))
    assert im.info["icc_profile"] == ICC
    assert im.getexif()[0x0112] == 6 and im.getexif()[0x010F] == "SmartcropTest"
    assert XMP in out and im.info.get("comment") == b"a comment"


def exif_with_thumbnail(thumb: bytes, width: int, height: int, order: str = "<") -> bytes:
    """An EXIF APP1 payload written by hand (Pillow writes no IFD1): Make, an EXIF IFD with PixelXDimension
    (SHORT) and PixelYDimension (LONG), and IFD1 holding a JPEG thumbnail."""
    def entry(tag, typ, count, value: bytes):
        return struct.pack(order + "HHI", tag, typ, count) + value.ljust(4, b"\x00")

    def ifd(entries, nxt):
        return struct.pack(order + "H", len(entries)) + b"".join(entries) + struct.pack(order + "I", nxt)

    ifd0 = ifd([entry(0x010F, 2, 4, b"Cam\x00"), entry(0x8769, 4, 1, struct.pack(order + "I", 38))], 68)
    sub = ifd([entry(0xA002, 3, 1, struct.pack(order + "H", width)),
               entry(0xA003, 4, 1, struct.pack(order + "I", height))], 0)
    ifd1 = ifd([entry(0x0201, 4, 1, struct.pack(order + "I", 98)),
                entry(0x0202, 4, 1, struct.pack(order + "I", len(thumb)))], 0)
    head = (b"II*\x00" if order == "<" else b"MM\x00*") + struct.pack(order + "I", 8)
    return b"Exif\x00\x00" + head + ifd0 + sub + ifd1 + thumb


@pytest.mark.parametrize("order", ["<", ">"])
def test_lossless_crop_drops_the_exif_thumbnail_and_states_its_size(order):
    """A lossless crop kept the source's EXIF thumbnail (the whole uncropped photo, which file browsers show:
    what the crop cut away stayed visible) and its pixel size; re-encoded crops had neither."""
    needs_backend()
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (255, 0, 0)).save(buf, "JPEG")
    thumb = buf.getvalue()
    data = make_jpeg(size=(320, 240), metadata=False)
    app1 = exif_with_thumbnail(thumb, 320, 240, order)
    data = data[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + data[2:]
    assert Image.open(io.BytesIO(data)).getexif().get_ifd(0x8769)[0xA002] == 320
    out, used = lossless_crop(data, (16, 16, 16 + 160, 16 + 90))
    assert out.find(b"\xff\xd8", 2) == -1  # no thumbnail's SOI left
    (seg,) = [s for s in header_segments(out) if s[1] == 0xE1]
    assert len(seg) == len(app1) + 4  # edited in place: no offset moved
    exif = Image.open(io.BytesIO(out)).getexif()
    assert exif[0x010F] == "Cam" and not exif.get_ifd(1)
    sub = exif.get_ifd(0x8769)
    assert (sub[0xA002], sub[0xA003]) == (160, 90)


def test_component_ids_and_quant_tables_follow_the_original(tmp_path):
    """Adobe-style RGB ids ('R','G','B') must survive, or decoders would guess another colour space."""
    needs_backend()
    data = bytearray(make_jpeg(sub="444", metadata=False))
    sof = data.find(b"\xff\xc0")
    for i, cid in enumerate(b"RGB"):
        data[sof + 10 + 3 * i] = cid
    sos = data.find(b"\xff\xda")
    for i, cid in enumerate(b"RGB"):
        data[sos + 5 + 2 * i] = cid
    data = bytes(data)
    out, used = lossless_crop(data, (8, 8, 72, 72), 1)
    osof = out.find(b"\xff\xc0")
    assert bytes(out[osof + 10 + 3 * i] for i in range(3)) == b"RGB"
    assert_pixels_equal(pixels(data), pixels(out), used, margin=0)


def test_concurrent_crops_agree():
    """The runner crops from worker threads: the backend keeps no shared state between calls."""
    from concurrent.futures import ThreadPoolExecutor

    needs_backend()
    data = [make_jpeg(size=(160, 120), sub=sub, seed=i) for i, sub in enumerate(["444", "422", "420"] * 2)]
    boxes = [(i * 3, i * 5, i * 3 + 90, i * 5 + 60) for i in range(len(data))]
    expected = [lossless_crop(d, b, 1) for d, b in zip(data, boxes)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda db: lossless_crop(db[0], db[1], 1), zip(data * 3, boxes * 3)))
    assert got == expected * 3


def test_mpf_index_is_dropped():
    needs_backend()
    data = add_segments(make_jpeg(metadata=False), segment(0xE2, b"MPF\x00II*\x00\x08\x00\x00\x00"))
    out, _ = lossless_crop(data, (0, 0, 64, 64), 1)
    assert b"MPF\x00" not in out


# -------------------------------------------------------------------------------------------- snapping


@pytest.mark.parametrize("orientation,expected", [
    (1, (32, 16, 132, 66)),  # stored = upright: floor to the (16, 8) grid
    (3, (40, 22, 140, 72)),  # 180 deg: stored box (163, 131, 263, 181) -> (160, 128, ...): upright moves +3, +3
    (6, (44, 16, 144, 66)),  # stored box (19, 63, 69, 163) -> (16, 56, ...): upright x +7 (= hs - sy), y -3
    (8, (32, 26, 132, 76)),  # stored box (231, 37, 281, 137) -> (224, 32, ...): upright x -5, y +7
])
def test_snap_box_examples(orientation, expected):
    full = (300, 200) if orientation < 5 else (200, 300)  # upright size; stored is 300x200
    assert snap_box((37, 19, 137, 69), full, orientation, (16, 8)) == expected


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("imcu", [(8, 8), (16, 8), (16, 16)])
def test_snap_box_properties(orientation, imcu):
    rng = np.random.default_rng(orientation)
    full = (203, 151)
    stored = full if orientation < 5 else full[::-1]
    for _ in range(200):
        w, h = int(rng.integers(1, full[0] + 1)), int(rng.integers(1, full[1] + 1))
        x, y = int(rng.integers(0, full[0] - w + 1)), int(rng.integers(0, full[1] - h + 1))
        used = snap_box((x, y, x + w, y + h), full, orientation, imcu)
        assert (used[2] - used[0], used[3] - used[1]) == (w, h)  # exact size
        assert 0 <= used[0] and 0 <= used[1] and used[2] <= full[0] and used[3] <= full[1]
        sbox = jpegcrop._map_box(used, orientation, stored, to_stored=True)
        assert sbox[0] % imcu[0] == 0 and sbox[1] % imcu[1] == 0  # stored corner on the grid
        orig = jpegcrop._map_box((x, y, x + w, y + h), orientation, stored, to_stored=True)
        assert 0 <= orig[0] - sbox[0] < imcu[0] and 0 <= orig[1] - sbox[1] < imcu[1]  # floor, < one iMCU


def test_map_box_matches_pillow_transpose():
    """The stored<->upright box mapping agrees with Pillow's exif_transpose for every orientation."""
    stored = np.arange(7 * 5).reshape(5, 7)  # 7 wide, 5 high, all values distinct
    for orientation in range(1, 9):
        im = Image.fromarray(stored.astype(np.uint8), "L")
        exif = Image.Exif()
        exif[0x0112] = orientation
        im.info["exif"] = exif.tobytes()
        up = np.asarray(ImageOps.exif_transpose(im))
        box = (1, 2, 4, 3) if up.shape[1] > 4 else (1, 2, 3, 4)
        region = up[box[1]:box[3], box[0]:box[2]]
        sx0, sy0, sx1, sy1 = jpegcrop._map_box(box, orientation, (7, 5), to_stored=True)
        assert set(region.ravel()) == set(stored[sy0:sy1, sx0:sx1].ravel())
        assert jpegcrop._map_box((sx0, sy0, sx1, sy1), orientation, (7, 5), to_stored=False) == box


def test_snap_box_shifts_a_box_sticking_out_and_rejects_bad_input():
    assert snap_box((-5, 190, 45, 210), (300, 200), 1, (8, 8)) == (0, 176, 50, 196)
    assert snap_box((295.4, 0.4, 310.4, 10.4), (300, 200), 1, (16, 16)) == (272, 0, 287, 10)
    with pytest.raises(ValueError):
        snap_box((0, 0, 301, 10), (300, 200), 1, (8, 8))
    with pytest.raises(ValueError):
        snap_box((5, 5, 5, 10), (300, 200), 1, (8, 8))
    with pytest.raises(ValueError):
        snap_box((0, 0, 10, 10), (300, 200), 9, (8, 8))


def test_imcu_size_from_sampling_factors():
    for sub, imcu in IMCU.items():
        assert jpegcrop.imcu_size(make_jpeg(size=(40, 30), sub=sub, metadata=False)) == imcu


# ---------------------------------------------------------------------------------- unsupported / fallback


def patched(data: bytes, find: bytes, offset: int, value: int) -> bytes:
    b = bytearray(data)
    b[b.find(find) + offset] = value
    return bytes(b)


def unsupported_cases():
    good = make_jpeg(size=(64, 48), metadata=False)
    cmyk = io.BytesIO()
    photo((64, 48)).convert("CMYK").save(cmyk, "JPEG")
    sos = good.find(b"\xff\xda")
    return {
        "cmyk": cmyk.getvalue(),
        "arithmetic (SOF9)": patched(good, b"\xff\xc0", 1, 0xC9),
        "lossless (SOF3)": patched(good, b"\xff\xc0", 1, 0xC3),
        "12-bit": patched(good, b"\xff\xc0", 4, 12),
        "truncated": good[:len(good) * 2 // 3],
        "truncated header": good[:sos - 20],
        "not a jpeg": b"GIF89a" + bytes(100),
        "empty": b"",
        "bogus Huffman table": patched(good, b"\xff\xc4", 5, 0xFF),
        # three 1-bit codes (only two exist): libjpeg aborts building the decoding table
        "overfull Huffman table": good[:sos] + segment(0xC4, b"\x00" + bytes([3] + [0] * 15) + b"\x00\x01\x02")
        + good[sos:],
        "DC Huffman symbol > 15": good[:sos] + segment(0xC4, b"\x00" + bytes([0, 1] + [0] * 14) + b"\x10")
        + good[sos:],
        "undefined Huffman table": patched(good, b"\xff\xda", 6, 0x33),
        "zero height (DNL)": patched(patched(good, b"\xff\xc0", 5, 0), b"\xff\xc0", 6, 0),
        "second SOI": good[:sos] + b"\xff\xd8" + good[sos:],
        "garbage between segments": good[:sos] + b"\x00junk" + good[sos:],
        "bad progressive scan": patched(make_jpeg(size=(64, 48), metadata=False, progressive=True),
                                        b"\xff\xda", 12, 5),  # first DC scan (Ns=3) with Se=5
    }


CASES = unsupported_cases()


@pytest.mark.parametrize("name", list(CASES))
def test_unsupported_or_corrupt_files_raise_lossless_unsupported(name):
    """Runs without the backend: the Python validator rejects all of these before any C code sees them
    (jpeglib would crash the process on some of them)."""
    with pytest.raises(LosslessUnsupported) as err:
        jpegcrop.probe(CASES[name])
    assert str(err.value) and "\n" not in str(err.value)
    with pytest.raises(LosslessUnsupported):
        lossless_crop(CASES[name], (0, 0, 16, 16), 1)


def tiny_jpeg_with_ac(value: int) -> bytes:
    """A hand-made 8x8 grayscale baseline JPEG whose single block has DC 0 and one AC coefficient ``value``
    (Huffman-coded with an 11-bit magnitude category, which no 8-bit encoder would produce)."""
    assert 1024 <= value < 2048
    bits = "0" + "01" + format(value, "011b") + "00"  # DC cat 0 | AC symbol 0x0B + 11 bits | EOB
    bits += "1" * (-len(bits) % 8)
    scan = bytes(int(bits[i:i + 8], 2) for i in range(0, len(bits), 8))
    assert b"\xff" not in scan
    return (b"\xff\xd8" + segment(0xDB, b"\x00" + bytes([1] * 64))
            + segment(0xC0, bytes([8, 0, 8, 0, 8, 1, 1, 0x11, 0]))
            + segment(0xC4, b"\x00" + bytes([1] + [0] * 15) + b"\x00")
            + segment(0xC4, b"\x10" + bytes([0, 2] + [0] * 14) + b"\x00\x0b")
            + segment(0xDA, bytes([1, 1, 0x00, 0, 63, 0])) + scan + b"\xff\xd9")


def test_out_of_range_coefficients_are_refused(tmp_path):
    """libjpeg's encoder cannot write such a coefficient (and may abort the process): refuse before writing."""
    needs_backend("jpeglib")
    data = tiny_jpeg_with_ac(1500)
    jpegcrop.probe(data)  # structurally fine
    src, _ = dct(tmp_path, data, "big-ac.jpg")
    assert src[0][0, 0, 0, 1] == 1500  # the reader does see the value
    with pytest.raises(LosslessUnsupported, match="range"):
        lossless_crop(data, (0, 0, 8, 8), 1)


def test_validator_accepts_what_pillow_writes():
    kinds = [dict(sub="444"), dict(sub="422", progressive=True), dict(mode="L", progressive=True),
             dict(sub="420", restart=True)]
    for kw in kinds:
        info = jpegcrop.probe(make_jpeg(size=(40, 30), metadata=False, **kw))
        assert (info.width, info.height) == (40, 30)


def test_fallback_when_backend_missing(monkeypatch):
    """Without jpeglib: available() is False with a one-line install hint, lossless_crop raises
    LosslessUnsupported, and the caller's re-encoding path produces the crop instead."""
    import sys

    from smartcrop import imageio

    monkeypatch.setitem(sys.modules, "jpeglib", None)  # import jpeglib -> ImportError
    monkeypatch.setitem(sys.modules, "turbojpeg", None)  # and no libjpeg-turbo either
    monkeypatch.setattr(jpegcrop, "_backend_cache", None)
    assert not jpegcrop.available()
    reason = jpegcrop.unavailable_reason()
    assert "jpeglib" in reason and "pip install" in reason and "\n" not in reason
    data = make_jpeg(orientation=6)
    box = (10, 20, 110, 76)

    def crop(data, box):  # what a caller does
        try:
            return lossless_crop(data, box)
        except LosslessUnsupported:
            loaded = imageio.load_full(data)
            img = imageio.crop_image(loaded.original, box)
            return imageio.encode_image(img, "JPEG", exif=loaded.exif, icc=loaded.icc), box

    with pytest.raises(LosslessUnsupported, match="jpeglib"):
        lossless_crop(data, box)
    out, used = crop(data, box)
    assert used == box and Image.open(io.BytesIO(out)).size == (100, 56)


def test_import_is_cheap():
    import subprocess
    import sys

    code = "import sys, smartcrop.jpegcrop; print('jpeglib' in sys.modules, 'numpy' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.split()[0] == "False"
