"""Contact sheets: each photo with its chosen crops drawn, for people who want to look before trusting."""

from __future__ import annotations

from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

COLOURS = [(255, 64, 64), (64, 200, 255), (255, 210, 0), (120, 255, 120), (255, 120, 255), (255, 150, 50)]
THUMB = 280  # longest side of a thumbnail
LABEL_H = 16


def thumbnail_with_boxes(image: Image.Image, full_size: tuple, crops: Sequence, title: str) -> Image.Image:
    """A small copy of ``image`` with every crop's box drawn (one colour per ratio) and a caption."""
    fw, fh = full_size
    s = THUMB / max(fw, fh)
    tw, th = max(1, round(fw * s)), max(1, round(fh * s))
    thumb = image.convert("RGB").resize((tw, th), Image.BILINEAR, reducing_gap=2.0)
    tile = Image.new("RGB", (THUMB, THUMB + LABEL_H), (32, 32, 32))
    ox, oy = (THUMB - tw) // 2, (THUMB - th) // 2
    tile.paste(thumb, (ox, oy))
    d = ImageDraw.Draw(tile)
    ratios: list[str] = []
    for c in crops:
        if c.ratio not in ratios:
            ratios.append(c.ratio)
        col = COLOURS[ratios.index(c.ratio) % len(COLOURS)]
        x1, y1, x2, y2 = c.box
        d.rectangle([ox + x1 * s, oy + y1 * s, ox + x2 * s - 1, oy + y2 * s - 1], outline=col, width=2)
    font = ImageFont.load_default()
    caption = f"{title[:28]}  " + " ".join(ratios)
    d.text((3, THUMB + 2), caption, fill=(230, 230, 230), font=font)
    return tile


def contact_sheet(tiles: Sequence[Image.Image], columns: int = 5) -> Image.Image:
    """Tiles in a grid, left to right, top to bottom."""
    cols = max(1, min(columns, len(tiles)))
    rows = (len(tiles) + cols - 1) // cols
    tw, th = tiles[0].size
    sheet = Image.new("RGB", (cols * tw, rows * th), (16, 16, 16))
    for i, t in enumerate(tiles):
        sheet.paste(t, ((i % cols) * tw, (i // cols) * th))
    return sheet
