"""A loss-curve PNG with numpy + zlib only (no matplotlib): axes, tick labels in a 3x5 pixel font, two series."""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..files import atomic_write

# 3x5 glyphs, rows top to bottom, '1' = ink; only the characters the plot writes
FONT = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001010010010",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    "+": "000010111010000", " ": "000000000000000", ":": "000010000010000",
    "a": "000011101101011", "e": "000111111100011", "i": "010000010010010", "l": "110010010010111",
    "n": "000110101101101", "o": "000111101101111", "p": "000111101111100", "r": "000111100100100",
    "s": "000011110001110", "t": "010111010010011", "v": "000101101101010",
}
BLUE, ORANGE, BLACK, GREY = (31, 119, 180), (255, 127, 14), (0, 0, 0), (225, 225, 225)


def png_bytes(img: np.ndarray) -> bytes:
    """Encode an (H, W, 3) uint8 image as PNG (8-bit RGB, no filtering)."""
    h, w, _ = img.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), img.reshape(h, w * 3)], axis=1).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def draw_text(img: np.ndarray, x: int, y: int, text: str, color=BLACK, scale: int = 2) -> None:
    """Text with its top-left corner at (x, y); unknown characters are drawn as blanks."""
    for ch in text.lower():
        glyph = FONT.get(ch, FONT[" "])
        for i, bit in enumerate(glyph):
            if bit == "1":
                r, c = divmod(i, 3)
                img[y + r * scale:y + (r + 1) * scale, x + c * scale:x + (c + 1) * scale] = color
        x += 4 * scale


def text_width(text: str, scale: int = 2) -> int:
    return len(text) * 4 * scale - scale


def draw_text_up(img: np.ndarray, x: int, y: int, text: str, color=BLACK, scale: int = 2) -> None:
    """Text reading bottom to top (a y-axis label) with its top-left corner at (x, y)."""
    h, w = 5 * scale, text_width(text, scale)
    tile = np.full((h, w, 3), 255, np.uint8)
    draw_text(tile, 0, 0, text, color, scale)
    up = np.rot90(tile)  # (w, h, 3): a quarter turn counter-clockwise
    region = img[y:y + up.shape[0], x:x + up.shape[1]]
    ink = (up != 255).any(axis=-1)
    region[ink] = up[ink]


def draw_line(img: np.ndarray, x0: float, y0: float, x1: float, y1: float, color, width: int = 2) -> None:
    """A straight segment, sampled at sub-pixel steps and stamped width x width."""
    n = int(max(abs(x1 - x0), abs(y1 - y0)) * 2) + 1
    xs = np.round(np.linspace(x0, x1, n)).astype(int)
    ys = np.round(np.linspace(y0, y1, n)).astype(int)
    H, W, _ = img.shape
    for dx in range(width):
        for dy in range(width):
            img[np.clip(ys + dy - width // 2, 0, H - 1), np.clip(xs + dx - width // 2, 0, W - 1)] = color


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values (1, 2, 5 x 10^k steps) covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


def _label(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e5 or abs(v) < 1e-3:
        return f"{v:.0e}".replace("e+0", "e").replace("e-0", "e-")
    return f"{v:.4g}"


def loss_curve_png(steps: Sequence[float], losses: Sequence[float], eval_steps: Sequence[float] = (),
                   eval_losses: Sequence[float] = (), width: int = 800, height: int = 480) -> np.ndarray:
    """Render train loss (blue line) and eval loss (orange dots+line) against step. -> (H, W, 3) uint8"""
    img = np.full((height, width, 3), 255, np.uint8)
    left, right, top, bottom = 90, 20, 40, 50
    pw, ph = width - left - right, height - top - bottom
    xs_all = list(steps) + list(eval_steps)
    ys_all = [y for y in list(losses) + list(eval_losses) if math.isfinite(y)]
    if not xs_all or not ys_all:
        draw_text(img, left, top, "no data")
        return img
    xlo, xhi = min(xs_all), max(xs_all)
    xhi = xhi if xhi > xlo else xlo + 1
    ylo, yhi = min(ys_all), max(ys_all)
    pad = (yhi - ylo) * 0.05 or abs(yhi) * 0.05 or 1.0
    ylo, yhi = ylo - pad, yhi + pad

    def px(x: float) -> float:
        return left + (x - xlo) / (xhi - xlo) * pw

    def py(y: float) -> float:
        return top + (yhi - y) / (yhi - ylo) * ph

    for t in nice_ticks(ylo, yhi, 8):  # horizontal grid + y labels
        y = int(round(py(t)))
        img[y, left:left + pw] = GREY
        img[y, left - 5:left] = BLACK
        s = _label(t)
        draw_text(img, left - 8 - text_width(s), y - 5, s)
    for t in nice_ticks(xlo, xhi, 6):  # x ticks + labels
        x = int(round(px(t)))
        img[top + ph:top + ph + 5, x] = BLACK
        s = _label(t)
        draw_text(img, x - text_width(s) // 2, top + ph + 9, s)
    img[top:top + ph + 1, left] = BLACK  # axes
    img[top + ph, left:left + pw + 1] = BLACK
    draw_text(img, left + pw // 2 - text_width("step") // 2, height - 18, "step")  # axis labels
    draw_text_up(img, 12, top + ph // 2 - text_width("loss") // 2, "loss")
    legend = [("train loss", BLUE, False)] + ([("eval loss", ORANGE, True)] if eval_losses else [])
    x = left + 10
    for name, color, dot in legend:  # a line swatch per series, as it is drawn
        draw_line(img, x, 17, x + 24, 17, color)
        if dot:
            draw_line(img, x + 12, 17, x + 12, 17, color, width=6)
        draw_text(img, x + 32, 12, name, color)
        x += 32 + text_width(name) + 30

    def series(xs, ys, color, dots):
        pts = [(px(x), py(y)) for x, y in zip(xs, ys) if math.isfinite(y)]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            draw_line(img, x0, y0, x1, y1, color)
        for x, y in pts if (dots or len(pts) == 1) else []:
            draw_line(img, x, y, x, y, color, width=6)

    series(steps, losses, BLUE, dots=False)
    series(eval_steps, eval_losses, ORANGE, dots=True)
    return img


def write_loss_png(path, records: list[dict]) -> Path:
    """Plot metrics.jsonl records ({"step", "loss"} and {"step", "eval_loss"}) to a PNG, atomically."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and "step" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r and "step" in r]
    img = loss_curve_png([s for s, _ in train], [v for _, v in train], [s for s, _ in evals], [v for _, v in evals])
    return atomic_write(path, png_bytes(img))


def read_png_size(path) -> Optional[tuple[int, int]]:
    """(width, height) from a PNG header, or None if the file is not a PNG."""
    data = Path(path).read_bytes()[:24]
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    return struct.unpack(">II", data[16:24])
