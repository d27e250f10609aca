"""Robust image input/output for cropping folders of user photos.

Loading (:func:`load_image`, :func:`load_full`) turns anything Pillow can read into an upright 8-bit RGB image
(EXIF orientation applied, alpha composited over white, 16-bit and float data rescaled, CMYK converted), with
the metadata needed to write a faithful output: the EXIF block (Orientation reset to 1), the ICC profile, the
XMP packet (``tiff:Orientation`` reset to 1) and the IPTC-IIM record.  HEIC/HEIF is read through the
``pi-heif`` or ``pillow-heif`` plugin (registered on the first HEIF file, if one is installed), AVIF through
Pillow's own plugin.  16-bit grayscale keeps its depth in ``original``; other deep sources are reduced to 8
bits and say so in :attr:`LoadedImage.reduced_depth`.
Every unusable input -- empty, truncated, not an image, too large -- raises :class:`ImageError` with a one-line
message meant for humans (control characters escaped, see :func:`safe_name`); corrupt *metadata* never
prevents loading.

Saving (:func:`save_image`, :func:`encode_image`, :func:`write_file`) converts to a mode the output format
supports and writes every file complete or not at all (a ``.smartcrop-PID-RANDOM.tmp`` file in the target
directory, length checked and fsynced, then renamed), refusing to overwrite unless asked; a full output disk
is :class:`OutputFullError`.  Written files carry a small marker (:func:`mark_output`) by which later runs
recognise them (:func:`written_by_smartcrop`); temporary files of killed runs are removed by
:func:`remove_stale_temps`.
Metadata support per output format: EXIF and ICC everywhere; XMP in JPEG, PNG, WebP, TIFF and AVIF; IPTC in
JPEG (Photoshop APP13), TIFF (tag 33723) and PNG (ImageMagick/ExifTool "Raw profile type iptc" text chunk).

Only Pillow is imported here, so the module stays cheap to import.
"""

from __future__ import annotations

import errno
import importlib
import io
import math
import numbers
import os
import re
import secrets
import stat
import threading
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator, Union

from PIL import Image

from .errors import SmartcropError, one_line

__all__ = [
    "as_rgb",
    "FORMAT_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "ImageError",
    "LoadedImage",
    "OUTPUT_FORMATS",
    "OUTPUT_MARKER",
    "OutputFullError",
    "camera_fields",
    "crop_image",
    "default_output_format",
    "encode_image",
    "existing_parent",
    "format_for_path",
    "heif_decoder",
    "is_image_path",
    "load_full",
    "load_image",
    "mark_output",
    "marker_source",
    "output_marker",
    "output_source",
    "pillow_output_format",
    "remove_stale_temps",
    "reset_orientation",
    "reset_xmp_orientation",
    "safe_name",
    "save_image",
    "source_tag",
    "temp_name",
    "temp_owner",
    "write_atomic",
    "write_file",
    "written_by_smartcrop",
]

Source = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview]

#: File extensions (lower case) that folder walkers treat as images.  HEIC/HEIF need ``pi-heif`` or
#: ``pillow-heif``, AVIF a Pillow with AVIF support (>= 11.3 wheels); without them such files fail with a
#: message saying what to install, instead of being skipped silently.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif", ".heic", ".heif",
                              ".hif", ".avif"})

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

#: PixelXDimension, PixelYDimension (EXIF IFD): the picture's size, which a crop changes
_PIXEL_DIMENSION_TAGS = (0xA002, 0xA003)
# TIFF tags describing the pixel layout of the *source* file (plus its ICC profile and XMP packet, which may
# carry a stale orientation): meaningless or harmful in the EXIF block of a re-encoded crop.
_LAYOUT_TAGS = frozenset({
    254, 255, 256, 257, 258, 259, 262, 266, 273, 277, 278, 279, 284, 317, 320, 322, 323, 324, 325, 330, 338,
    339, 347, 513, 514, 530, 531, 532, 700, 34675,
})

# Formats Pillow can open whose decoding runs external programs (EPS -> Ghostscript): refused.
_UNSAFE_FORMATS = frozenset({"EPS"})

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})

#: Writable formats by extension; format names are looked up the same way ("JPEG" -> ".jpeg").  AVIF needs a
#: Pillow built with libavif (the >= 11.3 wheels are); HEIC is read but never written (the only HEVC encoder
#: for Python, pillow-heif's x265, makes its wheels GPL and takes seconds per photo).
OUTPUT_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".tif": "TIFF",
                  ".tiff": "TIFF", ".avif": "AVIF"}
#: The output formats a 16-bit grayscale crop keeps its depth in (the others get 8 bits).
DEEP_FORMATS = ("PNG", "TIFF")

#: Default file extension for each writable Pillow format name.
FORMAT_EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "TIFF": ".tif", "AVIF": ".avif"}

# ICC header colour-space signature (bytes 16..20) matching each standard pixel mode.
_ICC_SPACE = {"L": b"GRAY", "I;16": b"GRAY", "RGB": b"RGB ", "RGBA": b"RGB "}

# Containers whose orientation lives in irot/imir boxes: libheif applies them while decoding HEIF (pillow-heif
# then resets the EXIF tag), Pillow's AVIF plugin leaves the pixels as stored and mirrors them into EXIF
# Orientation.  Either way the EXIF/XMP orientation the file may also carry is informational only.
_HEVC_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs"})
_HEIF_BRANDS = _HEVC_BRANDS | {b"mif1", b"msf1", b"mif2", b"miaf"}
_AVIF_BRANDS = frozenset({b"avif", b"avis"})

EXIF_IFD = 0x8769


