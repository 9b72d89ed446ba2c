"""PNG charts with numpy + zlib only (no matplotlib), text in a 3x5 pixel font: a line chart of up to two series
(the loss curve; perplexity vs context length) and a heatmap (passkey retrieval by length and depth)."""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .files import atomic_write

# 3x5 glyphs, rows top to bottom, '1' = ink; digits, lowercase letters (text is lowercased) and some punctuation
FONT = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001010010010",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    "+": "000010111010000", " ": "000000000000000", ":": "000010000010000",
    "a": "000011101101011", "e": "000111111100011", "i": "010000010010010", "l": "110010010010111",
    "n": "000110101101101", "o": "000111101101111", "p": "000111101111100", "r": "000111100100100",
    "s": "000011110001110", "t": "010111010010011", "v": "000101101101010",
    "b": "100100111101111", "c": "000111100100111", "d": "001001111101111", "f": "011010111010010",
    "g": "111100101101111", "h": "100100111101101", "j": "001000001101111", "k": "100101110101101",
    "m": "000101111101101", "q": "000111101111001", "u": "000101101101111", "w": "000101101111111",
    "x": "000101010101101", "y": "101101010010010", "z": "000111001010111",
    "/": "001001010100100", "%": "101001010100101", "(": "010100100100010", ")": "010001001001010",
    ",": "000000000010100", "=": "000111000111000", "_": "000000000000111",
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


@dataclass(frozen=True)
class Chart:
    """How a line chart reads: its size, the axes' labels, the two series' legend names; dots marks the first
    series' points too."""

    x_label: str = "step"
    y_label: str = "loss"
    names: tuple[str, str] = ("train loss", "eval loss")
    dots: bool = False
    width: int = 800
    height: int = 480


