"""Lossless JPEG crops in the DCT domain.

When both input and output are JPEG and no resize is asked, a crop does not need to decode and re-encode the
pixels: the quantised DCT coefficients of the blocks inside the crop can be copied into a new JPEG unchanged
(no requantisation, no generation loss), the way ``jpegtran -crop`` does.  Only the crop's *top-left corner*
has to sit on the iMCU grid of the stored image (8x8 px, or 16x8 / 16x16 px for 4:2:2 / 4:2:0 chroma
subsampling); width and height stay exact, so the aspect ratio is exact and the box moves by less than one
iMCU (:func:`snap_box` says where it ends up).  Everything outside the coefficient data -- EXIF (Orientation
tag included, unchanged), XMP, ICC profile chunks, IPTC, JFIF/Adobe markers and comments -- is copied from the
original, byte for byte, but for two edits of the EXIF block made in place (no offset moves): its
PixelXDimension/PixelYDimension say the crop's size, and its thumbnail (IFD1: the whole uncropped photo, which
file browsers show) is unlinked and zeroed.

Orientation: boxes are given in UPRIGHT coordinates (after the EXIF orientation is applied, as the model sees
the photo).  The box is mapped back to the stored orientation, its stored top-left corner is snapped down to
the iMCU grid, the stored image is cropped, and the Orientation tag is kept, so viewers show exactly the
returned upright box.

Backend: `jpeglib <https://pypi.org/project/jpeglib/>`_ (MPL-2.0; wheels bundle libjpeg / libjpeg-turbo, no
system library needed; Linux x86_64, macOS, Windows -- not Linux aarch64).  It is an optional extra, imported
lazily: ``import smartcrop.jpegcrop`` costs nothing, :func:`available` / :func:`unavailable_reason` tell
whether it can be used.  jpeglib's C layer has no safe error path (a fatal libjpeg error crashes the process),
so :func:`probe` validates the whole marker structure in Python first, with the same rules libjpeg applies,
and only well-formed files of a supported kind reach the backend.

Errors: :class:`LosslessUnsupported` (with a one-line reason) means "re-encode instead": backend missing,
an unsupported kind of JPEG (arithmetic coding, 12-bit, lossless/hierarchical, CMYK/YCCK or 2/4 components,
non-integral chroma sampling, > ``MAX_PIXELS``, an orientation given only in XMP), or a file whose structure
is corrupt or truncated.  The caller's normal decode path then re-encodes the crop, or reports the corrupt file
in its own words.  Damage *inside* the entropy-coded data that libjpeg steps over (with a "Corrupt JPEG data"
warning, which the backends print on stderr or raise as a Python warning, naming no file) is refused too, so
such a crop is re-encoded from the decoded photo.  ``ValueError`` is raised for invalid arguments (an
empty box, a box larger than the image, an orientation outside 1-8).

The output is always a baseline (sequential, Huffman) JPEG with standard Huffman tables (or optimised ones with
``optimize=True``), without restart markers, whatever the input's coding was; the coefficients and quantisation
tables are the original's.  Embedded MPF (multi-picture) indexes are dropped, since the pictures they point to,
stored after the main image, are not copied.

Cost (CPU time of one crop, 4000x3000 q90 JPEG -> 3000x1687 box, on the project's 2-core VM): ~100 ms for 4:2:0
baseline, ~150 ms progressive, ~205 ms 4:4:4, against 76 / 137 / 95 ms for Pillow's decode + crop + encode of the
same box.  Nearly all of it is jpeglib's C layer (entropy-decoding the whole image and copying every coefficient,
then encoding the crop); :func:`probe` takes 1-2 ms.  The C calls release the GIL, so crops made from worker
threads run in parallel, but for the step that reads the original's coefficients: one process's crops take
it one at a time, while the warnings it may print are caught (stderr and Python's warning filters are the
process's).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

__all__ = [
    "MAX_PIXELS",
    "Component",
    "JpegInfo",
    "LosslessUnsupported",
    "available",
    "imcu_size",
    "lossless_crop",
    "probe",
    "read_orientation",
    "snap_box",
    "unavailable_reason",
    "upright_size",
]

Box = tuple[int, int, int, int]

#: Largest image (stored pixels) cropped losslessly; same default as :mod:`smartcrop.imageio`.
MAX_PIXELS = 178_956_970

#: libjpeg's JPEG_MAX_DIMENSION.
_MAX_DIMENSION = 65500

#: More scans than this is a decoding-time bomb, not a photo (libjpeg-turbo's TurboJPEG API caps at 500).
_MAX_SCANS = 1000

INSTALL_HINT = "pip install 'jpeglib>=1.0.2,<1.1' (smartcrop's lossless extra)"


class LosslessUnsupported(Exception):
    """This file cannot be cropped losslessly; ``str(err)`` says why (one line).  Re-encode instead."""


# --------------------------------------------------------------------------------------------- structure


@dataclass(frozen=True)
class Component:
    """One colour component of the frame header (SOF)."""

    id: int
    h: int  # horizontal sampling factor
    v: int  # vertical sampling factor
    tq: int  # quantisation table slot


@dataclass(frozen=True)
class JpegInfo:
    """What :func:`probe` learned from a JPEG's markers (sizes in STORED orientation)."""

    width: int
    height: int
    components: tuple[Component, ...]
    progressive: bool
    restart_interval: int
    orientation: int  # EXIF orientation, 1 when absent or invalid
    metadata: tuple[bytes, ...]  # APPn / COM segments before the first scan, marker included, in file order

    @property
    def sampling(self) -> tuple[tuple[int, int], ...]:
        """(h, v) per component, divided by their common factors (grayscale is always 1x1)."""
        gh = math.gcd(*(c.h for c in self.components))
        gv = math.gcd(*(c.v for c in self.components))
        return tuple((c.h // gh, c.v // gv) for c in self.components)

    @property
    def imcu(self) -> tuple[int, int]:
        """(w, h) in pixels of the iMCU, the crop-origin grid, in stored orientation."""
        s = self.sampling
        return 8 * max(h for h, _ in s), 8 * max(v for _, v in s)

    @property
    def mcu(self) -> tuple[int, int]:
        """(w, h) of the iMCU as libjpeg's own transforms (jpegtran, libjpeg-turbo's ``tjTransform``) require
        crop origins on it: the raw maximum sampling factors, not divided by their common factor (a file
        sampled 2×2 / 1×2 / 1×2 is 16 × 16 to them, 16 × 8 to :attr:`imcu`); one block for grayscale."""
        if len(self.components) == 1:
            return 8, 8
        return 8 * max(c.h for c in self.components), 8 * max(c.v for c in self.components)

    @property
    def upright_size(self) -> tuple[int, int]:
        """(w, h) once the EXIF orientation is applied."""
        return _upright_size((self.width, self.height), self.orientation)


_SOF_KINDS = {
    0xC3: "lossless", 0xC5: "hierarchical", 0xC6: "hierarchical", 0xC7: "hierarchical",
    0xC9: "arithmetic-coded", 0xCA: "arithmetic-coded", 0xCB: "arithmetic-coded (lossless)",
    0xCD: "arithmetic-coded (hierarchical)", 0xCE: "arithmetic-coded (hierarchical)",
    0xCF: "arithmetic-coded (hierarchical)",
}

# In entropy-coded data, 0xFF is followed by 0x00 (stuffing), 0xD0-0xD7 (restart markers) or 0xFF (fill):
# any other byte ends the scan with a marker.
_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def _u16(data: bytes, pos: int) -> int:
    return (data[pos] << 8) | data[pos + 1]


def _fail(message: str) -> LosslessUnsupported:
    return LosslessUnsupported(message)


def probe(data: bytes) -> JpegInfo:
    """Validate ``data`` as a JPEG that can be cropped losslessly and describe it.

    Walks every marker segment up to EOI (scan data included, to find the markers between progressive scans)
    and applies the checks libjpeg would apply when reading the coefficients.  Raises
    :class:`LosslessUnsupported` for anything corrupt, truncated or of an unsupported kind.  Pure Python, no
    backend needed; about 1-3 ms on a 12 MP photo.
    """
    data = bytes(data) if not isinstance(data, bytes) else data
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        raise _fail("not a JPEG file")
    pos = 2
    frame: tuple[int, int, tuple[Component, ...], bool] | None = None
    dc_tables: set[int] = set()
    ac_tables: set[int] = set()
    q_tables: set[int] = set()
    restart = 0
    metadata: list[bytes] = []
    scans = 0
    while True:
        if pos >= n:
            raise _fail("truncated JPEG (no EOI marker)")
        if data[pos] != 0xFF:
            raise _fail(f"corrupt JPEG: unexpected byte 0x{data[pos]:02x} where a marker should be")
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            raise _fail("truncated JPEG (no EOI marker)")
        marker = data[pos]
        start = pos - 1
        pos += 1
        if marker == 0xD9:  # EOI
            if scans == 0:
                raise _fail("corrupt JPEG: no image data (EOI before any scan)")
            break
        if marker == 0xD8:
            raise _fail("corrupt JPEG: second SOI marker")
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # stray RSTn / TEM: parameterless, ignored by libjpeg
            continue
        if pos + 2 > n:
            raise _fail("truncated JPEG (inside a marker segment)")
        length = _u16(data, pos)
        end = pos + length
        if length < 2 or end > n:
            raise _fail(f"corrupt or truncated JPEG: bad length of marker 0x{marker:02x} segment")
        seg = data[pos + 2:end]
        pos = end
        if 0xE0 <= marker <= 0xEF or marker == 0xFE:  # APPn, COM
            if scans == 0 and not (marker == 0xE2 and seg.startswith(b"MPF\x00")):
                metadata.append(data[start:end])
        elif marker == 0xDB:
            _parse_dqt(seg, q_tables)
        elif marker == 0xC4:
            _parse_dht(seg, dc_tables, ac_tables)
        elif marker == 0xDD:
            if len(seg) != 2:
                raise _fail("corrupt JPEG: bad DRI segment")
            restart = _u16(seg, 0)
        elif marker in (0xC0, 0xC1, 0xC2):
            if frame is not None:
                raise _fail("corrupt JPEG: more than one frame header (SOF)")
            if scans:
                raise _fail("corrupt JPEG: frame header after a scan")
            frame = _parse_sof(seg, marker == 0xC2)
        elif marker in _SOF_KINDS:
            raise _fail(f"{_SOF_KINDS[marker]} JPEG (SOF{marker - 0xC0}) is not supported")
        elif marker == 0xCC:
            raise _fail("arithmetic-coded JPEG (DAC marker) is not supported")
        elif marker == 0xDC:
            raise _fail("JPEG with a DNL marker is not supported")
        elif marker == 0xDA:
            if frame is None:
                raise _fail("corrupt JPEG: scan (SOS) before the frame header (SOF)")
            _check_sos(seg, frame, dc_tables, ac_tables, q_tables)
            scans += 1
            if scans > _MAX_SCANS:
                raise _fail(f"JPEG with more than {_MAX_SCANS} scans is not supported")
            m = _SCAN_END.search(data, pos)
            if m is None:
                raise _fail("truncated JPEG (scan data without EOI)")
            pos = m.start()
        else:
            raise _fail(f"JPEG with an unsupported marker 0x{marker:02x}")
    assert frame is not None
    width, height, components, progressive = frame
    metadata_t = tuple(metadata)
    return JpegInfo(width=width, height=height, components=components, progressive=progressive,
                    restart_interval=restart, orientation=_orientation_from_segments(metadata_t),
                    metadata=metadata_t)


def _parse_sof(seg: bytes, progressive: bool) -> tuple[int, int, tuple[Component, ...], bool]:
    if len(seg) < 6:
        raise _fail("corrupt JPEG: short frame header")
    precision, height, width, nc = seg[0], _u16(seg, 1), _u16(seg, 3), seg[5]
    if len(seg) != 6 + 3 * nc:
        raise _fail("corrupt JPEG: bad frame header length")
    if precision != 8:
        raise _fail(f"{precision}-bit JPEG is not supported")
    if height == 0:
        raise _fail("JPEG without a height in its frame header (DNL) is not supported")
    if width == 0:
        raise _fail("corrupt JPEG: zero width")
    if width > _MAX_DIMENSION or height > _MAX_DIMENSION or width * height > MAX_PIXELS:
        raise _fail(f"JPEG too large for a lossless crop ({width}x{height})")
    if nc not in (1, 3):
        what = {4: "CMYK/YCCK (4-component)"}.get(nc, f"{nc}-component")
        raise _fail(f"{what} JPEG is not supported")
    comps = []
    for i in range(nc):
        cid, hv, tq = seg[6 + 3 * i], seg[7 + 3 * i], seg[8 + 3 * i]
        h, v = hv >> 4, hv & 15
        if not (1 <= h <= 4 and 1 <= v <= 4):
            raise _fail("corrupt JPEG: bad sampling factors")
        if tq > 3:
            raise _fail("corrupt JPEG: bad quantisation table index")
        comps.append(Component(cid, h, v, tq))
    if len({c.id for c in comps}) != nc:
        raise _fail("JPEG with duplicate component ids is not supported")
    if nc > 1:
        hmax, vmax = max(c.h for c in comps), max(c.v for c in comps)
        if any(hmax % c.h or vmax % c.v for c in comps):
            raise _fail("JPEG with non-integral chroma sampling ratios is not supported")
        if sum(c.h * c.v for c in comps) > 10:
            raise _fail("corrupt JPEG: more than 10 blocks per MCU")
    return width, height, tuple(comps), progressive


def _parse_dqt(seg: bytes, q_tables: set[int]) -> None:
    i = 0
    while i < len(seg):
        pq, tq = seg[i] >> 4, seg[i] & 15
        if pq > 1 or tq > 3:
            raise _fail("corrupt JPEG: bad quantisation table header")
        size = 64 * (pq + 1)
        body = seg[i + 1:i + 1 + size]
        if len(body) != size:
            raise _fail("corrupt JPEG: short quantisation table")
        vals = body if pq == 0 else [_u16(body, 2 * k) for k in range(64)]
        if min(vals) == 0 or max(vals) > 32767:  # zero is invalid; libjpeg's writer clamps to 1..32767
            raise _fail("JPEG with quantisation values outside 1-32767 is not supported")
        q_tables.add(tq)
        i += 1 + size


def _parse_dht(seg: bytes, dc_tables: set[int], ac_tables: set[int]) -> None:
    i = 0
    while i < len(seg):
        index = seg[i]
        tc, th = index >> 4, index & 15
        if tc > 1 or th > 3:
            raise _fail("corrupt JPEG: bad Huffman table index")
        counts = seg[i + 1:i + 17]
        if len(counts) != 16:
            raise _fail("corrupt JPEG: short Huffman table")
        total = sum(counts)
        values = seg[i + 17:i + 17 + total]
        if total > 256 or len(values) != total:
            raise _fail("corrupt JPEG: bad Huffman table")
        # libjpeg's jpeg_make_d_derived_tbl: canonical codes must not overflow (all-ones code reserved) ...
        code = 0
        last = max((k for k in range(16) if counts[k]), default=-1)
        for k in range(last + 1):
            code += counts[k]
            if code >= 1 << (k + 1):
                raise _fail("corrupt JPEG: bad Huffman table")
            code <<= 1
        if tc == 0:
            if values and max(values) > 15:  # ... and DC symbols are magnitude categories 0-15
                raise _fail("corrupt JPEG: bad DC Huffman table")
            dc_tables.add(th)
        else:
            ac_tables.add(th)
        i += 17 + total


def _check_sos(seg: bytes, frame: tuple[int, int, tuple[Component, ...], bool], dc_tables: set[int],
               ac_tables: set[int], q_tables: set[int]) -> None:
    _, _, comps, progressive = frame
    if not seg:
        raise _fail("corrupt JPEG: empty scan header")
    ns = seg[0]
    if not 1 <= ns <= 4 or len(seg) != 4 + 2 * ns:
        raise _fail("corrupt JPEG: bad scan header")
    by_id = {c.id: c for c in comps}
    seen: list[Component] = []
    tables = []
    for k in range(ns):
        cid, tdta = seg[1 + 2 * k], seg[2 + 2 * k]
        comp = by_id.get(cid)
        if comp is None or comp in seen:
            raise _fail("corrupt JPEG: scan refers to an unknown or repeated component")
        seen.append(comp)
        tables.append((tdta >> 4, tdta & 15))
    ss, se, ah, al = seg[1 + 2 * ns], seg[2 + 2 * ns], seg[3 + 2 * ns] >> 4, seg[3 + 2 * ns] & 15
    if ns > 1 and sum(c.h * c.v for c in seen) > 10:
        raise _fail("corrupt JPEG: more than 10 blocks per MCU")
    need_dc = need_ac = True
    if progressive:
        dc_band = ss == 0
        bad = (se != 0) if dc_band else (ss > se or se > 63 or ns != 1)
        bad = bad or (ah != 0 and al != ah - 1) or al > 13
        if bad:
            raise _fail("corrupt JPEG: bad progressive scan parameters")
        need_dc, need_ac = dc_band and ah == 0, not dc_band
    elif (ss, se, ah, al) != (0, 63, 0, 0):
        raise _fail("corrupt JPEG: bad sequential scan parameters")
    for comp, (td, ta) in zip(seen, tables):
        if (need_dc and td not in dc_tables) or (need_ac and ta not in ac_tables):
            raise _fail("corrupt JPEG: scan uses an undefined Huffman table")
        if comp.tq not in q_tables:
            raise _fail("corrupt JPEG: component uses an undefined quantisation table")


# ------------------------------------------------------------------------------------------- orientation


def _header_segments(data: bytes) -> list[bytes]:
    """APPn segments before the first scan (tolerant, stops at the first problem); no full validation."""
    out = []
    n, pos = len(data), 2
    if n < 4 or data[:2] != b"\xff\xd8":
        return out
    while pos + 4 <= n and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker in (0xDA, 0xD9):
            break
        end = pos + 2 + _u16(data, pos + 2)
        if end > n:
            break
        if 0xE0 <= marker <= 0xEF:
            out.append(data[pos:end])
        pos = end
    return out


def _orientation_from_segments(segments: Sequence[bytes]) -> int:
    for seg in segments:
        if seg[1] == 0xE1 and seg[4:10] == b"Exif\x00\x00":
            return _tiff_orientation(seg[10:])
    return 1


_XMP_HEADER = b"http://ns.adobe.com/xap/1.0/\x00"
_XMP_ORIENTATION = re.compile(rb'tiff:Orientation(="|>)([0-9])')  # what Pillow reads when EXIF has none


def _orientation_only_in_xmp(segments: Sequence[bytes]) -> bool:
    """Whether the orientation a decoder like Pillow applies comes from XMP alone (no EXIF Orientation tag, an
    XMP ``tiff:Orientation`` other than 1)."""
    for seg in segments:
        if seg[1] == 0xE1 and seg[4:10] == b"Exif\x00\x00" and _tiff_orientation(seg[10:], None) is not None:
            return False
    for seg in segments:
        if seg[1] == 0xE1 and seg[4:4 + len(_XMP_HEADER)] == _XMP_HEADER:
            m = _XMP_ORIENTATION.search(seg, 4 + len(_XMP_HEADER))
            return m is not None and m[2] != b"1"
    return False


def _tiff_orientation(tiff: bytes, absent: int | None = 1) -> int | None:
    """Orientation (tag 0x0112 of IFD0) of a TIFF/EXIF block; 1 when invalid (as Pillow does), ``absent`` when
    there is no such tag."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return absent
    order = "little" if tiff[:2] == b"II" else "big"

    def u(pos: int, size: int) -> int:
        return int.from_bytes(tiff[pos:pos + size], order)

    ifd = u(4, 4)
    if ifd + 2 > len(tiff):
        return absent
    count = u(ifd, 2)
    for k in range(count):
        entry = ifd + 2 + 12 * k
        if entry + 12 > len(tiff):
            break
        if u(entry, 2) == 0x0112:
            typ = u(entry + 2, 2)
            value = u(entry + 8, 2) if typ == 3 else u(entry + 8, 4) if typ == 4 else 0
            return value if 1 <= value <= 8 else 1
    return absent


def _exif_for_crop(seg: bytes, size: tuple[int, int]) -> bytes:
    """An EXIF APP1 segment fit for a crop of stored ``size`` (w, h), edited in place so that no offset moves
    (maker notes keep working): PixelXDimension/PixelYDimension say ``size``, and the thumbnail (IFD1, a picture
    of the whole uncropped photo, which file browsers show) is unlinked and its bytes zeroed.  A block it
    cannot follow is returned as it was."""
    t = bytearray(seg[10:])
    if len(t) < 8 or t[:2] not in (b"II", b"MM"):
        return seg
    order = "little" if t[:2] == b"II" else "big"

    def u(pos: int, n: int) -> int:
        return int.from_bytes(t[pos:pos + n], order)

    def entries(ifd: int):
        """(position, tag, type, count) of an IFD's entries; none when it lies outside the block."""
        if not 8 <= ifd <= len(t) - 2:
            return []
        n = u(ifd, 2)
        return [(e, u(e, 2), u(e + 2, 2), u(e + 4, 4)) for e in range(ifd + 2, ifd + 2 + 12 * n, 12)
                if e + 12 <= len(t)]

    def value(e: int, typ: int) -> int:  # a SHORT or LONG entry's single value
        return u(e + 8, 2) if typ == 3 else u(e + 8, 4)

    ifd0 = u(4, 4)
    for e, tag, typ, _count in entries(ifd0):
        if tag != 0x8769 or typ not in (4, 13):
            continue
        for se, sub_tag, sub_typ, count in entries(u(e + 8, 4)):
            if sub_tag in (0xA002, 0xA003) and count == 1 and sub_typ in (3, 4):
                new = size[0] if sub_tag == 0xA002 else size[1]
                if new > 0xFFFF:
                    sub_typ = 4
                    t[se + 2:se + 4] = (4).to_bytes(2, order)  # SHORT -> LONG
                t[se + 8:se + 12] = new.to_bytes(2 if sub_typ == 3 else 4, order).ljust(4, b"\x00")
    nxt = ifd0 + 2 + 12 * u(ifd0, 2) if 8 <= ifd0 <= len(t) - 2 else -1
    if 0 <= nxt <= len(t) - 4 and u(nxt, 4):
        thumb = {tag: (e, typ) for e, tag, typ, count in entries(u(nxt, 4)) if count == 1 and typ in (3, 4)}
        for off_tag, len_tag in ((0x0201, 0x0202), (0x0111, 0x0117)):  # JPEG thumbnail, or one strip
            if off_tag in thumb and len_tag in thumb:
                off, n = value(*thumb[off_tag]), value(*thumb[len_tag])
                end = min(off + n, len(t))
                if 8 <= off < end:
                    t[off:end] = bytes(end - off)
        t[nxt:nxt + 4] = bytes(4)
    return seg[:10] + bytes(t)


def read_orientation(data: bytes) -> int:
    """EXIF orientation (1-8) of a JPEG; 1 when there is no EXIF, no tag, or an invalid value.  Reads only
    the header segments, so it is cheap."""
    return _orientation_from_segments(_header_segments(data))


# ---------------------------------------------------------------------------------------------- geometry


def _upright_size(stored: tuple[int, int], orientation: int) -> tuple[int, int]:
    w, h = stored
    return (h, w) if orientation >= 5 else (w, h)


def _map_point(x: int, y: int, orientation: int, size: tuple[int, int], to_stored: bool) -> tuple[int, int]:
    """Map a corner (pixel-edge coordinates) between upright and stored images.  ``size`` is the stored
    (w, h).  The upright image is the stored one transposed as Pillow's ``ImageOps.exif_transpose`` does."""
    ws, hs = size
    if to_stored:
        return {
            1: (x, y), 2: (ws - x, y), 3: (ws - x, hs - y), 4: (x, hs - y),
            5: (y, x), 6: (y, hs - x), 7: (ws - y, hs - x), 8: (ws - y, x),
        }[orientation]
    return {
        1: (x, y), 2: (ws - x, y), 3: (ws - x, hs - y), 4: (x, hs - y),
        5: (y, x), 6: (hs - y, x), 7: (hs - y, ws - x), 8: (y, ws - x),
    }[orientation]


def _map_box(box: Box, orientation: int, stored: tuple[int, int], to_stored: bool) -> Box:
    x0, y0 = _map_point(box[0], box[1], orientation, stored, to_stored)
    x1, y1 = _map_point(box[2], box[3], orientation, stored, to_stored)
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


def _check_orientation(orientation: Any) -> int:
    if isinstance(orientation, bool) or not isinstance(orientation, int) or not 1 <= orientation <= 8:
        raise ValueError(f"EXIF orientation must be an int in 1-8, got {orientation!r}")
    return orientation


def snap_box(box_upright: Sequence[float], full_size_upright: tuple[int, int], orientation: int,
             imcu: tuple[int, int]) -> Box:
    """The box a lossless crop of ``box_upright`` = (left, top, right, bottom) actually produces.

    ``full_size_upright`` is the upright image size, ``imcu`` the stored-orientation iMCU (see
    :func:`imcu_size`).  Coordinates are rounded to integers; a box sticking out of the image is shifted back
    inside (keeping its size).  In stored orientation the top-left corner is then moved down to the iMCU grid
    (floor), keeping width and height exact, so the box moves by less than one iMCU along each axis and never
    leaves the image.  Returns the upright box.  Pure function.  ``ValueError`` for an empty box, a box larger
    than the image or an invalid orientation.
    """
    orientation = _check_orientation(orientation)
    wu, hu = (int(v) for v in full_size_upright)
    mw, mh = (int(v) for v in imcu)
    if wu < 1 or hu < 1 or mw < 1 or mh < 1:
        raise ValueError(f"invalid image size {full_size_upright} or iMCU {imcu}")
    left, top, right, bottom = (int(round(v)) for v in box_upright)
    bw, bh = right - left, bottom - top
    if bw < 1 or bh < 1:
        raise ValueError(f"empty crop box {tuple(box_upright)}")
    if bw > wu or bh > hu:
        raise ValueError(f"crop box {tuple(box_upright)} is larger than the image ({wu}x{hu})")
    left, top = min(max(left, 0), wu - bw), min(max(top, 0), hu - bh)
    stored = _upright_size((wu, hu), orientation)  # the swap is its own inverse
    sx0, sy0, sx1, sy1 = _map_box((left, top, left + bw, top + bh), orientation, stored, to_stored=True)
    sw, sh = sx1 - sx0, sy1 - sy0
    sx0, sy0 = sx0 // mw * mw, sy0 // mh * mh
    snapped = (sx0, sy0, sx0 + sw, sy0 + sh)
    return _map_box(snapped, orientation, stored, to_stored=False)


def imcu_size(data: bytes) -> tuple[int, int]:
    """(w, h) in pixels of the iMCU of a JPEG, in stored orientation, from its SOF sampling factors: (8, 8)
    for 4:4:4 and grayscale, (16, 8) for 4:2:2, (16, 16) for 4:2:0.  :class:`LosslessUnsupported` if the
    file can't be cropped losslessly."""
    return probe(data).imcu


def upright_size(data: bytes, orientation: int | None = None) -> tuple[int, int]:
    """(w, h) of the JPEG once ``orientation`` (default: its own EXIF orientation) is applied."""
    info = probe(data)
    return _upright_size((info.width, info.height), info.orientation if orientation is None else orientation)


# ----------------------------------------------------------------------------------------------- backend

_lock = threading.Lock()
_backend_cache: Any = None  # _Backend once loaded, or the str reason it can't be


def _load_backend() -> "_Backend | str":
    global _backend_cache
    with _lock:
        if _backend_cache is None:
            _backend_cache = _TurboBackend.load() if os.environ.get("SMARTCROP_JPEG_BACKEND", "") in ("", "turbo") \
                else None
            if not isinstance(_backend_cache, _TurboBackend):
                try:
                    _backend_cache = _Backend()
                except ImportError:
                    _backend_cache = f"lossless JPEG crops need jpeglib: {INSTALL_HINT}"
                except Exception as err:  # _BackendError, or a broken jpeglib install
                    _backend_cache = f"lossless JPEG crops unavailable: {err}".splitlines()[0]
        return _backend_cache


def backend_name() -> str:
    """``"libjpeg-turbo"`` (the system's TurboJPEG library), ``"jpeglib"``, or ``""`` when unavailable."""
    backend = _load_backend()
    return "" if isinstance(backend, str) else backend.name


def available() -> bool:
    """True when lossless crops can be made (the jpeglib backend is installed and usable)."""
    return not isinstance(_load_backend(), str)


def unavailable_reason() -> str:
    """One line saying why lossless crops are unavailable ("" when they are available)."""
    backend = _load_backend()
    return backend if isinstance(backend, str) else ""


class _BackendError(Exception):
    pass


# libjpeg builds shipped in jpeglib, fastest first (libjpeg-turbo's Huffman codec is the quickest).
_FLAVOURS = ("turbo210", "turbo200", "turbo150", "9f", "9e", "6b")
_SUPPORTED_JPEGLIB = ("1.0.",)  # the C entry points used below are those of jpeglib 1.0.x
_JCS_GRAYSCALE, _JCS_YCBCR = 1, 3
_OPTIMIZE_CODING = 1 << 6  # jpeglib's flag bit


_WARNINGS_LOCK = threading.Lock()  # held while a backend's warnings are caught (process-wide state)
# what libjpeg prints on stderr when it steps over damaged data (its emit_message: one line each)
_LIBJPEG_WARNING = re.compile(rb"^(Corrupt JPEG data|Premature end of JPEG file|Invalid |Inconsistent |Warning: )")


@contextlib.contextmanager
def _libjpeg_warnings():
    """Collect what libjpeg prints on file descriptor 2 meanwhile: the body runs with fd 2 on a temporary file
    (under :data:`_WARNINGS_LOCK`: the descriptor is the process's).  Yields a list that receives libjpeg's
    warning lines when the body ends; any other output caught meanwhile (another thread's) goes on to the real
    stderr."""
    import tempfile

    lines: list[bytes] = []
    with _WARNINGS_LOCK, tempfile.TemporaryFile() as tmp:
        try:
            saved = os.dup(2)
        except OSError:  # no stderr (2>&-): nothing to catch, nothing to keep off it
            yield lines
            return
        try:
            os.dup2(tmp.fileno(), 2)
            try:
                yield lines
            finally:
                os.dup2(saved, 2)
            tmp.seek(0)
            other = b""
            for line in tmp.read().splitlines(keepends=True):
                if _LIBJPEG_WARNING.match(line):
                    lines.append(line.strip())
                else:
                    other += line
            if other:
                os.write(2, other)
        finally:
            os.close(saved)


class _TurboBackend:
    """libjpeg-turbo's own lossless transform (``tjTransform`` with ``TJXOPT_CROP``, what ``jpegtran -crop``
    does) through PyTurboJPEG and the system's TurboJPEG library: about twice as fast as jpeglib (~45 ms against
    ~90 ms CPU for a 12 MP 4:2:0 crop).  Optional: ``pip install 'PyTurboJPEG>=1.7,<2'`` (the ``turbo`` extra)
    plus the system library (Debian/Ubuntu ``libturbojpeg0``, Homebrew ``jpeg-turbo``).  Markers are not copied
    by the library (``TJXOPT_COPYNONE``): :func:`_assemble` puts the original's back, as for jpeglib."""

    name = "libjpeg-turbo"

    def __init__(self, tj) -> None:
        self._tj = tj

    @classmethod
    def load(cls) -> "_TurboBackend | None":
        try:
            from turbojpeg import TurboJPEG

            return cls(TurboJPEG())
        except Exception:  # noqa: BLE001 - not installed, or no system library: use jpeglib
            return None

    @staticmethod
    def grid(info: JpegInfo) -> tuple[int, int]:
        """The crop-origin grid this backend can cut on (stored orientation)."""
        return info.mcu

    def crop(self, data: bytes, info: JpegInfo, sbox: Box, optimize: bool) -> bytes:
        x1, y1, x2, y2 = sbox
        try:
            # preserve=True: the region is kept exactly (x, y are on the iMCU grid already; no clamping of the
            # size to whole iMCUs at the image's right and bottom edges)
            # PyTurboJPEG reports damage libjpeg stepped over ("Corrupt JPEG data: …") as a Python warning, which
            # named no file on the run's stderr: such a crop is re-encoded from the decoded photo instead.
            # catch_warnings is process-wide state, hence the lock (turbo crops of one process go one at a time)
            with _WARNINGS_LOCK, warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = bytes(self._tj.crop(data, x1, y1, x2 - x1, y2 - y1, preserve=True, copynone=True))
        except OSError as err:
            raise LosslessUnsupported(f"libjpeg-turbo refused the crop ({str(err).splitlines()[0]})") from err
        damage = [w for w in caught if w.filename.endswith("turbojpeg.py")]
        for w in caught:
            if w not in damage:  # another thread's warning, caught meanwhile: passed on
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if damage:
            raise LosslessUnsupported(f"damaged JPEG data ({str(damage[0].message).splitlines()[0]})")
        got = probe(out)
        if (got.width, got.height) != (x2 - x1, y2 - y1):  # libjpeg-turbo moved the origin to a grid of its own
            raise LosslessUnsupported(f"libjpeg-turbo cut {got.width} x {got.height} instead of {x2 - x1} x "
                                      f"{y2 - y1}")
        return out


class _Backend:
    """jpeglib's C layer, called directly: ``read_jpeg_dct`` / ``write_jpeg_dct`` of one libjpeg build.

    jpeglib's Python API would also work but costs ~50 ms more per 12 MP photo (it parses every file twice,
    converts arrays element by element and copies markers through Python lists).  The shared library is
    loaded by path, independently of jpeglib's global version switch, and the calls release the GIL.
    """

    def __init__(self) -> None:
        import ctypes
        from pathlib import Path

        import jpeglib  # ImportError -> unavailable
        import numpy as np

        version = str(getattr(jpeglib, "__version__", ""))
        if not version.startswith(_SUPPORTED_JPEGLIB):
            raise _BackendError(f"jpeglib {version or '?'} is not supported (need 1.0.x)")
        libdir = Path(jpeglib.__file__).resolve().parent / "cjpeglib"
        names = sorted(p.name for p in libdir.glob("cjpeglib_*")) if libdir.is_dir() else []
        for flavour in _FLAVOURS:
            found = [nm for nm in names if re.fullmatch(rf"cjpeglib_{flavour}(\..*)?\.(so|dll|pyd)", nm)]
            if found:
                break
        else:
            raise _BackendError("jpeglib ships no usable libjpeg build")
        try:
            lib = ctypes.CDLL(str(libdir / found[0]))
            self._read, self._write = lib.read_jpeg_dct, lib.write_jpeg_dct
        except (OSError, AttributeError) as err:
            raise _BackendError(f"cannot load jpeglib's {found[0]}: {err}") from err
        self.flavour = flavour
        self.name = "jpeglib"
        self._ct = ctypes
        self._np = np
        self._tmpdir = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None

    def _temp(self) -> str:
        import tempfile

        fd, path = tempfile.mkstemp(prefix="smartcrop-", suffix=".jpg", dir=self._tmpdir)
        os.close(fd)
        return path

    @staticmethod
    def grid(info: JpegInfo) -> tuple[int, int]:
        """The crop-origin grid this backend can cut on: coefficients are copied component by component, so
        the iMCU of the reduced sampling factors (:attr:`JpegInfo.imcu`)."""
        return info.imcu

    def crop(self, data: bytes, info: JpegInfo, sbox: Box, optimize: bool) -> bytes:
        ct, np = self._ct, self._np
        short_p, ushort_p = ct.POINTER(ct.c_short), ct.POINTER(ct.c_ushort)
        sampling = info.sampling
        hmax, vmax = max(h for h, _ in sampling), max(v for _, v in sampling)
        # full coefficient arrays, shaped as libjpeg sizes them (width_in_blocks x height_in_blocks)
        src = [np.empty((-(-info.height * v // (8 * vmax)), -(-info.width * h // (8 * hmax)), 64), np.int16)
               for h, v in sampling]
        qt = np.zeros((4, 64), np.uint16)
        qn = np.full(4, -1, np.int16)
        ptrs = [a.ctypes.data_as(short_p) for a in src] + [None] * (3 - len(src))
        path = self._temp()
        try:
            with open(path, "wb") as f:
                f.write(data)
            # libjpeg prints damage it steps over on stderr, naming no file: such a crop is re-encoded instead
            with _libjpeg_warnings() as damage:
                ok = self._read(path.encode(), ptrs[0], ptrs[1], ptrs[2], None, qt.ctypes.data_as(ushort_p),
                                qn.ctypes.data_as(short_p))
        finally:
            os.unlink(path)
        if damage:
            raise LosslessUnsupported(f"damaged JPEG data ({damage[0].decode('ascii', 'replace')})")
        if ok != 1:
            raise LosslessUnsupported("jpeglib could not read the JPEG's coefficients")
        if [int(t) for t in qn[:len(src)]] != [c.tq for c in info.components]:
            raise LosslessUnsupported("jpeglib read unexpected quantisation table assignments")

        x0, y0, x1, y1 = sbox
        w, h = x1 - x0, y1 - y0
        out = []
        for arr, (ch, cv) in zip(src, sampling):
            bx, by = x0 // (8 * hmax) * ch, y0 // (8 * vmax) * cv
            nbx, nby = -(-w * ch // (8 * hmax)), -(-h * cv // (8 * vmax))
            out.append(np.ascontiguousarray(arr[by:by + nby, bx:bx + nbx]))
        for arr in out:
            # libjpeg's Huffman encoder aborts (crashing the process) on coefficients out of the 8-bit range
            hi, lo = int(arr.max()), int(arr.min())
            if hi > 1023 or lo < -1024 or (lo == -1024 and int(arr[..., 1:].min()) < -1023):
                raise LosslessUnsupported("JPEG has DCT coefficients outside the 8-bit range (corrupt data?)")

        # quantisation tables renumbered by first use (works around jpeglib's table-slot bookkeeping)
        slots: list[int] = []
        for c in info.components:
            if c.tq not in slots:
                slots.append(c.tq)
        qt_out = np.zeros((4, 64), np.uint16)
        for k, t in enumerate(slots):
            qt_out[k] = qt[t]
        qn_out = np.full(4, -1, np.int16)
        for i, c in enumerate(info.components):
            qn_out[i] = slots.index(c.tq)
        dims = (ct.c_int * 2)(h, w)
        block_dims = (ct.c_int * 6)(*[int(v) for a in out for v in a.shape[:2]], *[0] * (6 - 2 * len(out)))
        samp = (ct.c_int * 6)(*[v for hh, vv in sampling for v in (vv, hh)], *[0] * (6 - 2 * len(out)))
        optr = [a.ctypes.data_as(short_p) for a in out] + [None] * (3 - len(out))
        color = _JCS_GRAYSCALE if len(out) == 1 else _JCS_YCBCR
        flags = _OPTIMIZE_CODING if optimize else 0
        path = self._temp()
        try:
            ok = self._write(None, path.encode(), optr[0], optr[1], optr[2], None, dims, block_dims, samp,
                             color, len(out), qt_out.ctypes.data_as(ushort_p), ct.c_short(-1),
                             qn_out.ctypes.data_as(short_p), 0, None, None, None, ct.c_uint(flags),
                             ct.c_uint(flags))
            with open(path, "rb") as f:
                encoded = f.read()
        finally:
            os.unlink(path)
        if ok != 1 or len(encoded) < 4:
            raise LosslessUnsupported("jpeglib could not write the cropped JPEG")
        return encoded


# ------------------------------------------------------------------------------------------------- crop


def _assemble(encoded: bytes, info: JpegInfo) -> bytes:
    """The backend's JPEG with its own APPn segments replaced by the original's metadata segments and its
    component ids set to the original's (so decoders infer the same colour space)."""
    n, pos = len(encoded), 2
    parts = [b"\xff\xd8", *info.metadata]
    ids: dict[int, int] = {}
    while pos + 4 <= n and encoded[pos] == 0xFF:
        marker = encoded[pos + 1]
        end = pos + 2 + _u16(encoded, pos + 2)
        seg = bytearray(encoded[pos:end])
        if marker in (0xC0, 0xC1, 0xC2):
            for i, comp in enumerate(info.components):
                off = 10 + 3 * i
                ids[seg[off]] = comp.id
                seg[off] = comp.id
        elif marker == 0xDA:
            for k in range(seg[4]):
                if seg[5 + 2 * k] not in ids:
                    raise LosslessUnsupported("unexpected output from jpeglib (component ids)")
                seg[5 + 2 * k] = ids[seg[5 + 2 * k]]
            parts.append(bytes(seg))
            parts.append(encoded[end:])
            return b"".join(parts)
        if not (0xE0 <= marker <= 0xEF or marker == 0xFE):
            parts.append(bytes(seg))
        pos = end
    raise LosslessUnsupported("unexpected output from jpeglib (no scan)")


def lossless_crop(data: bytes, box_upright: Sequence[float], orientation: int | None = None, *,
                  optimize: bool = False, strip: bool = False) -> tuple[bytes, Box]:
    """Crop a JPEG without re-encoding: returns ``(jpeg_bytes, box_used)``.

    ``box_upright`` = (left, top, right, bottom) in upright pixel coordinates; ``orientation`` is the EXIF
    orientation the upright view was made with (default: read from ``data``).  ``box_used`` is the upright box
    really produced (:func:`snap_box`): same size, shifted by less than one iMCU.  The crop's coefficients
    and quantisation tables are the original's; metadata segments are copied and the Orientation tag kept (the
    EXIF block fit for the crop: :func:`_exif_for_crop`).
    ``optimize`` computes optimal Huffman tables (~10 % smaller file, ~15 % slower).  ``strip`` keeps only
    the JFIF and Adobe segments (which say how to decode the colours): no EXIF, XMP, ICC, IPTC or comment.

    Raises :class:`LosslessUnsupported` when the file can't be cropped losslessly (re-encode instead), and
    ``ValueError`` for an invalid box or orientation.
    """
    info = probe(data)
    if _orientation_only_in_xmp(info.metadata):
        # decoders disagree on such a file (Pillow turns it, browsers do not): re-encoded, it is stored upright
        raise LosslessUnsupported("JPEG whose orientation is given only in XMP")
    if orientation is None:
        orientation = info.orientation
    orientation = _check_orientation(orientation)
    stored = (info.width, info.height)
    backend = _load_backend()
    if isinstance(backend, str):
        raise LosslessUnsupported(backend)
    used = snap_box(box_upright, _upright_size(stored, orientation), orientation, backend.grid(info))
    sbox = _map_box(used, orientation, stored, to_stored=True)
    encoded = backend.crop(bytes(data), info, sbox, optimize)
    if strip:
        info = dataclasses.replace(info, metadata=tuple(seg for seg in info.metadata if seg[1] in (0xE0, 0xEE)))
    else:
        size = (sbox[2] - sbox[0], sbox[3] - sbox[1])
        info = dataclasses.replace(info, metadata=tuple(
            _exif_for_crop(seg, size) if seg[1] == 0xE1 and seg[4:10] == b"Exif\x00\x00" else seg
            for seg in info.metadata))
    return _assemble(encoded, info), used
