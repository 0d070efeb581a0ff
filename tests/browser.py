"""Headless Chromium for the page tests: a page's DOM after its scripts ran, and screenshots, with no network.

Every host name fails to resolve (--host-resolver-rules), so a page that still needs a CDN renders as it
would offline even on a machine with network.
"""

from __future__ import annotations

import contextlib
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
                # ... but 127.0.0.1, where a test runs its servers (the MLflow UI).
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
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


@contextlib.contextmanager
def auth_proxy(target: str, username: str, password: str):
    """A forwarding proxy on 127.0.0.1 that adds HTTP basic auth to every request to `target` (headless Chromium
    cannot answer a server's login prompt, and drops credentials written into the URL); yields its base URL."""
    import base64
    import http.server
    import threading
    import urllib.error
    import urllib.request

    token = base64.b64encode(f"{username}:{password}".encode()).decode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def _forward(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "authorization", "connection")}
            headers["Authorization"] = f"Basic {token}"
            request = urllib.request.Request(target + self.path, data=body, headers=headers, method=self.command)
            try:
                resp = urllib.request.urlopen(request, timeout=60)
            except urllib.error.HTTPError as err:
                resp = err
            data = resp.read()
            self.send_response(resp.status if hasattr(resp, "status") else resp.code)
            for key, value in resp.headers.items():
                if key.lower() not in ("transfer-encoding", "connection", "content-length", "www-authenticate"):
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _forward

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
