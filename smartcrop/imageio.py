"""Robust image input/output for cropping folders of user photos.

Loading (:func:`load_image`, :func:`load_full`) turns anything Pillow can read into an upright 8-bit RGB image
(EXIF orientation applied, alpha composited over white, 16-bit and float data rescaled, CMYK converted), with
the metadata needed to write a faithful output: the EXIF block (Orientation reset to 1) and the ICC profile.
Every unusable input -- empty, truncated, not an image, too large -- raises :class:`ImageError` with a one-line
message meant for humans; corrupt *metadata* never prevents loading.

Saving (:func:`save_image`, :func:`encode_image`) converts to a mode the output format supports and writes
atomically (temporary file in the target directory, then rename), refusing to overwrite unless asked.

Only Pillow is imported here, so the module stays cheap to import.
"""

from __future__ import annotations

import errno
import io
import os
import re
import secrets
import stat
import threading
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator, Union

from PIL import Image

__all__ = [
    "FORMAT_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "ImageError",
    "LoadedImage",
    "OUTPUT_FORMATS",
    "crop_image",
    "encode_image",
    "format_for_path",
    "is_image_path",
    "load_full",
    "load_image",
    "reset_orientation",
    "save_image",
    "save_image_bytes",
]

Source = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview]

#: File extensions (lower case) that folder walkers treat as images.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif"})

#: Default pixel limit: Pillow's own hard decompression-bomb limit (2 * ``Image.MAX_IMAGE_PIXELS``).
DEFAULT_MAX_PIXELS = 178_956_970

WHITE = (255, 255, 255)

ORIENTATION_TAG = 0x0112

# Transpose that makes a stored image upright, per EXIF orientation (same table as ImageOps.exif_transpose).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# TIFF tags describing the pixel layout of the *source* file (plus its ICC profile and XMP packet, which may
# carry a stale orientation): meaningless or harmful in the EXIF block of a re-encoded crop.
_LAYOUT_TAGS = frozenset({
    254, 255, 256, 257, 258, 259, 262, 266, 273, 277, 278, 279, 284, 317, 320, 322, 323, 324, 325, 330, 338,
    339, 347, 513, 514, 530, 531, 532, 700, 34675,
})

# Formats Pillow can open whose decoding runs external programs (EPS -> Ghostscript): refused.
_UNSAFE_FORMATS = frozenset({"EPS"})

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})

#: Writable formats by extension; format names are looked up the same way ("JPEG" -> ".jpeg").
OUTPUT_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".tif": "TIFF",
                   ".tiff": "TIFF"}

# ICC header colour-space signature (bytes 16..20) matching each standard pixel mode.
#: Default file extension for each writable Pillow format name.
FORMAT_EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "TIFF": ".tif"}

_ICC_SPACE = {"L": b"GRAY", "RGB": b"RGB ", "RGBA": b"RGB "}


class ImageError(Exception):
    """An input (or output name) that cannot be used; ``str(err)`` is a one-line human-readable reason."""

    def __init__(self, message: str) -> None:
        super().__init__(_one_line(message))


@dataclass
class LoadedImage:
    """A decoded, upright image plus what is needed to write a faithful crop of it."""

    image: Image.Image  # mode "RGB", upright, alpha composited over white; possibly a reduced decode
    full_size: tuple[int, int]  # (w, h) of the upright full-resolution image
    scale: float  # image.width / full_size[0]
    exif: bytes | None  # original EXIF block with Orientation reset to 1; None if absent or unparseable
    icc: bytes | None  # ICC profile (RGB or gray), None if absent or not describing the converted pixels
    format: str  # Pillow format name ("JPEG", "PNG", ...)
    mode: str  # original Pillow mode ("RGB", "RGBA", "I;16", "CMYK", "P", ...)
    has_alpha: bool  # the source carries transparency (alpha channel, transparent palette entry or colour key)
    # load_full / keep_original only: the upright full-res image in "L", "RGB" or "RGBA", for saving
    original: Image.Image | None = None


# ----------------------------------------------------------------------------------------------- loading


def load_image(source: Source, *, target_short_side: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
               keep_original: bool = False) -> LoadedImage:
    """Decode ``source`` (a path, or the file's bytes) into an upright RGB :class:`LoadedImage`.

    With ``target_short_side``, decode at reduced size when that is cheap: JPEGs use DCT scaling
    (:meth:`PIL.Image.Image.draft`) and other formats are decoded fully then shrunk by an integer factor with
    :meth:`~PIL.Image.Image.reduce`.  Either way the short side stays ``>= target_short_side`` (or the full
    size if that is smaller); the caller does the final resize.  ``full_size`` is always the upright
    full-resolution size.

    Images with more than ``max_pixels`` pixels are refused before any pixel data is decoded.  Pillow's own
    hard limit (``2 * Image.MAX_IMAGE_PIXELS``) also applies: raise that to allow even larger images.

    ``keep_original=True`` (full resolution only) also fills ``original``; see :func:`load_full`.

    Raises :class:`ImageError` for unusable input.  Safe to call from several threads.
    """
    if target_short_side is not None and target_short_side < 1:
        raise ValueError(f"target_short_side must be >= 1, got {target_short_side}")
    if keep_original and target_short_side is not None:
        raise ValueError("keep_original needs a full-resolution decode (target_short_side=None)")

    with ExitStack() as stack:
        fp = stack.enter_context(_open_source(source))
        with _quiet_pillow():  # header and metadata only: no pixel data is decoded here
            im = stack.enter_context(_open_image(fp, max_pixels))
            full_w, full_h = im.size
            if full_w * full_h > max_pixels:
                raise ImageError(_too_large(full_w * full_h, max_pixels))
            if im.format in _UNSAFE_FORMATS:
                raise ImageError(f"unsupported image format {im.format}")
            fmt, mode, has_alpha = im.format or "", im.mode, im.has_transparency_data
            icc = im.info.get("icc_profile") or None
            orientation, exif = _read_exif(im)  # before load(): TIFF metadata is read from the open file

        if target_short_side is not None:
            im.draft(im.mode, (target_short_side, target_short_side))  # no-op except for JPEG
        drafted = im.size != (full_w, full_h)
        try:
            im.load()
        except Exception as e:  # Pillow decoders raise many types (OSError, SyntaxError, ValueError, zlib...)
            raise ImageError(_decode_error(e, max_pixels)) from e
        try:
            pixels = _standardize(im)
        except Exception as e:
            raise ImageError(f"unsupported pixel mode {mode}") from e
        if pixels is im:  # detach from the file-backed image, which is closed on exit
            pixels = im.copy()

    if keep_original:
        original = _transpose(pixels, orientation)
        image = _flatten(original)
    else:
        original = None
        image = _flatten(pixels)
        if target_short_side is not None and not drafted:
            image = _reduce_to(image, target_short_side)
        image = _transpose(image, orientation)

    full_size = (full_h, full_w) if orientation >= 5 else (full_w, full_h)
    if icc is not None and icc[16:20] not in (b"RGB ", b"GRAY"):
        icc = None  # e.g. a CMYK profile: does not describe the converted pixels
    return LoadedImage(image=image, full_size=full_size, scale=image.width / full_size[0], exif=exif, icc=icc,
                       format=fmt, mode=mode, has_alpha=has_alpha, original=original)


def load_full(source: Source, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """:func:`load_image` at full resolution that also keeps ``original``: the upright image in the best mode
    for saving ("RGBA" if the source has transparency, "L" for grayscale, else "RGB").

    ``image`` is the RGB version of ``original`` (the same object when ``original`` is RGB).
    """
    return load_image(source, max_pixels=max_pixels, keep_original=True)


@contextmanager
def _open_source(source: Source) -> Iterator[IO[bytes]]:
    """Binary file object for a path or bytes, with file-system problems turned into :class:`ImageError`."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageError("empty file")
        yield io.BytesIO(source)
        return
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"expected a path or bytes, got {type(source).__name__}")
    path = os.fspath(source)
    try:
        fp = open(path, "rb")
    except FileNotFoundError as e:
        raise ImageError("file not found") from e
    except IsADirectoryError as e:
        raise ImageError("is a directory") from e
    except PermissionError as e:
        raise ImageError("is a directory" if os.path.isdir(path) else "permission denied") from e
    except OSError as e:
        raise ImageError(f"cannot open file ({e.strerror or e})") from e
    with fp:
        st = os.fstat(fp.fileno())
        if stat.S_ISDIR(st.st_mode):
            raise ImageError("is a directory")
        if stat.S_ISREG(st.st_mode) and st.st_size == 0:
            raise ImageError("empty file")
        yield fp


def _open_image(fp: IO[bytes], max_pixels: int) -> Image.Image:
    """``Image.open`` (header only) with its failures turned into :class:`ImageError`."""
    try:
        return Image.open(fp)
    except Image.UnidentifiedImageError as e:
        raise ImageError("not an image file (unknown or unsupported format)") from e
    except Image.DecompressionBombError as e:
        raise ImageError(_bomb_message(e, max_pixels)) from e
    except OSError as e:
        raise ImageError(f"cannot read file ({e.strerror or e})") from e
    except Exception as e:  # plugins may raise ValueError, struct.error, ... on mangled headers
        raise ImageError(f"corrupt image header ({_detail(e)})") from e


_WARNINGS_LOCK = threading.Lock()


@contextmanager
def _quiet_pillow() -> Iterator[None]:
    """Silence Pillow warnings that this module handles itself (size limit, corrupt metadata).

    ``warnings.catch_warnings`` swaps process-global state, so concurrent uses are serialized; keep the
    guarded code short (header parsing, EXIF), never pixel decoding.
    """
    with _WARNINGS_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        yield


def _read_exif(im: Image.Image) -> tuple[int, bytes | None]:
    """``(orientation, exif bytes with orientation reset)``; ``(1, None)`` when the EXIF data is unusable."""
    try:
        exif = im.getexif()
    except Exception:
        return 1, None
    orientation = exif.get(ORIENTATION_TAG, 1)
    if not isinstance(orientation, int) or orientation not in range(1, 9):
        orientation = 1
    return orientation, _exif_bytes(exif)


def reset_orientation(exif_bytes: bytes | None) -> bytes | None:
    """``exif_bytes`` with Orientation set to 1 (and source-layout tags dropped); None if empty or corrupt."""
    if not exif_bytes:
        return None
    exif = Image.Exif()
    with _quiet_pillow():
        try:
            exif.load(bytes(exif_bytes))
        except Exception:
            return None
        return _exif_bytes(exif)


def _exif_bytes(exif: Image.Exif) -> bytes | None:
    """Serialize ``exif`` (modified in place) with Orientation 1; None if nothing useful is left or it fails."""
    try:
        for tag in _LAYOUT_TAGS.intersection(exif):
            del exif[tag]
        exif[ORIENTATION_TAG] = 1
        if len(exif) == 1 and not exif.get_ifd(0x8769) and not exif.get_ifd(0x8825):
            return None  # only the Orientation we just set (e.g. orientation came from XMP)
        return exif.tobytes()
    except Exception:
        return None


def _too_large(pixels: int, limit: int) -> str:
    return f"image too large ({pixels} pixels > limit {limit}): refusing (decompression bomb?)"


def _bomb_message(err: Exception, max_pixels: int) -> str:
    """Message for Pillow's own DecompressionBombError (its limit may be below ``max_pixels``)."""
    match = re.search(r"\((\d+) pixels\)", str(err))
    limit = min(max_pixels, 2 * Image.MAX_IMAGE_PIXELS) if Image.MAX_IMAGE_PIXELS else max_pixels
    if match is None:
        return f"image too large (pixel limit {limit}): refusing (decompression bomb?)"
    return _too_large(int(match.group(1)), limit)


def _decode_error(err: Exception, max_pixels: int) -> str:
    if isinstance(err, Image.DecompressionBombError):
        return _bomb_message(err, max_pixels)
    if isinstance(err, MemoryError):
        return "not enough memory to decode image"
    return f"truncated or corrupt image data ({_detail(err)})"


def _detail(err: BaseException) -> str:
    return _one_line(str(err)) or type(err).__name__


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------ conversions


def _standardize(im: Image.Image) -> Image.Image:
    """``im`` in "L", "RGB" or "RGBA" (the modes every output format handles); ``im`` itself if already so.

    Transparency of any kind becomes an alpha channel, 16-bit/32-bit/float data is rescaled to 8 bits,
    CMYK/YCbCr/... become RGB.
    """
    if im.mode in _SIXTEEN_BIT_MODES or im.mode in ("I", "F"):
        return _to_8bit(im)
    if im.has_transparency_data:
        return im if im.mode == "RGBA" else im.convert("RGBA")
    if im.mode in ("L", "RGB"):
        return im
    return im.convert("L" if im.mode == "1" else "RGB")


def _to_8bit(im: Image.Image) -> Image.Image:
    """Rescale a single-channel 16-bit, 32-bit integer or float image to "L" (rounded, not clipped).

    16-bit modes map 0..65535 to 0..255.  For "I" and "F" the range is inferred from the data: [0, 1] (float
    only), [0, 255] and [0, 65535] are taken as nominal ranges; anything else is stretched min..max.
    """
    if im.mode in _SIXTEEN_BIT_MODES:
        lo, hi = 0.0, 65535.0
    else:
        lo, hi = im.getextrema()
        if lo != lo or hi != hi:  # NaN in float data: no usable range
            lo, hi = 0.0, 1.0
        elif lo >= 0:
            nominal = (1.0,) if im.mode == "F" else ()
            hi = next((top for top in nominal + (255.0, 65535.0) if hi <= top), hi)
            lo = 0.0
    src = im.convert("I") if im.mode in _SIXTEEN_BIT_MODES else im
    gain = 255.0 / (hi - lo) if hi > lo else 0.0
    return src.point(lambda v: v * gain - lo * gain + 0.5).convert("L")


def _flatten(im: Image.Image) -> Image.Image:
    """RGB version of a standardized image, compositing alpha over white."""
    if im.mode == "RGB":
        return im
    if im.mode == "RGBA":
        background = Image.new("RGB", im.size, WHITE)
        background.paste(im, mask=im.getchannel("A"))
        return background
    return im.convert("RGB")


def _transpose(im: Image.Image, orientation: int) -> Image.Image:
    method = _UPRIGHT.get(orientation)
    return im if method is None else im.transpose(method)


def _reduce_to(im: Image.Image, short_side: int) -> Image.Image:
    """Shrink by the largest integer factor keeping the short side ``>= short_side`` (box filter, fast)."""
    factor = min(im.size) // short_side
    return im.reduce(factor) if factor >= 2 else im


# -------------------------------------------------------------------------------------- crop and save


def crop_image(img: Image.Image, box: tuple[int, int, int, int],
               size: tuple[int, int] | None = None) -> Image.Image:
    """Crop ``box`` = (x1, y1, x2, y2) in pixels of ``img`` (clamped to its bounds), then optionally resize
    to ``size`` = (w, h) with Lanczos.  A box that is empty after clamping (or lies outside the image)
    becomes the nearest 1-pixel-wide/high strip inside the image, so the result is always at least 1x1."""
    w, h = img.size
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    x1, y1 = max(0, min(x1, w - 1)), max(0, min(y1, h - 1))
    x2, y2 = max(x1 + 1, min(x2, w)), max(y1 + 1, min(y2, h))
    out = img.crop((x1, y1, x2, y2))
    if size is not None:
        if size[0] < 1 or size[1] < 1:
            raise ValueError(f"invalid output size {size}")
        if out.size != tuple(size):
            out = out.resize((int(size[0]), int(size[1])), Image.Resampling.LANCZOS)
    return out


def save_image(img: Image.Image, path: str | os.PathLike[str], *, format: str | None = None, quality: int = 95,
               exif: bytes | None = None, icc: bytes | None = None, overwrite: bool = False) -> Path:
    """Encode ``img`` and write it atomically to ``path``; returns the path.

    The format comes from ``format`` or else the extension (.jpg/.jpeg, .png, .webp, .tif/.tiff; anything
    else raises :class:`ImageError`).  The image is converted to a mode the format supports (alpha is
    composited over white for JPEG, kept for PNG/WebP/TIFF).  ``exif`` (its Orientation is forced to 1;
    unparseable EXIF is dropped) and ``icc`` are embedded when given; an ICC profile whose colour space does
    not match the written pixels is dropped.

    The data goes to a hidden ``.<name>.<random>.tmp`` file in the target directory, which is then renamed
    over ``path``; with ``overwrite=False`` an existing ``path`` raises FileExistsError (checked atomically
    with a hard link where the file system supports it).
    """
    path = Path(path)
    fmt = _output_format(format if format is not None else path.suffix, path)
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(errno.EEXIST, "file exists", str(path))
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            _encode(img, f, fmt, quality=quality, exif=exif, icc=icc)
        _commit(tmp, path, overwrite)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def encode_image(img: Image.Image, format: str, *, quality: int = 95, exif: bytes | None = None,
                 icc: bytes | None = None) -> bytes:
    """Encode ``img`` like :func:`save_image` and return the file's bytes (e.g. for stdout).

    ``format`` is a format or extension name: "JPEG", "jpg", ".png", "webp", "tiff", ...
    """
    buf = io.BytesIO()
    _encode(img, buf, _output_format(format), quality=quality, exif=exif, icc=icc)
    return buf.getvalue()


save_image_bytes = encode_image  # older name, kept as an alias


def format_for_path(path: str | os.PathLike[str]) -> str:
    """Pillow output format name ("JPEG", "PNG", "WEBP", "TIFF") for ``path``'s extension (case-insensitive);
    :class:`ImageError` if the extension is not a writable format."""
    p = Path(path)
    return _output_format(p.suffix, p)


def is_image_path(p: str | os.PathLike[str]) -> bool:
    """True if ``p`` has one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return Path(p).suffix.lower() in IMAGE_EXTENSIONS


def _output_format(name: str, path: Path | None = None) -> str:
    """Pillow format name for a format/extension name; :class:`ImageError` if not writable."""
    fmt = OUTPUT_FORMATS.get("." + name.lower().lstrip(".")) if name else None
    if fmt is None:
        what = f"file name {path.name!r}" if path is not None and name == path.suffix else f"format {name!r}"
        raise ImageError(f"unsupported output {what} (use .jpg, .png, .webp or .tif)")
    return fmt


def _encode(img: Image.Image, fp: IO[bytes], fmt: str, *, quality: int, exif: bytes | None,
            icc: bytes | None) -> None:
    """Convert ``img`` for ``fmt`` and write it to ``fp`` with the given metadata."""
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    out = _standardize(img)
    if fmt == "JPEG" and out.mode == "RGBA":
        out = _flatten(out)
    elif fmt == "WEBP" and out.mode == "L":
        out = out.convert("RGB")
    options: dict[str, object] = {}
    exif = reset_orientation(exif)
    if exif:
        options["exif"] = exif
    if icc and icc[16:20] == _ICC_SPACE[out.mode]:
        options["icc_profile"] = icc
    if fmt == "JPEG":
        options.update(quality=quality, optimize=False)
    elif fmt == "WEBP":
        options.update(quality=quality)
    out.save(fp, format=fmt, **options)


def _create_temp(path: Path) -> tuple[int, str]:
    """Create (O_EXCL) a hidden temporary file next to ``path``; returns ``(fd, name)``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = os.path.join(path.parent, f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (permissions follow the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _commit(tmp: str, path: Path, overwrite: bool) -> None:
    """Move the finished temporary file to ``path``."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # atomic: fails if path exists
    except FileExistsError:
        raise
    except OSError:  # no hard links here (some network/FAT file systems): check, then rename
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "file exists", str(path)) from None
        os.replace(tmp, path)
    else:
        os.unlink(tmp)
