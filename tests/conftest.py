"""Shared fixtures: small generated images (64x48) in a nested folder, plus corrupt files.

Every image is 64 wide and 48 high so that output sizes, crop regions and peaks can be checked exactly.
Contents are seeded noise: with random (`--weights none`) models any content gives a usable map.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

WIDTH, HEIGHT = 64, 48

if os.environ.get("PYTEST_XDIST_WORKER"):
    # two test processes share the 2 cores: one intra-op thread each (and in the processes they start), or
    # OpenMP's spinning threads compete for the cores and small runs slow down many times over
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# relative path (from the INPUT root) -> PIL mode written; note the mixed-case extensions
IMAGE_FILES: dict[str, str] = {
    "C.JPG": "RGB",
    "b.png": "RGB",
    "sub/a.jpg": "RGB",
    "sub/a.png": "RGB",
    "sub/deeper/g.bmp": "L",
    "sub/deeper/r.WEBP": "RGBA",
    "sub/deeper/t.TiFF": "RGB",
}
# files that discovery must ignore
NON_IMAGE_FILES: tuple[str, ...] = ("notes.txt", "sub/readme.md", "sub/deeper/data.npy")


def write_image(path: Path, mode: str = "RGB", size: tuple[int, int] = (WIDTH, HEIGHT), seed: int = 0) -> Path:
    """A smooth-ish random image (noise plus a bright blob) of `size` (width, height) in `mode`."""
    rng = np.random.default_rng(seed)
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width]
    cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
    blob = 200.0 * np.exp(-(((xx - cx) ** 2) + ((yy - cy) ** 2)) / (2 * (0.15 * width) ** 2))
    channels = 4 if mode == "RGBA" else 3
    arr = rng.integers(0, 60, (height, width, channels)).astype(np.float64) + blob[..., None]
    arr = arr.clip(0, 255).astype(np.uint8)
    if mode == "RGBA":
        arr[..., 3] = 255
        img = Image.fromarray(arr, mode="RGBA")
    elif mode == "L":
        img = Image.fromarray(arr[..., 0], mode="L")
    else:
        img = Image.fromarray(arr, mode="RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {
        ".jpg": "JPEG",
        ".jpeg": "JPEG",
        ".png": "PNG",
        ".bmp": "BMP",
        ".webp": "WEBP",
        ".tif": "TIFF",
        ".tiff": "TIFF",
    }[path.suffix.lower()]
    img.save(path, format=fmt)
    return path


def write_corrupt(path: Path) -> Path:
    """Bytes that no image decoder accepts, under an image extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not an image at all\x00\x01\x02" * 4)
    return path


def write_truncated_jpeg(path: Path) -> Path:
    """A JPEG cut in half: the header parses, the pixel data does not."""
    buf = io.BytesIO()
    rng = np.random.default_rng(7)
    Image.fromarray(rng.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(buf, format="JPEG")
    data = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """imgs/ with 7 images (nested sub/ and sub/deeper/, an a.jpg/a.png pair) and 3 non-image files.

    Session-scoped and read-only by convention: tests write their outputs elsewhere.
    """
    root = tmp_path_factory.mktemp("inputs") / "imgs"
    for seed, (rel, mode) in enumerate(IMAGE_FILES.items()):
        write_image(root / rel, mode, seed=seed)
    for rel in NON_IMAGE_FILES:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"not an image")
    return root


@pytest.fixture(scope="session")
def image_rels() -> list[str]:
    """The relative paths `image_dir` must yield, in the sorted order the tool must use."""
    return sorted(IMAGE_FILES)


@pytest.fixture
def corrupt_file(tmp_path: Path) -> Path:
    """A single undecodable file with a .jpg extension."""
    return write_corrupt(tmp_path / "corrupt_input" / "broken.jpg")


@pytest.fixture
def mixed_dir(tmp_path: Path) -> Path:
    """Three good images, one garbage file and one truncated JPEG (in a subfolder)."""
    root = tmp_path / "mixed"
    write_image(root / "good1.png", seed=11)
    write_image(root / "good2.jpg", seed=12)
    write_image(root / "sub" / "good3.png", seed=13)
    write_corrupt(root / "broken.jpg")
    write_truncated_jpeg(root / "sub" / "trunc.jpg")
    return root


@pytest.fixture(scope="session")
def gradcam_exe() -> Path:
    """The installed `gradcam` console script of the interpreter running the tests."""
    candidate = Path(sys.executable).with_name("gradcam")
    found = candidate if candidate.exists() else (shutil.which("gradcam") and Path(shutil.which("gradcam") or ""))
    assert found and Path(found).exists(), "the `gradcam` console script is not installed (pip install -e .)"
    return Path(found)


@pytest.fixture
def run_process() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run a command with a clean-ish environment (no GRADCAM_DEBUG), capturing text output."""

    def run(
        cmd: Sequence[str | os.PathLike[str]],
        env_extra: dict[str, str] | None = None,
        cwd: Path | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k not in ("GRADCAM_DEBUG", "PYTHONPROFILEIMPORTTIME")}
        env.update(env_extra or {})
        return subprocess.run(
            [str(c) for c in cmd], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout, check=False
        )

    return run


@pytest.fixture(scope="session")
def image_size() -> tuple[int, int]:
    """(width, height) of every generated image."""
    return (WIDTH, HEIGHT)


@pytest.fixture(scope="session")
def make_image() -> Callable[..., Path]:
    """`make_image(path, mode="RGB", size=(64, 48), seed=0)` writes a generated image in the format of its suffix."""
    return write_image


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op torch thread for a module of single-image model runs.

    Small single images gain nothing from a second thread, and on a busy 2-core machine two threads spin
    against other processes: tracing models at 64 px measured about 10x slower with 2 threads than with 1.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def photos(tmp_path: Path, make_image: Callable[..., Path]) -> Path:
    """Two small generated photos, one PNG and one JPEG, in tmp_path/photos."""
    make_image(tmp_path / "photos" / "a.png", size=(80, 60), seed=1)
    make_image(tmp_path / "photos" / "b.jpg", size=(50, 70), seed=2)
    return tmp_path / "photos"


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No network, and an empty Hugging Face cache of this test's own (the model-source tests use it)."""
    from helpers import no_network

    no_network(monkeypatch)
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache
