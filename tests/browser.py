"""Headless Chromium for the page tests: a page's DOM after its scripts ran, and screenshots, with no network.

Every host name fails to resolve (--host-resolver-rules), so a page that still needs a CDN renders as it
would offline even on a machine with network.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest


def browser() -> str | None:
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


needs_browser = pytest.mark.skipif(
    browser() is None, reason="no Chromium (apt-get install -y --no-install-recommends chromium)"
)


def _chromium(page: Path | str, *args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [
                browser(),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                # Without these, the fresh profile's background connections are refused and startup stalls.
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--host-resolver-rules=MAP * ~NOTFOUND",
                f"--user-data-dir={profile}",
                *args,
                page if isinstance(page, str) and page.startswith(("http://", "https://")) else Path(page).resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=90,
        )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def dom(page: Path) -> str:
    """The page's DOM after load (scripts have run)."""
    return _chromium(page, "--dump-dom").stdout


def screenshot(page: Path | str, out: Path, size: tuple[int, int] = (1280, 900), budget_ms: int = 5000):
    """A PNG of the page (a file, or an http:// URL of a server on 127.0.0.1) as rendered (kept at `out` for a
    person to look at), opened with Pillow as RGB."""
    from PIL import Image

    out.parent.mkdir(parents=True, exist_ok=True)
    # A short budget of virtual time lets Vega's canvas draw before the shot.
    _chromium(page, f"--screenshot={out}", f"--window-size={size[0]},{size[1]}", f"--virtual-time-budget={budget_ms}")
    return Image.open(out).convert("RGB")


def count_color(image, rgb: tuple[int, int, int], tolerance: int = 40, box: tuple[int, int, int, int] | None = None,
                ) -> int:
    """Pixels within `tolerance` (per channel) of `rgb`, in `box` (left, top, right, bottom) or the whole image."""
    import numpy as np

    pixels = np.asarray(image.crop(box) if box else image, dtype=np.int16)
    return int((np.abs(pixels - np.array(rgb, dtype=np.int16)) <= tolerance).all(axis=-1).sum())