class ImageError(SmartcropError):
    """An input (or output name) that cannot be used; ``str(err)`` is a one-line human-readable reason."""

    def __init__(self, message: str) -> None:
        super().__init__(safe_name(one_line(message)))


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
    # load_full / keep_original only: the upright full-res image in "L", "I;16" (16-bit grayscale, depth kept),
    # "RGB" or "RGBA", for saving
    original: Image.Image | None = None
    xmp: bytes | None = None  # XMP packet with tiff:Orientation reset to 1; None if absent
    iptc: bytes | None = None  # IPTC-IIM records (JPEG APP13 / TIFF 33723 / PNG raw profile); None if absent
    bit_depth: int = 8  # bits per sample of the source (1, 8, 10, 12, 16 or 32)
    # the source has more than 8 bits per sample and ``original`` (so any output) holds only 8: the caller
    # should say so once; 16-bit grayscale is kept as "I;16" and written as such to PNG and TIFF
    reduced_depth: bool = False
    lossless: bool = False  # a lossless WebP (VP8L): its crops are written lossless when written as WebP
    # a JPEG source's chroma subsampling (Pillow's codes: 0 4:4:4, 1 4:2:2, 2 4:2:0), which its crops re-encoded
    # as JPEG keep; None for other sources (Pillow's default, 4:2:0)
    subsampling: int | None = None

    @property
    def camera(self) -> dict[str, str | int | float]:
        """Camera fields of the EXIF block (see :func:`camera_fields`); parsed on each access, no file I/O."""
        return camera_fields(self.exif)


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
        container = _sniff_container(fp)
        if container == "HEIF":
            heif_decoder()  # registers the plugin on the first HEIF file; cheap afterwards
        with _quiet_pillow():  # header and metadata only: no pixel data is decoded here
            # not closed on exit: once loaded, the image owns its pixels (closing it would free them, and a copy
            # would double the memory of a huge decode); the file itself is closed by _open_source
            im = _open_image(fp, max_pixels, container)
            full_w, full_h = im.size
            if full_w * full_h > max_pixels:
                raise ImageError(_too_large(full_w * full_h, max_pixels))
            if im.format in _UNSAFE_FORMATS:
                raise ImageError(f"unsupported image format {im.format}")
            fmt, mode, has_alpha = im.format or "", im.mode, im.has_transparency_data
            lossless = fmt == "WEBP" and _webp_is_lossless(fp)
            subsampling = _jpeg_subsampling(im) if fmt == "JPEG" else None
            bit_depth = _source_bits(im)  # from the tile list, which load() empties
            # PNG metadata chunks may follow the pixel data (Pillow's getexif() decodes the image to find them):
            # read them after load(), so that no pixels are decoded while holding the lock
            deferred = fmt == "PNG"
            if not deferred:  # before load(): TIFF metadata is read from the open file
                orientation, exif, xmp, iptc = _read_metadata(im, fmt)

        if fmt == "JPEG" and _jpeg_frame_marker(fp) in _ARITHMETIC_SOF:
            # libjpeg's arithmetic decoder cannot wait for more data, and Pillow feeds it 64 KiB at a time
            # ("broken data stream" past the first block): hand it the whole file at once
            im.decodermaxblock = max(im.decodermaxblock, _size_of(fp))
        if target_short_side is not None:
            im.draft(im.mode, (target_short_side, target_short_side))  # JPEG (DCT scaling), HEIF (thumbnail)
        drafted = im.size != (full_w, full_h)
        try:
            im.load()
        except Exception as e:  # Pillow decoders raise many types (OSError, SyntaxError, ValueError, zlib...)
            raise ImageError(_decode_error(e, max_pixels)) from e
        if deferred:
            with _quiet_pillow():
                orientation, exif, xmp, iptc = _read_metadata(im, fmt)
        elif fmt == "TIFF" and orientation != 1 and ORIENTATION_TAG not in getattr(im, "tag_v2", {}):
            # Pillow 13 makes a TIFF upright itself while loading it and drops the tag: transposing again would
            # rotate it twice.  Its size before load() is upright only for the TIFF tag, not for an orientation
            # found in the XMP packet alone: the loaded pixels' size is the upright one
            orientation = 1
            full_w, full_h = im.size
        icc = im.info.get("icc_profile") or None
        try:
            pixels = _standardize(im, keep_deep=keep_original)
        except Exception as e:
            raise ImageError(f"unsupported pixel mode {mode}") from e
        if pixels is im:  # drop the reference to the file, which is closed on exit
            im.fp = None

    if keep_original:
        original = _transpose(pixels, orientation)
        image = _flatten(_standardize(original))
    else:
        original = None
        image = _flatten(pixels)
        if target_short_side is not None and not drafted:
            image = _reduce_to(image, target_short_side)
        image = _transpose(image, orientation)

    full_size = (full_h, full_w) if orientation >= 5 else (full_w, full_h)
    if icc is not None and icc[16:20] not in (b"RGB ", b"GRAY"):
        icc = None  # e.g. a CMYK profile: does not describe the converted pixels
    keeps_depth = mode in _SIXTEEN_BIT_MODES and not has_alpha  # "I;16" in original, see _standardize
    return LoadedImage(image=image, full_size=full_size, scale=image.width / full_size[0], exif=exif, icc=icc,
                       format=fmt, mode=mode, has_alpha=has_alpha, original=original, xmp=xmp, iptc=iptc,
                       bit_depth=bit_depth, reduced_depth=bit_depth > 8 and not keeps_depth, lossless=lossless,
                       subsampling=subsampling)


