"""A corpus of hostile and unusual input files, generated (no binary blobs in git).

`build_corpus(root)` writes every case under `root` and returns what each must give: an `ok` row whose
heatmap has the size a viewer shows (and, where we can say it exactly, the pixels a viewer shows), or an
`error` row whose reason contains a given phrase. `python tests/corpus.py [DIR]` builds it, runs
`gradcam explain` over it with a small model and prints the outcome of every case as a Markdown table.

Images are small and smooth (a blob on a gradient) so that JPEG round trips stay close to the source.
"""

from __future__ import annotations

import io
import os
import struct
import sys
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

W, H = 40, 24  # the (width, height) of most cases, as viewers show them
PILLOW_DEFAULT_MAX_PIXELS = 89_478_485


@dataclass(frozen=True)
class Case:
    """One corpus entry. `rel` is its path under the corpus root (a str; surrogate-escaped if not UTF-8)."""

    rel: str
    what: str
    expect: str  # "ok" or "error"
    reason: str = ""  # for errors: a phrase the error column must contain (case-insensitive)
    size: tuple[int, int] | None = None  # for ok: (width, height) of the heatmap and overlay
    pixels: np.ndarray | None = None  # for ok: the RGB pixels a viewer shows, when known exactly or nearly
    tolerance: float = 0.0  # mean absolute difference allowed against `pixels` (lossy formats)


# --- pixel sources ------------------------------------------------------------------------------------------


