import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageCms
from PIL.JpegImagePlugin import JpegImageFile

from smartcrop.imageio import (
    FORMAT_EXTENSIONS,
    IMAGE_EXTENSIONS,
    ImageError,
    crop_image,
    encode_image,
    format_for_path,
    is_image_path,
    load_full,
    load_image,
    reset_orientation,
    save_image,
)

RED, GREEN, GRAY, WHITE = (255, 0, 0), (0, 255, 0), (128, 128, 128), (255, 255, 255)


def close(actual, expected, tol=12):
    return all(abs(a - e) <= tol for a, e in zip(actual, expected))


def assert_one_line_error(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg and "Traceback" not in msg
    for w in words:
        assert w in msg


def srgb_icc():
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def exif_with(orientation=None, **tags):
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    for tag, value in tags.items():
        exif[{"make": 0x010F, "model": 0x0110}[tag]] = value
    return exif.tobytes()


def opened(source):
    """Open a path or bytes with Pillow, fully loaded and with the file closed."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
        im.load()
        return im


# ----------------------------------------------------------------------------- EXIF orientation fixtures


def upright_array(w, h):
    """Gray w x h image with a red block top-left and a green block top-right (asymmetric under all 8
    orientations, together with the w != h aspect ratio)."""
    a = np.full((h, w, 3), GRAY, np.uint8)
    a[: h // 4, : w // 4] = RED
    a[: h // 4, w - w // 4 :] = GREEN
    return a


def stored_for(u, orientation):
    """The pixels a camera stores for upright image ``u`` with EXIF ``orientation``, derived from the EXIF
    definition of where the stored 0th row / 0th column lie in the upright image."""
    return {
        1: lambda: u,  # top / left
        2: lambda: u[:, ::-1],  # top / right
        3: lambda: u[::-1, ::-1],  # bottom / right
        4: lambda: u[::-1, :],  # bottom / left
        5: lambda: u.transpose(1, 0, 2),  # left / top
        6: lambda: u[:, ::-1].transpose(1, 0, 2),  # right / top
        7: lambda: u[::-1, ::-1].transpose(1, 0, 2),  # right / bottom
        8: lambda: u[::-1, :].transpose(1, 0, 2),  # left / bottom
    }[orientation]()


def write_oriented_jpeg(path, w, h, orientation, **save_kw):
    stored = np.ascontiguousarray(stored_for(upright_array(w, h), orientation))
    Image.fromarray(stored).save(path, quality=92, exif=exif_with(orientation, make="Cam"), **save_kw)
    return path


def assert_upright(img):
    w, h = img.size
    px = img.convert("RGB").load()
    assert close(px[w // 8, h // 8], RED), "red block must be top-left"
    assert close(px[w - w // 8, h // 8], GREEN), "green block must be top-right"
    assert close(px[w // 8, h - h // 8], GRAY)
    assert close(px[w - w // 8, h - h // 8], GRAY)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_full_resolution(tmp_path, orientation):
    path = write_oriented_jpeg(tmp_path / "o.jpg", 60, 40, orientation)
    li = load_image(path)
    assert li.full_size == (60, 40)
    assert li.image.size == (60, 40) and li.image.mode == "RGB" and li.scale == 1.0
    assert_upright(li.image)
    exif = Image.Exif()
    exif.load(li.exif)
    assert exif[0x0112] == 1 and exif[0x010F] == "Cam"


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_with_draft(tmp_path, orientation, monkeypatch):
    path = write_oriented_jpeg(tmp_path / "o.jpg", 1600, 1200, orientation)
    decoded_sizes = []
    real_load = JpegImageFile.load

    def spy_load(self):
        decoded_sizes.append(self.size)
        return real_load(self)

    monkeypatch.setattr(JpegImageFile, "load", spy_load)
    li = load_image(path, target_short_side=256)
    assert set(decoded_sizes) == {(400, 300) if orientation < 5 else (300, 400)}  # DCT-scaled decode
    assert li.full_size == (1600, 1200)
    assert li.image.width < 1600, "JPEG must be decoded at reduced (DCT-scaled) size"
    assert min(li.image.size) >= 256
    assert li.image.size == (400, 300)  # 1/4 scale: the largest that keeps the short side >= 256
    assert li.scale == pytest.approx(0.25)
    assert_upright(li.image)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_load_full(tmp_path, orientation):
    li = load_full(write_oriented_jpeg(tmp_path / "o.jpg", 60, 40, orientation))
    assert li.original.size == li.image.size == li.full_size == (60, 40)
    assert_upright(li.original)


@pytest.mark.parametrize("where", ["exif", "xmp"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_tiff_orientation_applied_exactly_once(tmp_path, orientation, where):
    """Pillow 13 turns a TIFF upright by its Orientation tag while loading it; reading the EXIF first must not
    switch that off (orientations 5-8 failed: "box can't exceed original image size"), nor may the image
    then be turned a second time.  An orientation in the XMP packet alone turns it too, but Pillow's size
    before loading is then the stored one: 5-8 were cropped in the wrong frame (boxes outside the photo)."""
    path = tmp_path / "o.tif"
    stored = np.ascontiguousarray(stored_for(upright_array(120, 80), orientation))
    if where == "exif":
        Image.fromarray(stored).save(path, exif=exif_with(orientation, make="Cam"))
    else:
        from PIL import TiffImagePlugin

        info = TiffImagePlugin.ImageFileDirectory_v2()
        info[0x010F] = "Cam"
        info[700] = (f'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-'
                     f'syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation='
                     f'"{orientation}"/></rdf:RDF></x:xmpmeta>').encode()
        info.tagtype[700] = 1  # bytes
        Image.fromarray(stored).save(path, tiffinfo=info)
    for li in (load_image(path), load_image(path, target_short_side=40)):
        assert li.full_size == (120, 80) and li.image.size == ((120, 80) if li.scale == 1 else (60, 40))
        assert_upright(li.image)
    li = load_full(path)
    assert li.original.size == li.full_size == (120, 80)
    assert_upright(li.original)
    exif = Image.Exif()
    exif.load(li.exif)
    assert exif[0x0112] == 1 and exif[0x010F] == "Cam"


@pytest.mark.parametrize("value", [0, 9, 65535])
def test_invalid_orientation_value_is_ignored(tmp_path, value):
    path = tmp_path / "o.jpg"
    Image.fromarray(upright_array(60, 40)).save(path, exif=exif_with(value))
    li = load_image(path)
    assert li.full_size == (60, 40)
    assert_upright(li.image)


@pytest.mark.parametrize("payload", [
    b"Exif\x00\x00" + bytes(range(256)) * 2,  # garbage after the EXIF header
    b"Exif\x00\x00II*\x00\xff\xff\xff\x7f",  # IFD offset far past the end
    b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05\x01\x12\x00",  # IFD cut short
    b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x01\x00\x12\x01\x03\x00\x01\x00\x00\x00\x06",  # truncated entry
])
def test_corrupt_exif_does_not_prevent_loading(tmp_path, payload):
    path = tmp_path / "bad_exif.jpg"
    Image.fromarray(upright_array(60, 40)).save(path, exif=payload)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow itself warns about the corrupt data when opening
        assert opened(path).info["exif"] == payload  # the garbage really is in the APP1 segment
    for li in (load_image(path), load_image(path, target_short_side=16), load_full(path)):
        assert li.full_size == (60, 40)
        assert li.exif is None or isinstance(li.exif, bytes)
        assert_upright(li.image)


def test_reset_orientation():
    out = reset_orientation(exif_with(6, make="Cam"))
    exif = Image.Exif()
    exif.load(out)
    assert exif[0x0112] == 1 and exif[0x010F] == "Cam"
    assert reset_orientation(None) is None
    assert reset_orientation(b"") is None
    assert reset_orientation(b"Exif\x00\x00not a tiff header at all") is None


# ----------------------------------------------------------------------------------- bad inputs


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageError) as ei:
        load_image(tmp_path / "empty.jpg")
    assert_one_line_error(ei, "empty file")
    with pytest.raises(ImageError, match="empty file"):
        load_image(b"")


def test_too_many_open_files_is_not_blamed_on_the_photo(tmp_path, monkeypatch):
    """A process at its open-files limit said "p01.jpg: cannot read file (Too many open files)" of good photos;
    the message now says the limit is the cause."""
    import builtins
    import errno

    photo = tmp_path / "p01.jpg"
    Image.new("RGB", (40, 30)).save(photo)
    real_open = builtins.open

    def at_the_limit(file, *a, **k):
        if str(file) == str(photo):
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", at_the_limit)
    with pytest.raises(ImageError) as ei:
        load_image(photo)
    assert_one_line_error(ei, "Too many open files in this process", "ulimit -n", "not a fault of the file")


def test_text_file_named_jpg(tmp_path):
    (tmp_path / "notes.jpg").write_text("these are not pixels\n" * 20)
    with pytest.raises(ImageError) as ei:
        load_image(str(tmp_path / "notes.jpg"))
    assert_one_line_error(ei, "not an image")


def test_truncated_jpeg(tmp_path):
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (200, 300, 3), np.uint8)).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    for kwargs in ({}, {"target_short_side": 50}):
        with pytest.raises(ImageError) as ei:
            load_image(tmp_path / "cut.jpg", **kwargs)
        assert_one_line_error(ei, "truncated or corrupt")
    with pytest.raises(ImageError, match="truncated"):
        load_full(data[: len(data) // 2])


def test_an_arithmetic_coded_jpeg_larger_than_64_kib_is_decoded(tmp_path):
    """libjpeg's arithmetic decoder cannot wait for data and Pillow fed it 64 KiB at a time: a valid
    arithmetic-coded JPEG past that size failed as "truncated or corrupt image data (broken data stream …)"."""
    jpeglib = pytest.importorskip("jpeglib", reason="jpeglib (the lossless extra) writes the arithmetic fixture")
    pixels = np.random.default_rng(0).integers(0, 256, (300, 400, 3), np.uint8)
    path = tmp_path / "arith.jpg"
    with jpeglib.version("turbo210"):
        jpeglib.from_spatial(pixels).write_spatial(str(path), qt=90, flags=["ARITH_CODE"])
    assert path.stat().st_size > 1 << 16 and b"\xff\xc9" in path.read_bytes()[:400]
    with jpeglib.version("turbo210"):
        reference = jpeglib.read_spatial(str(path)).spatial.astype(int)
    full = load_image(path)
    assert full.full_size == (400, 300) and np.abs(np.asarray(full.image, int) - reference).mean() < 1
    assert load_image(path, target_short_side=150).image.size == (200, 150)
    assert load_full(path).original.size == (400, 300)


def test_truncated_png(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (100, 100, 3), np.uint8)).save(buf, "PNG")
    with pytest.raises(ImageError) as ei:
        load_image(buf.getvalue()[: buf.tell() // 2])
    assert_one_line_error(ei, "truncated or corrupt")


@pytest.mark.parametrize("keep", [0.9, 0.5, 30])
def test_truncated_webp_is_named_truncated_not_unreadable(keep):
    """libwebp refuses a cut file when Pillow opens it: that said "cannot read file", as if the disk had failed."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (100, 100, 3), np.uint8)).save(buf, "WEBP")
    data = buf.getvalue()
    with pytest.raises(ImageError) as ei:
        load_image(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    assert_one_line_error(ei, "truncated or corrupt")
    assert "cannot read file" not in str(ei.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageError) as ei:
        load_image(tmp_path / "nope.jpg")
    assert_one_line_error(ei, "not found")
    with pytest.raises(ImageError) as ei:
        load_image(tmp_path)
    assert_one_line_error(ei, "directory")


def png_header_only(width, height):
    """A PNG whose IHDR claims ``width x height`` RGB pixels, followed by a tiny (wrong) IDAT."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def test_decompression_bomb_refused_before_decoding(tmp_path):
    Image.new("RGB", (1000, 800), RED).save(tmp_path / "big.png")
    with pytest.raises(ImageError) as ei:
        load_image(tmp_path / "big.png", max_pixels=500_000)
    assert_one_line_error(ei, "too large", "800000 pixels", "500000", "decompression bomb")
    assert load_image(tmp_path / "big.png", max_pixels=800_000).full_size == (1000, 800)

    # 100 M pixels claimed: above Pillow's warning limit, below its hard limit; the pixel data is bogus, so
    # "too large" (not "corrupt") proves the size check happens before any decoding.
    bomb = png_header_only(10_000, 10_000)
    with pytest.raises(ImageError, match="too large"):
        load_image(bomb, max_pixels=50_000_000)
    with pytest.raises(ImageError, match="corrupt"):  # allowed size: decoding runs and fails
        load_image(bomb)
    # 400 M pixels claimed: beyond Pillow's own hard limit, refused with the same kind of message.
    with pytest.raises(ImageError) as ei:
        load_image(png_header_only(20_000, 20_000))
    assert_one_line_error(ei, "too large", "400000000 pixels", "decompression bomb")


# ------------------------------------------------------------------------------------ pixel modes


def test_png_alpha_composited_on_white(tmp_path):
    a = np.zeros((10, 20, 4), np.uint8)
    a[:, :10] = (255, 0, 0, 255)  # opaque red
    a[:, 10:] = (0, 0, 255, 0)  # fully transparent blue
    a[0, 0] = (0, 0, 0, 128)  # half-transparent black
    Image.fromarray(a, "RGBA").save(tmp_path / "a.png")
    li = load_image(tmp_path / "a.png")
    assert li.mode == "RGBA" and li.has_alpha and li.format == "PNG"
    assert li.image.mode == "RGB"
    assert li.image.getpixel((15, 5)) == WHITE
    assert li.image.getpixel((5, 5)) == RED
    assert close(li.image.getpixel((0, 0)), (127, 127, 127), 1)
    full = load_full(tmp_path / "a.png")
    assert full.original.mode == "RGBA" and full.original.getpixel((15, 5))[3] == 0
    assert full.image.getpixel((15, 5)) == WHITE


def test_16bit_png_scaled_not_clipped(tmp_path):
    im = Image.new("I;16", (4, 2))
    for x, v in enumerate([0, 32768, 65535, 1000]):
        im.putpixel((x, 0), v)
        im.putpixel((x, 1), v)
    im.save(tmp_path / "deep.png")
    li = load_image(tmp_path / "deep.png")
    assert li.mode.startswith("I;16")
    got = [li.image.getpixel((x, 0)) for x in range(4)]
    assert got[0] == (0, 0, 0) and got[2] == WHITE
    assert close(got[1], (128, 128, 128), 1)
    assert close(got[3], (4, 4, 4), 1)  # 1000 / 257 ~ 3.9: scaled, not clipped to 255
    assert li.bit_depth == 16 and not li.reduced_depth  # grayscale: the depth is kept in ``original``
    full = load_full(tmp_path / "deep.png")
    assert full.original.mode == "I;16" and full.original.getpixel((3, 1)) == 1000
    assert full.image.mode == "RGB" and full.image.getpixel((2, 1)) == WHITE


def test_float_tiff_scaled(tmp_path):
    im = Image.new("F", (3, 1))
    for x, v in enumerate([0.0, 0.5, 1.0]):
        im.putpixel((x, 0), v)
    im.save(tmp_path / "f.tif")
    li = load_image(tmp_path / "f.tif")
    assert li.mode == "F"
    assert [li.image.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_a_float_image_with_a_non_finite_sample_keeps_its_picture(tmp_path, bad):
    """One infinite sample made the range infinite and the whole image (and its crop) black.  The finite samples
    set the range; NaN and -inf become black, +inf white."""
    for lo, hi in ((0.0, 1.0), (0.0, 255.0), (-3.0, 5.0)):  # nominal 0..1 and 0..255; -3..5 stretched
        a = np.array([[lo, (lo + hi) / 2, hi, bad]], np.float32)
        Image.fromarray(a, "F").save(tmp_path / "f.tif")
        li = load_image(tmp_path / "f.tif")
        got = [li.image.getpixel((x, 0))[0] for x in range(4)]
        assert got == [0, 128, 255, 255 if bad > 0 else 0], (lo, hi)


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (32, 24), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    li = load_image(tmp_path / "cmyk.jpg")
    assert li.mode == "CMYK" and li.image.mode == "RGB"
    assert close(li.image.getpixel((16, 12)), RED)
    assert load_full(tmp_path / "cmyk.jpg").original.mode == "RGB"


@pytest.mark.parametrize("mode,value", [("L", 77), ("1", 1)])
def test_grayscale(tmp_path, mode, value):
    Image.new(mode, (8, 6), value).save(tmp_path / "g.png")
    li = load_image(tmp_path / "g.png")
    expected = 255 if mode == "1" else value
    assert li.mode == mode and not li.has_alpha
    assert li.image.mode == "RGB" and li.image.getpixel((3, 3)) == (expected,) * 3
    full = load_full(tmp_path / "g.png")
    assert full.original.mode == "L" and full.original.getpixel((3, 3)) == expected


@pytest.mark.parametrize("ext", ["png", "gif"])
def test_palette_with_transparency(tmp_path, ext):
    im = Image.new("P", (10, 10), 0)
    im.putpalette([0, 0, 255, 255, 0, 0] + [0] * 762)
    im.paste(1, (0, 0, 5, 10))  # left half: palette entry 1 (red); right half: entry 0 (transparent)
    im.save(tmp_path / f"p.{ext}", transparency=0)
    li = load_image(tmp_path / f"p.{ext}")
    assert li.mode == "P" and li.has_alpha
    assert li.image.getpixel((2, 5)) == RED
    assert li.image.getpixel((8, 5)) == WHITE
    assert load_full(tmp_path / f"p.{ext}").original.mode == "RGBA"


def test_palette_without_transparency(tmp_path):
    Image.new("RGB", (10, 10), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "p.png")
    li = load_full(tmp_path / "p.png")
    assert li.mode == "P" and not li.has_alpha
    assert li.original.mode == "RGB" and close(li.image.getpixel((5, 5)), (10, 200, 30), 20)


@pytest.mark.parametrize("ext,save_kw", [("gif", {}), ("webp", {"lossless": True})])
def test_animated_first_frame(tmp_path, ext, save_kw):
    frames = [Image.new("RGB", (16, 12), c) for c in (RED, (0, 0, 255), GREEN)]
    path = tmp_path / f"anim.{ext}"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0, **save_kw)
    with Image.open(path) as im:
        assert im.n_frames == 3
    li = load_image(path)
    assert li.full_size == (16, 12)
    assert close(li.image.getpixel((8, 6)), RED)


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_one_pixel(tmp_path, ext):
    Image.new("RGB", (1, 1), (0, 0, 255)).save(tmp_path / f"px.{ext}")
    for li in (load_image(tmp_path / f"px.{ext}"), load_image(tmp_path / f"px.{ext}", target_short_side=256),
               load_full(tmp_path / f"px.{ext}")):
        assert li.full_size == (1, 1) and li.image.size == (1, 1)
        assert close(li.image.getpixel((0, 0)), (0, 0, 255), 20)


def test_panorama(tmp_path):
    a = np.zeros((200, 30000, 3), np.uint8)
    a[:, :15000] = RED
    Image.fromarray(a).save(tmp_path / "pano.jpg", quality=80)
    li = load_image(tmp_path / "pano.jpg", target_short_side=256)
    assert li.full_size == (30000, 200) and li.image.size == (30000, 200)
    li = load_image(tmp_path / "pano.jpg", target_short_side=64)
    assert li.full_size == (30000, 200) and min(li.image.size) >= 64 and li.image.width < 30000
    assert close(li.image.getpixel((10, 10)), RED) and close(li.image.getpixel((li.image.width - 10, 10)), (0, 0, 0))


def test_non_jpeg_reduced_decode(tmp_path):
    Image.fromarray(upright_array(1600, 1200)).save(tmp_path / "big.png", compress_level=1)
    li = load_image(tmp_path / "big.png", target_short_side=256)
    assert li.full_size == (1600, 1200)
    assert li.image.size == (400, 300) and li.scale == pytest.approx(0.25)
    assert_upright(li.image)


def test_bytes_source_and_metadata(tmp_path):
    icc = srgb_icc()
    buf = io.BytesIO()
    Image.fromarray(upright_array(60, 40)).save(buf, "JPEG", icc_profile=icc)
    li = load_image(buf.getvalue())
    assert li.format == "JPEG" and li.mode == "RGB" and li.icc == icc and li.exif is None


# ------------------------------------------------------------------------------------ crop and save


def test_crop_image_clamps_and_resizes():
    img = Image.fromarray(upright_array(60, 40))
    out = crop_image(img, (-10, -5, 15, 10))
    assert out.size == (15, 10) and out.getpixel((3, 3)) == RED
    out = crop_image(img, (30, 0, 100, 100), size=(14, 8))
    assert out.size == (14, 8)
    # empty or out-of-bounds boxes still give at least 1x1, inside the image
    assert crop_image(img, (70, 0, 90, 10)).size == (1, 10)
    assert crop_image(img, (5, 5, 5, 5)).size == (1, 1)
    assert crop_image(img, (-9, -9, -1, -1)).getpixel((0, 0)) == RED


def test_saved_output_orientation_reset_and_icc_kept(tmp_path):
    icc = srgb_icc()
    src = write_oriented_jpeg(tmp_path / "src.jpg", 60, 40, 6, icc_profile=icc)
    li = load_full(src)
    assert li.icc == icc
    crop = crop_image(li.original, (0, 0, 30, 20))
    for ext in ("jpg", "png", "webp", "tif"):
        out = save_image(crop, tmp_path / f"out.{ext}", exif=li.exif, icc=li.icc)
        with Image.open(out) as im:
            assert im.info.get("icc_profile") == icc, ext
            exif = im.getexif()
            assert exif.get(0x0112) == 1, ext
            assert exif.get(0x010F) == "Cam", ext
            assert im.size == (30, 20)
            assert close(im.convert("RGB").getpixel((3, 3)), RED), ext  # pixels stored upright
    # a caller forgetting to reset the orientation still gets orientation 1 written
    raw = opened(src).info["exif"]
    data = encode_image(li.image, "jpeg", exif=raw)
    assert opened(data).getexif()[0x0112] == 1


def test_icc_profile_dropped_when_colour_space_mismatches(tmp_path):
    gray_icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()  # not RGB
    data = encode_image(Image.new("RGB", (4, 4)), "png", icc=gray_icc)
    assert "icc_profile" not in opened(data).info


@pytest.mark.parametrize("ext,fmt,exact", [("jpg", "JPEG", False), ("jpeg", "JPEG", False), ("png", "PNG", True),
                                           ("webp", "WEBP", False), ("tif", "TIFF", True), ("tiff", "TIFF", True)])
def test_round_trip(tmp_path, ext, fmt, exact):
    y, x = np.mgrid[0:48, 0:64]
    a = np.stack([x * 4, y * 5, (x + y) * 2], axis=-1).astype(np.uint8)
    out = save_image(Image.fromarray(a), tmp_path / f"rt.{ext}", quality=95)
    assert out == tmp_path / f"rt.{ext}"
    li = load_image(out)
    assert li.format == fmt and li.full_size == (64, 48)
    diff = np.abs(np.asarray(li.image, np.int16) - a).mean()
    assert diff == 0 if exact else diff < 3
    assert encode_image(Image.fromarray(a), ext)[:4] == out.read_bytes()[:4]


@pytest.mark.parametrize("ext,keeps_alpha", [("png", True), ("webp", True), ("tif", True), ("jpg", False)])
def test_save_rgba(tmp_path, ext, keeps_alpha):
    a = np.zeros((8, 8, 4), np.uint8)
    a[:, :4] = (255, 0, 0, 255)
    a[:, 4:] = (0, 0, 0, 0)
    out = save_image(Image.fromarray(a, "RGBA"), tmp_path / f"a.{ext}")
    with Image.open(out) as im:
        assert (im.mode == "RGBA") == keeps_alpha
        if keeps_alpha:
            assert im.getpixel((6, 4))[3] == 0
        else:
            assert close(im.getpixel((6, 4)), WHITE)
    assert close(load_image(out).image.getpixel((6, 4)), WHITE)


def test_save_converts_exotic_modes(tmp_path):
    for mode in ("I;16", "CMYK", "LA", "P", "1"):
        data = encode_image(Image.new(mode, (4, 4)), "webp")
        assert opened(data).format == "WEBP"
        save_image(Image.new(mode, (4, 4)), tmp_path / f"{mode.replace(';', '')}.jpg")


def test_atomic_save_and_overwrite(tmp_path):
    target = tmp_path / "out.jpg"
    save_image(Image.new("RGB", (8, 8), RED), target)
    first = target.read_bytes()
    with pytest.raises(FileExistsError):
        save_image(Image.new("RGB", (8, 8), GREEN), target)
    assert target.read_bytes() == first
    save_image(Image.new("RGB", (8, 8), GREEN), target, overwrite=True)
    assert close(opened(target).getpixel((4, 4)), GREEN)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jpg"]


def test_failed_save_leaves_no_temp_file(tmp_path, monkeypatch):
    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_image(Image.new("RGB", (8, 8)), tmp_path / "out.png")
    assert list(tmp_path.iterdir()) == []


def test_temp_file_is_hidden_short_and_carries_the_pid(tmp_path, monkeypatch):
    import os

    from smartcrop import imageio

    seen = []
    real_write = os.write

    def spy(fd, data):
        seen.extend(p.name for p in tmp_path.iterdir())  # what exists while the bytes are written
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", spy)
    save_image(Image.new("RGB", (8, 8)), tmp_path / ("x" * 240 + ".png"))  # a long name: the temp stays short
    (name,) = set(seen)
    assert name.startswith(".smartcrop-") and name.endswith(".tmp") and len(name) < 40
    assert imageio.temp_owner(name) == os.getpid()
    assert [p.name for p in tmp_path.iterdir()] == ["x" * 240 + ".png"]


def test_unknown_output_format(tmp_path):
    with pytest.raises(ImageError) as ei:
        save_image(Image.new("RGB", (4, 4)), tmp_path / "out.xyz")
    assert_one_line_error(ei, "unsupported output")
    with pytest.raises(ImageError):
        encode_image(Image.new("RGB", (4, 4)), "bmp")
    assert list(tmp_path.iterdir()) == []
    out = save_image(Image.new("RGB", (4, 4)), tmp_path / "noext", format="png")
    assert opened(out).format == "PNG"


def test_is_image_path():
    assert IMAGE_EXTENSIONS >= {".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif"}
    assert is_image_path("a/B.JPG") and is_image_path("x.tiff")
    assert not is_image_path("notes.txt") and not is_image_path("jpg") and not is_image_path(".out.jpg.1234.tmp")


def test_format_for_path_and_extensions(tmp_path):
    assert format_for_path("a/b.JPG") == format_for_path("x.jpeg") == "JPEG"
    assert [format_for_path(f"x.{e}") for e in ("png", "webp", "tif", "TIFF")] == ["PNG", "WEBP", "TIFF", "TIFF"]
    for bad in ("x.bmp", "x.gif", "noext", "x.txt"):
        with pytest.raises(ImageError):
            format_for_path(bad)
    img = Image.fromarray(upright_array(12, 8))
    for fmt, ext in FORMAT_EXTENSIONS.items():
        assert format_for_path("out" + ext) == fmt
        assert opened(save_image(img, tmp_path / ("out" + ext))).format == fmt
        assert opened(encode_image(img, fmt)).format == fmt


def test_keep_original_flag(tmp_path):
    Image.new("LA", (6, 4), (90, 0)).save(tmp_path / "la.png")
    li = load_image(tmp_path / "la.png", keep_original=True)
    assert li.original.mode == "RGBA" and li.image.getpixel((1, 1)) == WHITE
    assert load_image(tmp_path / "la.png").original is None
    with pytest.raises(ValueError):
        load_image(tmp_path / "la.png", keep_original=True, target_short_side=2)


def test_concurrent_loads(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    paths = [write_oriented_jpeg(tmp_path / f"{i}.jpg", 60, 40, i % 8 + 1) for i in range(16)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(load_full, paths))
    for li in results:
        assert li.full_size == (60, 40)
        assert_upright(li.image)
    # the warning filters are restored once every load has finished
    assert not any(f[2] is Image.DecompressionBombWarning for f in warnings.filters)