def loss_curve_png(steps: Sequence[float], losses: Sequence[float], eval_steps: Sequence[float] = (),
                   eval_losses: Sequence[float] = (), chart: Chart = Chart()) -> np.ndarray:
    """Render train loss (blue line) and eval loss (orange dots+line) against step. -> (H, W, 3) uint8

    Any other pair of series too: `chart` says what the axes and the series are."""
    width, height, x_label, y_label = chart.width, chart.height, chart.x_label, chart.y_label
    names, dots = chart.names, chart.dots
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
    draw_text(img, left + pw // 2 - text_width(x_label) // 2, height - 18, x_label)  # axis labels
    draw_text_up(img, 12, top + ph // 2 - text_width(y_label) // 2, y_label)
    legend = [(names[0], BLUE, dots)] + ([(names[1], ORANGE, True)] if eval_losses else [])
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

    series(steps, losses, BLUE, dots=dots)
    series(eval_steps, eval_losses, ORANGE, dots=True)
    return img


def write_loss_png(path, records: list[dict]) -> Path:
    """Plot metrics.jsonl records ({"step", "loss"} and {"step", "eval_loss"}) to a PNG, atomically; scores of
    evaluation by generation ({"step", "gen/<name>"}, up to two) in a second chart beside the loss."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and "step" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r and "step" in r]
    img = loss_curve_png([s for s, _ in train], [v for _, v in train], [s for s, _ in evals], [v for _, v in evals])
    scores = sorted({k for r in records for k in r if k.startswith("gen/")})[:2]
    if scores:
        series = [[(r["step"], r[k]) for r in records if k in r and "step" in r] for k in scores]
        second = series[1] if len(series) > 1 else []
        names = (scores[0].removeprefix("gen/"), scores[-1].removeprefix("gen/"))
        beside = loss_curve_png([s for s, _ in series[0]], [v for _, v in series[0]], [s for s, _ in second],
                                [v for _, v in second], Chart(y_label="generation score", names=names, dots=True))
        img = np.concatenate([img, beside], axis=1)
    return atomic_write(path, png_bytes(img))


def _cell_color(value: float) -> tuple[int, int, int]:
    """0 red -> 0.5 yellow -> 1 green (the familiar needle-in-a-haystack scale); NaN grey."""
    if not math.isfinite(value):
        return GREY
    red, yellow, green = np.array((215, 48, 39)), np.array((254, 224, 139)), np.array((26, 152, 80))
    v = min(max(value, 0.0), 1.0)
    c = red + (yellow - red) * (v / 0.5) if v <= 0.5 else yellow + (green - yellow) * ((v - 0.5) / 0.5)
    return tuple(int(round(x)) for x in c)


@dataclass(frozen=True)
class HeatmapLabels:
    """What a heatmap's axes, title and colour legend say."""

    x_label: str
    y_label: str
    title: str
    legend: str = "found"


def heatmap_png(values: np.ndarray, x_ticks: Sequence[str], y_ticks: Sequence[str], labels: HeatmapLabels,
                cell_text: Optional[Sequence[Sequence[str]]] = None, cell: int = 64) -> np.ndarray:
    """values (rows = y, columns = x) in [0, 1] as coloured cells (red 0, green 1) with tick labels, axis labels,
    a title, optional text in each cell and a colour legend. -> (H, W, 3) uint8"""
    x_label, y_label, title, legend = labels.x_label, labels.y_label, labels.title, labels.legend
    n_y, n_x = values.shape
    left = 40 + max(text_width(t) for t in y_ticks)
    top, bottom, legend_w = 50, 60, 110
    width = max(left + n_x * cell + legend_w, left + text_width(title, 3) + 20)
    height = top + n_y * cell + bottom
    img = np.full((height, width, 3), 255, np.uint8)
    for r in range(n_y):
        for c in range(n_x):
            y0, x0 = top + r * cell, left + c * cell
            img[y0 + 1:y0 + cell - 1, x0 + 1:x0 + cell - 1] = _cell_color(float(values[r, c]))
            if cell_text is not None:
                t = cell_text[r][c]
                draw_text(img, x0 + (cell - text_width(t)) // 2, y0 + cell // 2 - 5, t)
    for c, t in enumerate(x_ticks):
        draw_text(img, left + c * cell + (cell - text_width(t)) // 2, top + n_y * cell + 8, t)
    for r, t in enumerate(y_ticks):
        draw_text(img, left - 8 - text_width(t), top + r * cell + cell // 2 - 5, t)
    draw_text(img, left + (n_x * cell - text_width(x_label)) // 2, height - 24, x_label)
    for i, ch in enumerate(y_label):  # the y label, one character per line down the left edge
        draw_text(img, 8, top + i * 13, ch)
    draw_text(img, left, 14, title, scale=3)
    bar_x, bar_h = left + n_x * cell + 30, n_y * cell  # the colour legend: 100% at the top, 0% at the bottom
    for i in range(bar_h):
        img[top + i, bar_x:bar_x + 20] = _cell_color(1 - i / max(bar_h - 1, 1))
    draw_text(img, bar_x + 26, top, "100%")
    draw_text(img, bar_x + 26, top + bar_h - 10, "0%")
    draw_text(img, bar_x, top + bar_h + 8, legend)
    return img


def read_png_size(path) -> Optional[tuple[int, int]]:
    """(width, height) from a PNG header, or None if the file is not a PNG."""
    data = Path(path).read_bytes()[:24]
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    return struct.unpack(">II", data[16:24])


def write_metrics_png(path, records: list[dict], keys: Sequence[str], columns: int = 3) -> Path:
    """One small chart per metrics.jsonl key (its value against step; keys no record has are left out), in a grid
    of `columns`, atomically: GRPO's reward, its std, KL, completion length, clip fraction and held-out score."""
    charts = []
    for k in keys:
        pts = [(r["step"], r[k]) for r in records if k in r and "step" in r and r[k] is not None]
        if pts:
            charts.append(loss_curve_png([s for s, _ in pts], [v for _, v in pts],
                                         chart=Chart(y_label=k, names=(k, ""), dots=True, width=480, height=320)))
    if not charts:
        raise ValueError(f"{path}: none of {', '.join(keys)} in the metrics")
    blank = np.full_like(charts[0], 255)
    charts += [blank] * (-len(charts) % columns)
    rows = [np.concatenate(charts[i:i + columns], axis=1) for i in range(0, len(charts), columns)]
    return atomic_write(path, png_bytes(np.concatenate(rows, axis=0)))