def smooth_rgb(width: int = W, height: int = H, seed: int = 0) -> np.ndarray:
    """A (height, width, 3) uint8 image: a bright blob on a colour gradient; smooth, so JPEG keeps it close."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    cx, cy = rng.uniform(0.25, 0.75) * width, rng.uniform(0.25, 0.75) * height
    blob = 150.0 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (0.2 * max(width, height)) ** 2))
    base = np.stack([40 + 80 * xx / max(1, width - 1), 60 + 60 * yy / max(1, height - 1), 90 + 0 * xx], axis=-1)
    return (base + blob[..., None]).clip(0, 255).astype(np.uint8)


def encode(array: np.ndarray, fmt: str, mode: str | None = None, **params: object) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(array)
    if mode is not None:
        img = img.convert(mode)
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(
    width: int,
    height: int,
    bit_depth: int,
    color_type: int,
    raw_rows: bytes | Iterable[bytes],
    extra_chunks: Iterable[tuple[bytes, bytes]] = (),
    level: int = 6,
) -> bytes:
    """A PNG written by hand (filter 0 on every row), for what Pillow will not write: 16-bit RGB, bombs, odd
    headers. `raw_rows` is either every row's bytes concatenated *with* filter bytes, or an iterable of rows
    without them.
    """
    data = raw_rows if isinstance(raw_rows, bytes) else b"".join(b"\x00" + row for row in raw_rows)
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    body = b"".join(_chunk(kind, payload) for kind, payload in extra_chunks)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + body
        + _chunk(b"IDAT", zlib.compress(data, level))
        + _chunk(b"IEND", b"")
    )


def bilevel_bomb(side: int) -> bytes:
    """A valid 1-bit PNG of side x side black pixels: a few KB on disk, side**2 bytes once Pillow decodes it."""
    row_bytes = 1 + (side + 7) // 8
    return png_bytes(side, side, 1, 0, bytes(row_bytes * side), level=1)


# EXIF orientation -> the stored pixels that a viewer shows upright as `u`, from the EXIF spec's meaning of the
# tag ("0th row is the visual ..., 0th column is the visual ..."), not from any decoder's implementation
STORED_FOR_ORIENTATION: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda u: u,
    2: lambda u: u[:, ::-1],
    3: lambda u: u[::-1, ::-1],
    4: lambda u: u[::-1, :],
    5: lambda u: u.swapaxes(0, 1),
    6: lambda u: u[:, ::-1].swapaxes(0, 1),
    7: lambda u: u[::-1, ::-1].swapaxes(0, 1),
    8: lambda u: u[::-1, :].swapaxes(0, 1),
}


def exif_jpeg(upright: np.ndarray, orientation: int, quality: int = 95) -> bytes:
    """A JPEG whose stored pixels are `upright` transformed so that a viewer applying `orientation` shows it."""
    stored = np.ascontiguousarray(STORED_FOR_ORIENTATION[orientation](upright))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, "JPEG", quality=quality, exif=exif.tobytes())


def composite_on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255.0
    return np.round(rgb.astype(np.float64) * a + 255.0 * (1 - a)).astype(np.uint8)


# --- the corpus ---------------------------------------------------------------------------------------------


def build_corpus(root: Path, special: bool = True) -> list[Case]:
    """Write every case under `root`; `special` adds the FIFO, device and symlink cases (POSIX only)."""
    root.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []

    def put(rel: str, data: bytes, what: str, expect: str, **kw: object) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        cases.append(Case(rel, what, expect, **kw))  # type: ignore[arg-type]

    rgb = smooth_rgb()
    jpeg, png = encode(rgb, "JPEG", quality=95), encode(rgb, "PNG")
    progressive = encode(rgb, "JPEG", quality=95, progressive=True)

    # broken and fake files
    put("empty.jpg", b"", "zero-byte file", "error", reason="empty file")
    put("truncated.jpg", jpeg[: len(jpeg) // 2], "JPEG cut in half", "error", reason="truncated")
    put(
        "truncated_progressive.jpg",
        progressive[: len(progressive) * 2 // 3],
        "progressive JPEG cut at 2/3",
        "error",
        reason="truncated",
    )
    put("truncated_eoi.jpg", jpeg[:-2], "JPEG missing only its end marker", "error", reason="truncated")
    put("truncated.png", png[: len(png) // 2], "PNG cut in half", "error", reason="truncated")
    put("truncated_iend.png", png[:-12], "PNG missing only its IEND chunk (all pixels present)", "error", reason="IEND")
    webp = encode(rgb, "WEBP", quality=90)
    put("truncated.webp", webp[: len(webp) // 2], "WebP cut in half", "error", reason="truncated")
    put("text.jpg", b"just some notes, not a picture\n" * 3, "text file named .jpg", "error", reason="not an image")
    put("text.png", b"col1,col2\n1,2\n", "text (CSV) named .png", "error", reason="not an image")
    html = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>nope</body></html>\n"
    put("page.jpg", html, "HTML error page named .jpg", "error", reason="not an image")
    put("page.png", html, "HTML named .png", "error", reason="not an image")
    corrupt = bytearray(jpeg)
    corrupt[len(corrupt) // 2 : len(corrupt) // 2 + 40] = bytes(range(40))
    put(
        "corrupt_middle.jpg",
        bytes(corrupt),
        "JPEG with 40 bytes overwritten mid-stream (not truncated)",
        "ok",
        size=(W, H),
    )
    put("zero_size.png", png_bytes(0, 0, 8, 0, b""), "PNG header claiming 0x0 pixels", "error", reason="not an image")

    # decompression bombs: refused from the header, nothing decoded
    put("bomb.png", bilevel_bomb(16384), "1-bit PNG bomb, 16384x16384 (268M px, 33 KB)", "error", reason="max-pixels")
    put(
        "bomb_just_above.png",
        bilevel_bomb(9500),
        "PNG 9500x9500 (90.25M px, just above the default)",
        "error",
        reason="max-pixels",
    )
    gif = bytearray(encode(np.zeros((2, 2, 3), np.uint8), "GIF"))
    gif[6:10] = struct.pack("<HH", 65535, 65535)
    put("bomb.gif", bytes(gif), "GIF whose screen is 65535x65535", "error", reason="max-pixels")
    ztxt = zlib.compress(b"A" * 20_000_000, 9)
    put(
        "ztxt_bomb.png",
        png_bytes(W, H, 8, 2, [r.tobytes() for r in rgb], [(b"zTXt", b"Comment\x00\x00" + ztxt)]),
        "PNG with a zTXt chunk inflating to 20 MB",
        "error",
        reason="too large",
    )

    # unusual but valid images: explained, as a viewer shows them
    put(
        "one_pixel.png",
        encode(np.array([[[200, 10, 30]]], np.uint8), "PNG"),
        "1x1 image",
        "ok",
        size=(1, 1),
        pixels=np.array([[[200, 10, 30]]], np.uint8),
    )
    strip = smooth_rgb(300, 1, seed=3)
    put("strip_300x1.png", encode(strip, "PNG"), "300x1 strip", "ok", size=(300, 1), pixels=strip)
    gray = rgb[..., 1]
    gray16 = (gray.astype(np.uint16) * 257).astype(">u2")
    put(
        "gray16.png",
        png_bytes(W, H, 16, 0, [r.tobytes() for r in gray16]),
        "16-bit grayscale PNG",
        "ok",
        size=(W, H),
        pixels=np.repeat(gray[..., None], 3, axis=2),
    )
    rgb48 = (rgb.astype(np.uint16) * 257).astype(">u2")
    put(
        "rgb48.png",
        png_bytes(W, H, 16, 2, [r.tobytes() for r in rgb48]),
        "16-bit RGB PNG",
        "ok",
        size=(W, H),
        pixels=rgb,
    )
    put(
        "gray16.tif",
        _tiff16(gray),
        "16-bit grayscale TIFF",
        "ok",
        size=(W, H),
        pixels=np.repeat(gray[..., None], 3, axis=2),
    )
    put(
        "cmyk.jpg",
        encode(rgb, "JPEG", mode="CMYK", quality=95),
        "CMYK JPEG",
        "ok",
        size=(W, H),
        pixels=rgb,
        tolerance=3.0,
    )
    palette_img = Image.fromarray(rgb).quantize(16)
    palette_img.info["transparency"] = 0
    buf = io.BytesIO()
    palette_img.save(buf, format="PNG", transparency=0)
    pal = np.asarray(palette_img.convert("RGB"))
    index = np.asarray(palette_img)
    expected_pal = np.where((index == 0)[..., None], np.uint8(255), pal)
    put(
        "palette_transparent.png",
        buf.getvalue(),
        "palette PNG, colour 0 transparent",
        "ok",
        size=(W, H),
        pixels=expected_pal,
    )
    alpha = np.tile(np.linspace(0, 255, W).astype(np.uint8), (H, 1))
    la = np.stack([gray, alpha], axis=-1)
    put(
        "la.png",
        encode(la, "PNG"),
        "LA (grey + alpha) PNG",
        "ok",
        size=(W, H),
        pixels=np.repeat(composite_on_white(gray[..., None], alpha), 3, axis=2),
        tolerance=0.5,
    )
    rgba = np.concatenate([rgb, alpha[..., None]], axis=-1)
    put(
        "rgba.png",
        encode(rgba, "PNG"),
        "RGBA PNG, alpha 0..255 left to right",
        "ok",
        size=(W, H),
        pixels=composite_on_white(rgb, alpha),
        tolerance=0.5,
    )
    bilevel = (gray > 120).astype(np.uint8) * 255
    put(
        "bilevel.png",
        encode(bilevel, "PNG", mode="1"),
        "1-bit PNG",
        "ok",
        size=(W, H),
        pixels=np.repeat(bilevel[..., None], 3, axis=2),
    )
    for orientation, name in ((3, "rotate_180"), (6, "rotate_90_cw"), (8, "rotate_90_ccw"), (5, "transpose")):
        put(
            f"exif_{orientation}_{name}.jpg",
            exif_jpeg(rgb, orientation),
            f"EXIF orientation {orientation} JPEG",
            "ok",
            size=(W, H),
            pixels=rgb,
            tolerance=3.0,
        )
    frame0, frame1 = _two_frames()
    put("animated.gif", _animated(frame0, frame1, "GIF"), "animated GIF (2 frames)", "ok", size=(W, H), pixels=frame0)
    put(
        "animated.webp",
        _animated(frame0, frame1, "WEBP", lossless=True),
        "animated WebP (2 frames)",
        "ok",
        size=(W, H),
        pixels=frame0,
    )
    put(
        "animated.png",
        _animated(frame0, frame1, "PNG"),
        "animated PNG (APNG, 2 frames)",
        "ok",
        size=(W, H),
        pixels=frame0,
    )
    animated = _animated(frame0, frame1, "GIF")
    put(
        "truncated_animation.gif",
        animated[: len(animated) * 3 // 4],
        "animated GIF cut in its last frame",
        "error",
        reason="truncated",
    )
    put("static.gif", encode(frame0, "GIF"), "static GIF", "ok", size=(W, H), pixels=frame0)
    put("png_named.jpg", png, "a PNG named .jpg", "ok", size=(W, H), pixels=rgb)
    put("folder.jpg/inside.png", png, "an image inside a folder named like an image", "ok", size=(W, H), pixels=rgb)

    # names
    for name, what in (
        ("with space.png", "space in the name"),
        ("ünïcödé 画像.png", "unicode name"),
        ('comma, "quote".png', "comma and quotes in the name"),
        ("new\nline.png", "newline in the name"),
        ("-leading-dash.png", "name starting with '-'"),
        (".hidden.png", "hidden (dot) file"),
        (os.fsdecode(b"latin1-\xe9.png"), "name that is not valid UTF-8 (byte 0xE9)"),
    ):
        put(name, png, what, "ok", size=(W, H), pixels=rgb)

    if special:
        _special_cases(root, cases, png)
    return cases


def _special_cases(root: Path, cases: list[Case], png: bytes) -> None:
    """Things that are not plain files: pipes, devices, symlink loops and dangling links."""
    loop = root / "loop"
    loop.mkdir()
    (loop / "inner.png").write_bytes(png)
    os.symlink("..", loop / "back")  # loop/back/loop/back/... : must be walked once
    cases.append(Case("loop/inner.png", "image next to a symlink to its parent folder (loop)", "ok", size=(W, H)))
    os.symlink("self_loop.jpg", root / "self_loop.jpg")
    cases.append(Case("self_loop.jpg", "symlink pointing to itself", "error", reason="symbolic links"))
    os.symlink("no-such-file.png", root / "dangling.png")
    cases.append(Case("dangling.png", "dangling symlink", "error", reason="no such file"))
    os.mkfifo(root / "fifo.jpg")
    cases.append(
        Case(
            "fifo.jpg", "named pipe (FIFO) named .jpg (would block a plain open)", "error", reason="not a regular file"
        )
    )
    os.symlink("/dev/zero", root / "devzero.png")
    cases.append(Case("devzero.png", "symlink to /dev/zero (endless)", "error", reason="not a regular file"))


def _tiff16(gray: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(gray.astype(np.uint16) * 257).save(buf, format="TIFF")
    return buf.getvalue()


def _two_frames() -> tuple[np.ndarray, np.ndarray]:
    """Two frames with few colours (exact in a GIF palette) that differ everywhere that matters."""
    a = np.zeros((H, W, 3), np.uint8)
    a[4:12, 6:20] = (255, 0, 0)
    b = np.full((H, W, 3), 255, np.uint8)
    b[10:20, 22:36] = (0, 0, 255)
    return a, b


def _animated(first: np.ndarray, second: np.ndarray, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    frames = [Image.fromarray(first), Image.fromarray(second)]
    frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **params)
    return buf.getvalue()


# --- the table ----------------------------------------------------------------------------------------------


def outcome_table(cases: list[Case], rows: list[dict[str, str]], out: Path) -> str:
    """Markdown: every case, what it should give and what the run into `out` gave."""
    from gradcam_cli.out.table import csv_text

    by_path: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_path.setdefault(row["path"], []).append(row)
    lines = ["| file | case | expected | measured outcome |", "|---|---|---|---|"]
    for case in cases:
        got = by_path.get(csv_text(case.rel), [])
        if not got:
            measured = "NO ROW"
        elif got[0]["status"] == "ok":
            # the real file name, not the CSV's (escaped when the name is not UTF-8)
            width, height = Image.open(out / "heatmaps" / f"{case.rel}.png").size
            measured = f"ok, heatmap {width}x{height}"
        else:
            measured = f"error: {got[0]['error']}"
        if len(got) > 1:
            measured += f" ({len(got)} rows!)"
        expected = "ok" if case.expect == "ok" else f"error ({case.reason or 'any reason'})"
        shown = case.rel.encode("utf-8", "backslashreplace").decode().replace("\n", "\\n").replace("|", "\\|")
        lines.append(f"| `{shown}` | {case.what} | {expected} | {measured.replace('|', '/')} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """Build the corpus (in DIR or a temp folder), explain it with the toy probe model, print the table."""
    import csv
    import tempfile

    from click.testing import CliRunner

    from gradcam_cli.cli import main as cli

    sys.path.insert(0, str(Path(__file__).parent))
    base = Path(argv[0]) if argv else Path(tempfile.mkdtemp(prefix="gradcam-corpus-"))
    corpus, out = base / "corpus", base / "out"
    cases = build_corpus(corpus)
    cfg = base / "probe.yaml"
    cfg.write_text("input_size: [24, 40]\nmean: [0, 0, 0]\nstd: [1, 1, 1]\n", encoding="utf-8")
    args = ["explain", str(corpus), "-o", str(out), "--model", "toy_models:probe", "-c", str(cfg), "-q"]
    result = CliRunner().invoke(cli, [*args, "--workers", "0"])
    with open(out / "predictions.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    print(outcome_table(cases, rows, out))
    print(f"\nexit code {result.exit_code}; {len(rows)} rows for {len(cases)} cases; outputs in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