def load_full(source: Source, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """:func:`load_image` at full resolution that also keeps ``original``: the upright image in the best mode
    for saving ("RGBA" if the source has transparency, "L" for grayscale, else "RGB").

    ``image`` is the RGB version of ``original`` (the same object when ``original`` is RGB).
    """
    return load_image(source, max_pixels=max_pixels, keep_original=True)


def _too_many_files(e: OSError) -> str | None:
    """The message for a file this process could not open because of its own open-files limit (not the file's
    fault), else None."""
    if e.errno in (errno.EMFILE, errno.ENFILE):
        return (f"cannot open it: {e.strerror or e} in this process (the open-files limit, ulimit -n, is too "
                "low), not a fault of the file")
    return None


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
        raise ImageError(_too_many_files(e) or f"cannot open file ({e.strerror or e})") from e
    with fp:
        st = os.fstat(fp.fileno())
        if stat.S_ISDIR(st.st_mode):
            raise ImageError("is a directory")
        if stat.S_ISREG(st.st_mode) and st.st_size == 0:
            raise ImageError("empty file")
        if not fp.seekable():  # a pipe or FIFO: Pillow would read it into memory too
            data = fp.read()
            if not data:
                raise ImageError("empty file")
            yield io.BytesIO(data)
            return
        yield fp


def _open_image(fp: IO[bytes], max_pixels: int, container: str | None = None) -> Image.Image:
    """``Image.open`` (header only) with its failures turned into :class:`ImageError`."""
    try:
        return Image.open(fp)
    except Image.UnidentifiedImageError as e:
        if container == "HEIF":
            if heif_decoder() is None:
                raise ImageError("HEIC/HEIF image, but no HEIF decoder is installed (pip install pi-heif)") from e
            raise ImageError("corrupt or unsupported HEIC/HEIF file") from e
        if container == "AVIF":
            if not _pillow_has_avif():
                raise ImageError("AVIF image, but this Pillow cannot decode AVIF (needs Pillow >= 11.3 built with "
                                 "libavif)") from e
            raise ImageError("corrupt or unsupported AVIF file") from e
        raise ImageError("not an image file (unknown or unsupported format)") from e
    except Image.DecompressionBombError as e:
        raise ImageError(_bomb_message(e, max_pixels)) from e
    except OSError as e:
        if e.errno is None:  # a plugin's own (a truncated WebP: "could not create decoder object"), not the disk's
            raise ImageError(f"truncated or corrupt image file ({_detail(e)})") from e
        raise ImageError(_too_many_files(e) or f"cannot read file ({e.strerror or e})") from e
    except Exception as e:  # plugins may raise ValueError, struct.error, ... on mangled headers
        raise ImageError(f"corrupt image header ({_detail(e)})") from e


_ARITHMETIC_SOF = frozenset({0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})  # JPEG frame markers of arithmetic coding


def _jpeg_frame_marker(fp: IO[bytes]) -> int | None:
    """The second byte of a JPEG's frame marker (SOFn: 0xC0-0xCF but DHT, JPG and DAC), None if there is none
    before the first scan.  Reads marker headers only; the position is restored."""
    try:
        pos = fp.tell()
        try:
            at = 2
            for _ in range(256):
                fp.seek(at)
                head = fp.read(4)
                if len(head) < 4 or head[0] != 0xFF:
                    return None
                marker = head[1]
                if marker == 0xFF:
                    at += 1
                    continue
                if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                    return marker
                if marker in (0xD9, 0xDA):
                    return None
                at += 2 + int.from_bytes(head[2:], "big")
            return None
        finally:
            fp.seek(pos)
    except (OSError, ValueError):
        return None


def _size_of(fp: IO[bytes]) -> int:
    """The length of file ``fp`` (its position restored); 0 if it cannot be told."""
    try:
        pos = fp.tell()
        try:
            return fp.seek(0, os.SEEK_END)
        finally:
            fp.seek(pos)
    except (OSError, ValueError):
        return 0


def _jpeg_subsampling(im: Image.Image) -> int | None:
    """Pillow's code for an opened colour JPEG's chroma subsampling (0, 1 or 2), None if another (4:1:1, ...)
    or grayscale."""
    try:
        from PIL import JpegImagePlugin

        value = JpegImagePlugin.get_sampling(im)
    except Exception:  # noqa: BLE001 - a header Pillow could open but not describe
        return None
    return value if value in (0, 1, 2) else None


def _webp_is_lossless(fp: IO[bytes]) -> bool:
    """Whether the WebP file ``fp`` codes its (first) picture losslessly: a ``VP8L`` chunk before any ``VP8 ``
    one, inside the first animation frame if animated.  Reads chunk headers only; the position is restored."""
    try:
        pos = fp.tell()
        try:
            fp.seek(12)  # past "RIFF" size "WEBP"
            for _ in range(64):
                head = fp.read(8)
                if len(head) < 8:
                    return False
                fourcc, size = head[:4], int.from_bytes(head[4:], "little")
                if fourcc in (b"VP8L", b"VP8 "):
                    return fourcc == b"VP8L"
                if fourcc == b"ANMF":
                    fp.seek(16, os.SEEK_CUR)  # the frame's header; its picture's chunks follow
                    continue
                fp.seek(size + (size & 1), os.SEEK_CUR)
            return False
        finally:
            fp.seek(pos)
    except (OSError, ValueError):
        return False


def _sniff_container(fp: IO[bytes]) -> str | None:
    """"HEIF" or "AVIF" if ``fp`` starts with an ISO-BMFF ``ftyp`` box naming such brands, else None."""
    try:
        head = fp.read(64)
        fp.seek(0)
    except (OSError, ValueError):
        return None
    if head[4:8] != b"ftyp":
        return None
    size = int.from_bytes(head[:4], "big")
    brands = {head[8:12]} | {head[i:i + 4] for i in range(16, min(size, len(head)) - 3, 4)}
    if brands & _AVIF_BRANDS and head[8:12] not in _HEVC_BRANDS:  # AV1 coded (major brand may be "mif1")
        return "AVIF"
    return "HEIF" if brands & _HEIF_BRANDS else None


_HEIF_LOCK = threading.Lock()
_heif_plugin: str | None = None  # module that registered the HEIF opener; "" once none could be


def heif_decoder() -> str | None:
    """Name of the module that reads HEIC/HEIF for Pillow ("pi_heif" or "pillow_heif"), or None if neither is
    installed.  The first call imports it and registers its opener with Pillow (once, thread-safe); loading a
    HEIF file calls this, so nothing is imported for other formats."""
    global _heif_plugin
    if _heif_plugin is None:
        with _HEIF_LOCK:
            if _heif_plugin is None:
                found = ""
                # the same decoder either way; pi-heif is the decode-only build with an LGPL (not GPL) wheel
                for name in ("pi_heif", "pillow_heif"):
                    try:
                        importlib.import_module(name).register_heif_opener()
                    except Exception:  # not installed, or a broken/ABI-mismatched install: try the next one
                        continue
                    found = name
                    break
                _heif_plugin = found
    return _heif_plugin or None


def _pillow_has_avif() -> bool:
    try:
        from PIL import AvifImagePlugin
    except ImportError:  # Pillow < 11.2
        return False
    return bool(getattr(AvifImagePlugin, "SUPPORTED", False))


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


def _read_metadata(im: Image.Image, fmt: str) -> tuple[int, bytes | None, bytes | None, bytes | None]:
    """``(orientation, exif, xmp, iptc)`` of an opened image; see :func:`_read_exif`, :func:`_read_xmp`,
    :func:`_read_iptc`.  Never raises."""
    iptc = _read_iptc(im)  # first: reading other TIFF tags must not decode tag 33723 (Pillow truncates it)
    orientation, exif = _read_exif(im)
    if fmt == "HEIF":
        orientation = 1  # libheif has applied irot/imir (and pillow-heif reset the EXIF tag)
    elif fmt == "AVIF":  # Pillow put irot/imir into EXIF Orientation; an XMP orientation must not count here
        orientation = _exif_orientation(im.info.get("exif"))
    return orientation, exif, _read_xmp(im), iptc


def _read_exif(im: Image.Image) -> tuple[int, bytes | None]:
    """``(orientation, exif bytes with orientation reset)``; ``(1, None)`` when the EXIF data is unusable."""
    try:
        exif = im.getexif()
    except Exception:
        return 1, None
    orientation = _valid_orientation(exif.get(ORIENTATION_TAG, 1))
    try:  # a copy: the image's own Exif must keep its Orientation (Pillow 13 turns a TIFF upright by it on load)
        detached = Image.Exif()
        detached.load(exif.tobytes())
    except Exception:
        return orientation, None
    return orientation, _exif_bytes(detached)


def _valid_orientation(value) -> int:
    return value if isinstance(value, int) and value in range(1, 9) else 1


def jpeg_orientation(data: bytes) -> int:
    """The EXIF orientation a JPEG's bytes are turned upright by when loaded (:func:`load_image`'s reading:
    Pillow's EXIF parser); 1 when absent, invalid or unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return _valid_orientation(im.getexif().get(ORIENTATION_TAG, 1))
    except Exception:  # noqa: BLE001 - an unreadable header: no orientation to agree with
        return 1


def _exif_orientation(exif_bytes: bytes | None) -> int:
    """Orientation tag of an EXIF block alone (no XMP fallback); 1 when absent, invalid or unparseable."""
    if not exif_bytes:
        return 1
    exif = Image.Exif()
    try:
        exif.load(bytes(exif_bytes))
        value = exif.get(ORIENTATION_TAG, 1)
    except Exception:
        return 1
    return _valid_orientation(value)


_XMP_ORIENTATION = re.compile(
    rb"(tiff:Orientation\s*=\s*[\"'])\s*\d+\s*([\"'])|(<tiff:Orientation>)\s*\d+\s*(</tiff:Orientation>)")


def reset_xmp_orientation(xmp: bytes | str | None) -> bytes | None:
    """The XMP packet with every ``tiff:Orientation`` (attribute or element form) set to 1, as bytes; None if
    empty.  Written crops are stored upright, so an orientation left in XMP would rotate them again."""
    if not xmp:
        return None
    if isinstance(xmp, str):
        xmp = xmp.encode("utf-8")
    return _XMP_ORIENTATION.sub(lambda m: (m[1] or m[3]) + b"1" + (m[2] or m[4]), bytes(xmp))


def _read_xmp(im: Image.Image) -> bytes | None:
    """The XMP packet Pillow found (JPEG APP1, PNG iTXt, TIFF tag 700, WebP/AVIF/HEIF chunk), orientation reset."""
    xmp = im.info.get("xmp") or im.info.get("XML:com.adobe.xmp")
    if isinstance(xmp, tuple) and len(xmp) == 1:  # some TIFF writers use a type Pillow returns as a 1-tuple
        xmp = xmp[0]
    if not isinstance(xmp, (bytes, str)):
        return None
    return reset_xmp_orientation(xmp)


_IPTC_RESOURCE = 0x0404  # Photoshop image resource holding the IPTC-IIM records
_IPTC_TIFF_TAG = 33723
_PNG_IPTC_KEY = "Raw profile type iptc"


def _read_iptc(im: Image.Image) -> bytes | None:
    """IPTC-IIM records from a JPEG's APP13 (parsed by Pillow), a TIFF's tag 33723 or Photoshop tag, or a PNG's
    "Raw profile type iptc" text chunk; None if absent or not IIM data."""
    try:
        data: Any = None
        photoshop = im.info.get("photoshop")
        if isinstance(photoshop, dict):  # JPEG: {resource id: data}
            data = photoshop.get(_IPTC_RESOURCE)
        tags = getattr(im, "tag_v2", None)
        if data is None and tags is not None and _IPTC_TIFF_TAG in tags:
            # Photoshop stores the IIM byte stream as LONG values, which Pillow's tag_v2 cuts to the first
            # value (it expects one UNDEFINED entry): take the entry's raw bytes while Pillow still has them
            data = getattr(tags, "_tagdata", {}).get(_IPTC_TIFF_TAG)
            if data is None:  # a Pillow without that (private) table: what tag_v2 gives
                data = tags.get(_IPTC_TIFF_TAG)
                if isinstance(data, tuple) and tags.tagtype.get(_IPTC_TIFF_TAG) not in (4, 9):
                    data = bytes(data)
        if data is None and isinstance(photoshop, (bytes, bytearray)):  # TIFF tag 34377: raw resource blocks
            data = _irb_resource(bytes(photoshop), _IPTC_RESOURCE)
        if data is None and isinstance(im.info.get(_PNG_IPTC_KEY), str):
            data = _from_raw_profile(im.info[_PNG_IPTC_KEY])
            if data is not None and data.startswith(b"8BIM"):
                data = _irb_resource(data, _IPTC_RESOURCE)
    except Exception:
        return None
    if not isinstance(data, (bytes, bytearray)) or not data or data[0] != 0x1C:
        return None
    return bytes(data)


def _irb_resource(data: bytes, wanted: int) -> bytes | None:
    """Payload of resource ``wanted`` in a sequence of Photoshop image resource blocks ("8BIM" ...)."""
    pos = 0
    while pos + 12 <= len(data) and data[pos:pos + 4] == b"8BIM":
        rid = int.from_bytes(data[pos + 4:pos + 6], "big")
        name_len = 1 + data[pos + 6]
        pos += 6 + name_len + (name_len & 1)  # Pascal name padded to an even length
        size = int.from_bytes(data[pos:pos + 4], "big")
        payload = data[pos + 4:pos + 4 + size]
        if rid == wanted:
            return payload if len(payload) == size else None
        pos += 4 + size + (size & 1)
    return None


def _from_raw_profile(text: str) -> bytes | None:
    """Decode an ImageMagick/ExifTool "Raw profile type" text: name, decimal length, then hex digits."""
    parts = text.split(None, 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    data = bytes.fromhex("".join(parts[2].split()))
    return data[: int(parts[1])] if len(data) >= int(parts[1]) else None


def _to_raw_profile(name: str, data: bytes) -> str:
    hexed = data.hex()
    lines = "\n".join(hexed[i:i + 72] for i in range(0, len(hexed), 72))
    return f"\n{name}\n{len(data):8d}\n{lines}\n"


def depth_note(bits: int) -> str:
    """The one note a run gives for a source of ``bits`` bits per sample whose crops hold 8."""
    return f"note: {bits}-bit samples reduced to 8 bits in the crops"


def _source_bits(im: Image.Image) -> int:
    """Bits per sample stored in the file (before Pillow's own reduction of 16-bit RGB/RGBA/LA to 8 bits)."""
    if im.mode in _SIXTEEN_BIT_MODES:
        return 16
    if im.mode in ("I", "F"):
        return 32
    if im.mode == "1":
        return 1
    depth = im.info.get("bit_depth")  # HEIF (pillow-heif): 8, 10 or 12; decoded to 8 bits
    if isinstance(depth, int) and depth > 8:
        return depth
    bits = getattr(im, "tag_v2", {}).get(258)  # TIFF BitsPerSample
    if isinstance(bits, tuple) and bits and all(isinstance(b, int) for b in bits) and max(bits) > 8:
        return max(bits)
    for tile in im.tile:  # the raw mode of the stored samples, e.g. "RGB;16B" for a 48-bit PNG
        args = tile[3] if len(tile) > 3 else None
        rawmode = args if isinstance(args, str) else args[0] if isinstance(args, tuple) and args else None
        if isinstance(rawmode, str) and ";16" in rawmode:
            return 16
    return 8


def reset_orientation(exif_bytes: bytes | None, size: tuple[int, int] | None = None) -> bytes | None:
    """``exif_bytes`` with Orientation set to 1 (and source-layout tags dropped; with ``size``, the image's
    (w, h), its PixelXDimension/PixelYDimension set to it where present); None if empty or corrupt."""
    if not exif_bytes:
        return None
    exif = Image.Exif()
    with _quiet_pillow():
        try:
            exif.load(bytes(exif_bytes))
        except Exception:
            return None
        return _exif_bytes(exif, size)


def _exif_bytes(exif: Image.Exif, size: tuple[int, int] | None = None) -> bytes | None:
    """Serialize ``exif`` (modified in place) with Orientation 1 (and ``size`` as its pixel dimensions, see
    :func:`reset_orientation`); None if nothing useful is left or it fails."""
    try:
        for tag in _LAYOUT_TAGS.intersection(exif):
            del exif[tag]
        exif[ORIENTATION_TAG] = 1
        if size is not None and 0x8769 in exif:
            sub = exif.get_ifd(0x8769)
            for tag, value in zip(_PIXEL_DIMENSION_TAGS, size):
                if tag in sub:
                    sub[tag] = int(value)
        if len(exif) == 1 and not exif.get_ifd(0x8769) and not exif.get_ifd(0x8825):
            return None  # only the Orientation we just set (e.g. orientation came from XMP)
        return exif.tobytes()
    except Exception:
        return None


# (key, IFD: 0 = IFD0 / EXIF_IFD, tag) of the camera fields reported by camera_fields()
_CAMERA_TAGS = (
    ("make", 0, 0x010F), ("model", 0, 0x0110), ("lens", EXIF_IFD, 0xA434),
    ("datetime_original", EXIF_IFD, 0x9003), ("f_number", EXIF_IFD, 0x829D),
    ("exposure_time", EXIF_IFD, 0x829A), ("iso", EXIF_IFD, 0x8827), ("focal_length", EXIF_IFD, 0x920A),
    ("focal_length_35mm", EXIF_IFD, 0xA405),
)
_EXIF_DATETIME = re.compile(r"(\d{4}):(\d{2}):(\d{2})[ T](\d{2}):(\d{2}):(\d{2})$")
_EXIF_OFFSET = re.compile(r"[+-]\d{2}:\d{2}$")


def camera_fields(exif: bytes | None) -> dict[str, str | int | float]:
    """Camera fields of an EXIF block (e.g. :attr:`LoadedImage.exif`), JSON-ready; absent or invalid ones left out.

    Keys: ``make``, ``model``, ``lens`` (str); ``datetime_original`` (ISO 8601 local time, with the UTC offset
    when OffsetTimeOriginal is recorded, e.g. "2024-05-01T12:00:00+02:00"); ``f_number``, ``exposure_time``
    (seconds), ``focal_length`` (mm) as floats; ``iso``, ``focal_length_35mm`` as ints.  Strings are stripped
    but not escaped: pass them through :func:`safe_name` before printing them for humans.  Never raises.
    """
    fields: dict[str, str | int | float] = {}
    if not exif:
        return fields
    tags = Image.Exif()
    with _quiet_pillow():
        try:
            tags.load(bytes(exif))
            ifds = {0: tags, EXIF_IFD: tags.get_ifd(EXIF_IFD)}
        except Exception:
            return fields
    for key, ifd, tag in _CAMERA_TAGS:
        try:
            value = _camera_value(key, ifds[ifd].get(tag))
        except Exception:
            value = None
        if value is not None:
            fields[key] = value
    offset = ifds[EXIF_IFD].get(0x9011)  # OffsetTimeOriginal
    if "datetime_original" in fields and isinstance(offset, str) and _EXIF_OFFSET.match(offset.strip("\x00 ")):
        fields["datetime_original"] = f"{fields['datetime_original']}{offset.strip(chr(0) + ' ')}"
    return fields


def _camera_value(key: str, value: Any) -> str | int | float | None:
    if isinstance(value, tuple):  # a count > 1 (ISO is often a 1- or 2-tuple): the first value
        value = value[0] if value else None
    if value is None:
        return None
    if key in ("make", "model", "lens", "datetime_original"):
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if not isinstance(value, str):
            return None
        value = value.strip("\x00 \t\r\n")
        if key == "datetime_original":
            m = _EXIF_DATETIME.match(value)
            return f"{m[1]}-{m[2]}-{m[3]}T{m[4]}:{m[5]}:{m[6]}" if m and m[1] != "0000" else None
        return value or None
    if isinstance(value, (bytes, str)):
        return None
    number = float(value)  # IFDRational, int or float
    if not math.isfinite(number) or number <= 0:
        return None
    if key in ("iso", "focal_length_35mm"):
        return int(number)
    return float(f"{number:.6g}")


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
    return one_line(str(err)) or type(err).__name__


# C0 and C1 controls, DEL, bidi embeddings/overrides/isolates/marks, line and paragraph separators, and lone
# surrogates (bytes of a non-UTF-8 file name decoded with surrogateescape).
_UNSAFE_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")


def _escape_char(m: re.Match[str]) -> str:
    code = ord(m[0])
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: the undecodable byte itself
        code -= 0xDC00
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe_name(text: str | bytes | os.PathLike) -> str:
    """``text`` (a file name, path or message) safe to show on a terminal or in a log line.

    Control characters (C0 incl. newline, tab and ESC; DEL; C1), Unicode bidi controls (which can make a name
    display reversed), line/paragraph separators and undecodable bytes of a file name become ``\\xNN`` /
    ``\\uNNNN`` escapes; everything else, including non-ASCII letters, is left as is.  Bytes and path objects
    are decoded like the OS does (:func:`os.fsdecode`).
    """
    if not isinstance(text, str):
        text = os.fsdecode(text) if isinstance(text, (bytes, os.PathLike)) else str(text)
    return _UNSAFE_CHARS.sub(_escape_char, text)


# ------------------------------------------------------------------------------------------ conversions


def _standardize(im: Image.Image, keep_deep: bool = False) -> Image.Image:
    """``im`` in "L", "RGB" or "RGBA" (the modes every output format handles); ``im`` itself if already so.

    Transparency of any kind becomes an alpha channel, 16-bit/32-bit/float data is rescaled to 8 bits,
    CMYK/YCbCr/... become RGB.  With ``keep_deep``, 16-bit grayscale without transparency stays 16-bit, as
    "I;16" (native byte order; PNG and TIFF write it).
    """
    if im.mode == "La":  # premultiplied alpha: Pillow converts it to nothing but its plain form
        im = im.convert("LA")
    if im.mode in _SIXTEEN_BIT_MODES and keep_deep and not im.has_transparency_data:
        # not convert("I;16") directly: Pillow clips when converting between the I;16 byte orders
        return im if im.mode == "I;16" else im.convert("I").convert("I;16")
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
    only), [0, 255] and [0, 65535] are taken as nominal ranges; anything else is stretched min..max.  Float
    data's NaN and infinite samples do not count for the range (NaN and -inf become 0, +inf 255).
    """
    if im.mode in _SIXTEEN_BIT_MODES:
        lo, hi = 0.0, 65535.0
    else:
        lo, hi = im.getextrema()
        if not (math.isfinite(lo) and math.isfinite(hi)):  # NaN or ±inf in float data: the finite samples' range
            import numpy as np

            a = np.asarray(im)
            finite = a[np.isfinite(a)]
            lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if lo >= 0:
            nominal = (1.0,) if im.mode == "F" else ()
            hi = next((top for top in nominal + (255.0, 65535.0) if hi <= top), hi)
            lo = 0.0
    src = im.convert("I") if im.mode in _SIXTEEN_BIT_MODES else im
    gain = 255.0 / (hi - lo) if hi > lo else 0.0
    return src.point(lambda v: v * gain - lo * gain + 0.5).convert("L")


def as_rgb(im: Image.Image) -> Image.Image:
    """``im``, of any mode, in RGB as a decoded file of that mode is scored: 16-bit, 32-bit and float data
    rescaled to 8 bits, transparency composited over white (``convert("RGB")`` would saturate 16-bit data to
    white, turn 0..1 floats black and drop alpha)."""
    return _flatten(_standardize(im))


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
               exif: bytes | None = None, icc: bytes | None = None, overwrite: bool = False,
               xmp: bytes | str | None = None, iptc: bytes | None = None, mark: bool = True) -> Path:
    """Encode ``img`` and write it atomically to ``path``; returns the path.

    The format comes from ``format`` or else the extension (.jpg/.jpeg, .png, .webp, .tif/.tiff, .avif;
    anything else raises :class:`ImageError`).  The image is converted to a mode the format supports (alpha is
    composited over white for JPEG, kept for PNG/WebP/TIFF/AVIF; 16-bit grayscale stays 16-bit in PNG/TIFF).
    ``exif`` (its Orientation is forced to 1; unparseable EXIF is dropped), ``icc``, ``xmp`` (its
    ``tiff:Orientation`` is forced to 1) and ``iptc`` (IPTC-IIM records) are embedded when given and the format
    can hold them (see the module docstring); an ICC profile whose colour space does not match the written
    pixels is dropped, and so is metadata too large for a JPEG segment.  Pass None for all four to strip.

    The file is written by :func:`write_file` (complete or absent, marked as written by smartcrop unless
    ``mark=False``); with ``overwrite=False`` an existing ``path`` raises FileExistsError.
    """
    path = Path(path)
    fmt = pillow_output_format(format if format is not None else path.suffix, path)
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(errno.EEXIST, "file exists", str(path))
    buf = io.BytesIO()  # in memory first: Pillow ignores short writes to a file descriptor
    _encode(img, buf, fmt, quality=quality, exif=exif, icc=icc, xmp=xmp, iptc=iptc)
    return write_file(path, buf.getvalue(), overwrite=overwrite, mark=mark)


def encode_image(img: Image.Image, format: str, *, quality: int = 95, exif: bytes | None = None,
                 icc: bytes | None = None, xmp: bytes | str | None = None, iptc: bytes | None = None,
                 lossless: bool = False, subsampling: int | None = None) -> bytes:
    """Encode ``img`` like :func:`save_image` and return the file's bytes (e.g. for stdout).

    ``format`` is a format or extension name: "JPEG", "jpg", ".png", "webp", "tiff", "avif", ...
    ``lossless``: a WebP is written lossless (``quality`` then says how hard to compress); ``subsampling``
    (Pillow's 0, 1 or 2; None: 4:2:0): a JPEG's chroma subsampling (:attr:`LoadedImage.subsampling` keeps a
    JPEG source's).  Other formats ignore both.
    """
    buf = io.BytesIO()
    _encode(img, buf, pillow_output_format(format), quality=quality, exif=exif, icc=icc, xmp=xmp, iptc=iptc,
            lossless=lossless, subsampling=subsampling)
    return buf.getvalue()


def write_file(path: str | os.PathLike[str], data: bytes, *, overwrite: bool = False, mark: bool = True,
               source: bytes | None = None) -> Path:
    """Write encoded image ``data`` to ``path``: complete or not at all.

    The bytes go to a new temporary file next to ``path`` (:func:`temp_name`: created with ``O_EXCL`` and
    ``O_NOFOLLOW``, so a planted symlink is never followed), every byte is written (short writes continued),
    the file's length is checked and it is fsynced; only then is it moved to ``path`` (a hard link where the
    file system has them, so an existing ``path`` is never replaced unless ``overwrite``: FileExistsError) and
    the folder fsynced.  On any failure the temporary file is removed; a full disk (ENOSPC, EDQUOT, EFBIG)
    raises :class:`OutputFullError`, which says so.  With ``mark``, a JPEG, PNG, WebP, TIFF or AVIF file gets
    a small "written by smartcrop" marker (:func:`mark_output`, naming ``source`` when given) so that later runs
    never take it as input.
    """
    path = Path(path)
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(errno.EEXIST, "file exists", str(path))
    if mark:
        data = mark_output(data, source)
    tmp = None
    try:
        fd, tmp = _create_temp(path)
        try:
            _write_all(fd, data)
            size = os.fstat(fd).st_size
            if size != len(data):
                raise OSError(errno.EIO, f"short write ({size} of {len(data)} bytes reached the disk)")
            os.fsync(fd)
        finally:
            os.close(fd)
        _commit(tmp, path, overwrite)
        tmp = None
        _fsync_dir(path.parent)
    except OSError as e:
        if (full := disk_full(path, e)) is not None:
            raise full from None
        if e.errno is not None and e.strerror:  # about the file asked for, not the temporary one
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return path


#: errno values that mean "the output file system cannot take this file"
_DISK_FULL = frozenset(e for e in (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", None)) if e is not None)


class OutputFullError(SmartcropError):
    """The output file system is full (or the file too large for it): nothing was written, the input is fine."""


def disk_full(path, e: OSError) -> OutputFullError | None:
    """The error to raise for ``path`` when ``e`` says its file system is full, else None."""
    if e.errno not in _DISK_FULL:
        return None
    return OutputFullError(f"cannot write {safe_name(path)}: the output disk is full "
                           f"({e.strerror or errno.errorcode.get(e.errno, e.errno)})")


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written (a short write is continued; no progress means a full disk)."""
    view = memoryview(data)
    done = 0
    while done < len(view):
        n = os.write(fd, view[done:done + (1 << 22)])
        if n <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        done += n


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: not every platform can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------ output marker

#: Bytes embedded in every file smartcrop writes (a JPEG comment, a PNG text chunk, a WebP chunk, trailing
#: bytes of a TIFF, a ``free`` box of an AVIF), so that a later run recognises its own outputs.  A crop's marker
#: goes on with `` from `` and the :func:`source_tag` of the input it was cut from.
OUTPUT_MARKER = b"written by smartcrop"
_MARKER_RE = re.compile(re.escape(OUTPUT_MARKER) + rb"(?: from ([0-9a-f]{12}))?")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def source_tag(key: str | bytes) -> bytes:
    """The 12 hex digits by which a crop's marker names its input: a hash of ``key`` (what identifies the input:
    some of its bytes, or its name), so nothing of it can be read from the crop."""
    import hashlib

    return hashlib.sha256(key if isinstance(key, bytes) else os.fsencode(key)).hexdigest()[:12].encode()


def _marker(source: bytes | None) -> bytes:
    return OUTPUT_MARKER + (b" from " + source if source else b"")


def mark_output(data: bytes, source: bytes | None = None) -> bytes:
    """``data`` (an encoded image) with :data:`OUTPUT_MARKER` embedded where its format allows extra data that
    every reader ignores, naming ``source`` (a :func:`source_tag`) when given; unchanged when already marked
    so, or of another format.  A JPEG loses the markers it carried (a crop of a crop keeps its source's
    comments).  Pixels and metadata are kept."""
    data = bytes(data)
    marker = _marker(source)
    try:
        if _read_marker(len(data), _bytes_reader(data)) == marker:
            return data
        if data[:3] == b"\xff\xd8\xff":  # JPEG: a COM segment after the APPn segments (EXIF stays first)
            data = _without_jpeg_markers(data)
            pos = 2
            while pos + 4 <= len(data) and data[pos] == 0xFF and 0xE0 <= data[pos + 1] <= 0xEF:
                pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
            return data[:pos] + _jpeg_segment(0xFE, marker) + data[pos:]
        if data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR":  # PNG: a tEXt chunk right after IHDR
            import zlib

            body = b"tEXt" + b"Comment\x00" + marker
            chunk = len(body[4:]).to_bytes(4, "big") + body + (zlib.crc32(body) & 0xFFFFFFFF).to_bytes(4, "big")
            pos = 8 + 12 + int.from_bytes(data[8:12], "big")
            return data[:pos] + chunk + data[pos:]
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return _mark_webp(data, marker)
        if data[:4] in (b"II*\x00", b"MM\x00*"):  # TIFF: unreferenced trailing bytes (readers follow offsets)
            return data + marker
        if data[4:8] == b"ftyp" and data[8:12] in (b"avif", b"avis", b"mif1"):  # ISOBMFF: a top-level free box
            return data + (8 + len(marker)).to_bytes(4, "big") + b"free" + marker
    except (IndexError, ValueError):
        pass
    return data


def _without_jpeg_markers(data: bytes) -> bytes:
    """A JPEG without the COM segments before its image data that hold a smartcrop marker; every other byte
    kept."""
    kept, pos, last = [], 2, 0
    while pos + 4 <= len(data) and data[pos] == 0xFF and data[pos + 1] not in (0xDA, 0xD9):
        end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if data[pos + 1] == 0xFE and _MARKER_RE.fullmatch(data[pos + 4:end]):
            kept.append(data[last:pos])
            last = end
        pos = end
    return b"".join(kept) + data[last:] if kept else data


def _mark_webp(data: bytes, marker: bytes) -> bytes:
    """A WebP with an extra ``SCRP`` chunk; a simple-format file (one VP8/VP8L chunk) becomes the extended
    format first (a VP8X header), as unknown chunks are only allowed there."""
    import struct

    chunk = b"SCRP" + struct.pack("<I", len(marker)) + marker + b"\x00" * (len(marker) & 1)
    body = data[12:]
    kind = body[:4]
    if kind in (b"VP8 ", b"VP8L"):
        if kind == b"VP8 ":
            if body[11:14] != b"\x9d\x01\x2a":
                return data
            w = int.from_bytes(body[14:16], "little") & 0x3FFF
            h = int.from_bytes(body[16:18], "little") & 0x3FFF
            alpha = False
        else:
            if body[8] != 0x2F:
                return data
            bits = int.from_bytes(body[9:13], "little")
            w, h, alpha = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, bool((bits >> 28) & 1)
        vp8x = b"VP8X" + struct.pack("<I", 10) + bytes([0x10 if alpha else 0, 0, 0, 0]) \
            + (w - 1).to_bytes(3, "little") + (h - 1).to_bytes(3, "little")
        body = vp8x + body
    elif kind != b"VP8X":
        return data
    body += chunk
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body


def _bytes_reader(data: bytes):
    def read(pos: int, n: int) -> bytes:
        return data[pos:pos + n]
    return read


_MARKER_MAX = len(_marker(b"0" * 12))  # the longest marker


def _read_marker(size: int, read) -> bytes | None:
    """The smartcrop marker a file carries (``size`` bytes, ``read(pos, n)`` reads them), None without one:
    starting in the first 4 KiB (read whole, tag included), in a JPEG comment before the image data, or in the
    last 4 KiB."""
    head = read(0, 4096 + _MARKER_MAX)
    start = head.find(OUTPUT_MARKER, 0, 4096 + len(OUTPUT_MARKER) - 1)
    if start >= 0:
        return _MARKER_RE.match(head, start).group(0)
    if head[:2] == b"\xff\xd8":
        pos = 2
        for _ in range(256):  # the header segments, each read by its length
            seg = read(pos, 4)
            if len(seg) < 4 or seg[0] != 0xFF or seg[1] in (0xDA, 0xD9):
                break
            length = int.from_bytes(seg[2:4], "big")
            if seg[1] == 0xFE and length - 2 <= _MARKER_MAX:
                found = _MARKER_RE.fullmatch(read(pos + 4, length - 2))
                if found:
                    return found.group(0)
            pos += 2 + length
    found = _MARKER_RE.search(read(max(0, size - 4096), 4096))
    return found.group(0) if found else None


def output_marker(path: str | os.PathLike[str]) -> bytes | None:
    """The marker (:data:`OUTPUT_MARKER`, with its source tag when it has one) of a regular file smartcrop
    wrote, None for any other file.

    Opened without blocking and only when it is a regular file (never a FIFO or a device); unreadable files
    are not smartcrop's.  Reads at most a few KiB."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None

        def read(pos: int, n: int) -> bytes:
            return os.pread(fd, n, pos) if hasattr(os, "pread") else b""

        return _read_marker(st.st_size, read)
    except OSError:
        return None
    finally:
        os.close(fd)


def written_by_smartcrop(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` is a regular file that smartcrop wrote (it carries :data:`OUTPUT_MARKER`)."""
    return output_marker(path) is not None


def output_source(path: str | os.PathLike[str]) -> bytes | None:
    """The :func:`source_tag` of the input a file smartcrop wrote was cut from; None when it names none (any
    other file, or a crop written by an earlier smartcrop, which did not record it)."""
    marker = output_marker(path)
    return None if marker is None else marker_source(marker)


def marker_source(marker: bytes) -> bytes | None:
    """The :func:`source_tag` a marker (:func:`output_marker`) names, None if it names none."""
    found = _MARKER_RE.fullmatch(marker)
    return found.group(1) if found else None


def format_for_path(path: str | os.PathLike[str]) -> str:
    """Pillow output format name ("JPEG", "PNG", "WEBP", "TIFF", "AVIF") for ``path``'s extension
    (case-insensitive); :class:`ImageError` if the extension is not a writable format."""
    p = Path(path)
    return pillow_output_format(p.suffix, p)


def default_output_format(input_suffix: str | None, decoded_format: str | None = None, *,
                          has_alpha: bool = False) -> str:
    """Extension (lower case, no dot) for a crop written without an explicit output format.

    The input's own extension when that format can be written here (".jpeg" gives "jpg", ".tiff" stays
    "tiff"), else that of its decoded format (``LoadedImage.format``, e.g. "PNG" for a PNG named ``.dat``),
    else "jpg" -- HEIC/HEIF, BMP, GIF, ... -- or "png" when ``has_alpha`` (the source has transparency, which
    JPEG would flatten onto white).  ``decoded_format`` may be None when the file has not been decoded yet.
    """
    ext = "." + (input_suffix or "").lower().lstrip(".")
    fmt = OUTPUT_FORMATS.get(ext)
    if fmt is not None and _writable(fmt):
        return "jpg" if ext == ".jpeg" else ext[1:]
    if decoded_format in FORMAT_EXTENSIONS and _writable(decoded_format):
        return FORMAT_EXTENSIONS[decoded_format][1:]
    return "png" if has_alpha else "jpg"


def is_image_path(p: str | os.PathLike[str]) -> bool:
    """True if ``p`` has one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return Path(p).suffix.lower() in IMAGE_EXTENSIONS


def _writable(fmt: str) -> bool:
    return fmt != "AVIF" or _pillow_has_avif()


def pillow_output_format(name: str, path: Path | None = None) -> str:
    """Pillow format name for a format/extension name; :class:`ImageError` if not writable."""
    fmt = OUTPUT_FORMATS.get("." + name.lower().lstrip(".")) if name else None
    if fmt is None:
        what = (f"file name '{safe_name(path.name)}'" if path is not None and name == path.suffix
                else f"format '{safe_name(name)}'")
        raise ImageError(f"unsupported output {what} (use .jpg, .png, .webp, .tif or .avif)")
    if not _writable(fmt):
        raise ImageError("AVIF output needs Pillow >= 11.3 built with libavif; use .jpg, .png, .webp or .tif")
    return fmt


_APP_SEGMENT_MAX = 65533  # payload bytes of one JPEG APPn segment (its 16-bit length counts itself)
_XMP_APP1_HEADER = b"http://ns.adobe.com/xap/1.0/\x00"


def _jpeg_segment(marker: int, payload: bytes) -> bytes:
    """One JPEG marker segment; empty if ``payload`` does not fit."""
    if len(payload) > _APP_SEGMENT_MAX:
        return b""
    return bytes((0xFF, marker)) + (len(payload) + 2).to_bytes(2, "big") + payload


def _iptc_app13(iptc: bytes) -> bytes:
    """A Photoshop APP13 segment holding ``iptc`` as image resource 0x0404 (empty name)."""
    block = (b"8BIM" + _IPTC_RESOURCE.to_bytes(2, "big") + b"\x00\x00" + len(iptc).to_bytes(4, "big") + iptc
             + b"\x00" * (len(iptc) & 1))
    return _jpeg_segment(0xED, b"Photoshop 3.0\x00" + block)


#: TIFF compressions a crop keeps from its source (any other is written as Deflate, lossless)
_TIFF_LOSSLESS = frozenset({"raw", "tiff_lzw", "tiff_adobe_deflate", "tiff_deflate", "packbits"})


def _encode(img: Image.Image, fp: IO[bytes], fmt: str, *, quality: int, exif: bytes | None, icc: bytes | None,
            xmp: bytes | str | None = None, iptc: bytes | None = None, lossless: bool = False,
            subsampling: int | None = None) -> None:
    """Convert ``img`` for ``fmt`` and write it to ``fp`` with the given metadata (``lossless``: see
    :func:`encode_image`)."""
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    out = _standardize(img, keep_deep=fmt in DEEP_FORMATS)
    if fmt == "JPEG" and out.mode == "RGBA":
        out = _flatten(out)
    elif fmt in ("WEBP", "AVIF") and out.mode == "L":
        out = out.convert("RGB")
    options: dict[str, object] = {}
    exif = reset_orientation(exif, out.size)
    if exif and fmt == "JPEG" and len(exif) > _APP_SEGMENT_MAX:
        exif = None  # from a PNG/TIFF/HEIC source: does not fit the APP1 segment, Pillow would refuse to save
    xmp = reset_xmp_orientation(xmp)
    iptc = bytes(iptc) if iptc else None
    # explicit even when None: Pillow's PNG/TIFF/AVIF writers fall back to img.info["icc_profile"], which a crop
    # of a loaded image still carries -- "strip" would not strip
    options["icc_profile"] = icc if icc and icc[16:20] == _ICC_SPACE[out.mode] else None
    # the source's resolution, which a crop keeps: Pillow writes only what it is given (a TIFF's comes with its
    # EXIF tags, which --strip drops)
    dpi = img.info.get("dpi")
    if fmt in ("JPEG", "PNG") and isinstance(dpi, tuple) and len(dpi) == 2 and all(
            isinstance(v, numbers.Real) and 0 < v < 1e6 for v in dpi):  # TIFF's are IFDRationals
        options["dpi"] = tuple(float(v) for v in dpi)
    if fmt == "JPEG":
        options.update(quality=quality, optimize=False, comment=b"")  # no COM segment copied from img.info
        if subsampling in (0, 1, 2):
            options["subsampling"] = subsampling
        # XMP (APP1) and IPTC (APP13) go in as ready-made segments, after the EXIF APP1 and before the ICC APP2
        extra = b""
        if xmp:
            extra += _jpeg_segment(0xE1, _XMP_APP1_HEADER + xmp)
        if iptc:
            extra += _iptc_app13(iptc)
        if extra:
            options["extra"] = extra
    elif fmt == "PNG":
        if xmp or iptc:
            from PIL.PngImagePlugin import PngInfo

            info = PngInfo()
            if xmp:
                try:
                    info.add_itxt("XML:com.adobe.xmp", xmp.decode("utf-8"), zip=False)
                except UnicodeDecodeError:
                    pass  # XMP in UTF-16/32: PNG's iTXt holds UTF-8 only
            if iptc:
                info.add_text(_PNG_IPTC_KEY, _to_raw_profile("iptc", iptc), zip=True)
            options["pnginfo"] = info
    elif fmt == "TIFF":
        tags = Image.Exif()
        if exif:
            tags.load(exif)
        if xmp or iptc:  # Pillow takes either tiffinfo or exif: put XMP and IPTC into the EXIF IFD0
            if xmp:
                tags[700] = xmp
            if iptc:
                tags[_IPTC_TIFF_TAG] = iptc
            exif = tags.tobytes()
        # the source's compression (Pillow would take it from img.info) where it suits the crop: a bilevel
        # source's CCITT fax coding cannot hold 8-bit pixels, and some codecs this libtiff cannot write.  Only
        # Pillow's own (uncompressed) writer writes an EXIF or GPS sub-IFD: libtiff's fails on its pointer
        source = out.info.get("compression")
        if source in (None, "raw") or 0x8769 in tags or 0x8825 in tags:
            options["compression"] = "raw"
        elif source == "jpeg" and out.mode in ("RGB", "L"):
            options.update(compression="jpeg", quality=quality)
        else:
            options["compression"] = source if source in _TIFF_LOSSLESS else "tiff_adobe_deflate"
    elif fmt in ("WEBP", "AVIF"):
        options.update(quality=quality)
        if fmt == "WEBP" and lossless:
            options.update(lossless=True, exact=True)  # exact: the colour under transparent pixels kept too
        if fmt == "AVIF":  # libaom's default speed 6 takes ~7 s for 12 MP at quality 92 on 2 cores, 8 takes ~1 s
            options.update(speed=8)
        if xmp:
            options["xmp"] = xmp
    if exif:
        options["exif"] = exif
    out.save(fp, format=fmt, **options)


#: Temporary files smartcrop writes: ``.smartcrop-PID-RANDOM.tmp`` (at most 31 bytes, whatever the final name)
TEMP_PREFIX = ".smartcrop-"
_TEMP_NAME = re.compile(r"\.smartcrop-(\d{1,10})-[0-9a-f]{8}\.tmp")


def temp_name(pid: int | None = None) -> str:
    """A fresh temporary file name that embeds the writing process's id (to recognise stale ones)."""
    return f"{TEMP_PREFIX}{os.getpid() if pid is None else pid}-{secrets.token_hex(4)}.tmp"


def temp_owner(name: str) -> int | None:
    """The process id embedded in a smartcrop temporary file name, or None if ``name`` is not one."""
    m = _TEMP_NAME.fullmatch(name)
    return int(m[1]) if m else None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a real owner: keep
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: someone else's live process
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike[str], recursive: bool = True) -> list[Path]:
    """Remove the temporary files of smartcrop processes that no longer run (killed mid-write) from ``folder``
    and (``recursive``) its sub-folders; returns the removed paths.

    Only regular files named like :func:`temp_name` whose embedded process id is not alive are removed;
    symlinks are neither followed nor removed, and unreadable folders are skipped."""
    removed: list[Path] = []
    for dirpath, dirs, files in os.walk(folder):
        if not recursive:
            dirs.clear()
        for name in files:
            pid = temp_owner(name)
            if pid is None or _pid_alive(pid):
                continue
            p = Path(dirpath, name)
            try:
                if stat.S_ISREG(os.lstat(p).st_mode):
                    os.unlink(p)
                    removed.append(p)
            except OSError:
                pass
    return removed


def _create_temp(path: Path) -> tuple[int, str]:
    """Create a new temporary file next to ``path`` (``O_EXCL | O_NOFOLLOW``: never an existing file or a
    planted symlink); returns ``(fd, name)``.  The name does not depend on ``path``'s, so it always fits."""
    flags = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
             | getattr(os, "O_BINARY", 0))
    while True:
        tmp = os.path.join(path.parent, temp_name())
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue


def existing_parent(path: str | os.PathLike) -> Path | None:
    """The nearest folder above ``path`` that exists (as a link, too): where writing ``path`` would make its
    missing folders, and so what must be a folder for that to work."""
    return next((a for a in Path(path).absolute().parents if os.path.lexists(a)), None)


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` (any file, e.g. a model) to ``path`` through a temporary file, a length check, an fsync
    and a rename over ``path`` (permissions follow the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, data, overwrite=True, mark=False)


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
