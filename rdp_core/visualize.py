"""Image grids written as PNG with the standard library alone (zlib + struct), so results can be looked at."""
import struct
import zlib

import torch


def image_grid(rows, padding=2):
    """One (3, H', W') uint8 image holding `rows` (a list of (N, C, H, W) batches in [0, 1]) one per row."""
    n, _, h, w = rows[0].shape
    grid = torch.full((3, len(rows) * (h + padding) + padding, n * (w + padding) + padding), 255, dtype=torch.uint8)
    for r, batch in enumerate(rows):
        if (batch.shape[0], *batch.shape[2:]) != (n, h, w) or batch.shape[1] not in (1, 3):
            raise ValueError(f"every row needs {n} images of 1 or 3 channels and {h}x{w} pixels, "
                             f"row {r} has shape {tuple(batch.shape)}")
        pixels = (batch.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().expand(-1, 3, -1, -1)
        top = padding + r * (h + padding)
        for c in range(n):
            left = padding + c * (w + padding)
            grid[:, top:top + h, left:left + w] = pixels[c]
    return grid


def write_png(image, path):
    """Writes a (3, H, W) uint8 tensor as an 8-bit RGB PNG."""
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) uint8 image, got {tuple(image.shape)} {image.dtype}")
    _, height, width = image.shape
    rows = image.permute(1, 2, 0).contiguous().numpy()
    raw = b"".join(b"\x00" + rows[y].tobytes() for y in range(height))  # filter type 0 on every scanline

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
