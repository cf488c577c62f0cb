"""Just enough PNG (8-bit RGB, no interlace) to write tiles and stitch them, without Pillow."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def encode(width: int, rows: list[bytes]) -> bytes:
    """Rows of width*3 RGB bytes to a PNG file's bytes."""
    header = struct.pack(">IIBBBBB", width, len(rows), 8, 2, 0, 0, 0)
    raw = b"".join(b"\x00" + row for row in rows)
    return (SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 6))
            + _chunk(b"IEND", b""))


def decode(data: bytes) -> tuple[int, list[bytes]]:
    """A PNG written by `encode` back to (width, rows)."""
    if not data.startswith(SIGNATURE):
        raise ValueError("not a PNG file")
    position, width, height, idat = len(SIGNATURE), 0, 0, b""
    while position < len(data):
        (length,) = struct.unpack(">I", data[position:position + 4])
        kind = data[position + 4:position + 8]
        body = data[position + 8:position + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
            if (depth, colour) != (8, 2):
                raise ValueError("only 8-bit RGB PNG files are supported")
        elif kind == b"IDAT":
            idat += body
        position += 12 + length
    raw = zlib.decompress(idat)
    stride = width * 3 + 1
    rows = [raw[i * stride:(i + 1) * stride] for i in range(height)]
    if any(row[0] != 0 for row in rows):
        raise ValueError("only unfiltered PNG rows are supported")
    return width, [row[1:] for row in rows]


def stitch(tiles: list[Path], output: Path) -> Path:
    """Tiles of horizontal bands, in order, into one PNG."""
    width, rows = 0, []
    for tile in tiles:
        tile_width, tile_rows = decode(tile.read_bytes())
        if width and tile_width != width:
            raise ValueError(f"{tile} is {tile_width} wide, the others {width}")
        width = tile_width
        rows += tile_rows
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(encode(width, rows))
    return output
