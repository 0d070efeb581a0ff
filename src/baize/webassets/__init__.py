"""Local copies of the JavaScript, CSS and fonts our HTML pages load, so they render with no network.

GX Data Docs pages and DVC's plots page load them from CDNs; offline, the Data Docs index table stays empty
(it is drawn by jQuery + bootstrap-table), every page is unstyled and the training curves are blank (Vega).
The files under `vendor/` are the npm releases of what those pages ask for, byte for byte (fetched and
checked against npm's sha512 by scripts/vendor_web_assets.py; licenses in vendor/LICENSES/).

- `localize_data_docs(site)`: after GX builds a Data Docs site, point every page at copies of the files in
  the site's `static/vendor/`.
- `plots_template()`: the HTML template for `dvc plots` (.dvc/plots/offline.html) with Vega inlined.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

VENDOR = Path(__file__).resolve().parent / "vendor"

# npm release -> its tarball's sha512 (npm's `dist.integrity`), checked when the files are fetched.
PACKAGES = {
    "vega@5.33.1": "sha512-1fArfVDUqVbb5z8n+/nVQb+VNBzx8svY6CrsyTK4Ujm4yrd9I1auoKxBAPXLCavY1LcrbHUskQbGUP8gXOzyQw==",
    "vega-lite@5.23.0": "sha512-l4J6+AWE3DIjvovEoHl2LdtCUkfm4zs8Xxx7INwZEAv+XVb6kR6vIN1gt3t2gN2gs/y4DYTs/RPoTeYAuEg6mA==",
    "vega-embed@6.29.0": "sha512-PmlshTLtLFLgWtF/b23T1OwX53AugJ9RZ3qPE2c01VFAbgt3/GSNI/etzA/GzdrkceXFma+FDHNXUppKuM0U6Q==",
    "jquery@3.7.1": "sha512-m4avr8yL8kmFN8psrbFFFmB/If14iN5o9nw/NgnnM+kybDJpRsAynV2BsfpTYrTRysYUdADVD7CkUUizgkpLfg==",
    "popper.js@1.12.9": "sha512-s0EEi9xiSCdqz9lV4IiVH5yIZnDX/U1t0tCjB+0jXx9jW8lrR7kOpVupiUg175ogqVoudpDXHF1p6dKATCHMeg==",
    "bootstrap@4.3.1": "sha512-rXqOmH1VilAt2DyPzluTi2blhk17bO7ef+zLLPlWvG494pDxcM234pJ8wTc/6R40UWizAIIMgxjvxZg5kmsbag==",
    "bootstrap-table@1.19.1": "sha512-WvV+l1AI/C+zThaKmfHmi/IuayVNB0qdFyEhFx1jyZhO0oLtNJNANkCR3rvJf6Dkh72dsLElxpE/bzK9seEQLA==",
    "bootstrap-datepicker@1.9.0": "sha512-9rYYbaVOheGYxjOr/+bJCmRPihfy+LkLSg4fIFMT9Od8WwWB/MB50w0JO1eBgKUMbb7PFHQD5uAfI3ArAxZRXA==",
    "@forevolve/bootstrap-dark@1.1.0": "sha512-A3ucpEpxPoTVO490lZZCfjPXxv832l7mm1IxX3bXyxvgwnPGXDLyh7dWrphXKO8YBAu3EswbBEu3VSW8NRMW3A==",
    "@fortawesome/fontawesome-free@6.6.0": "sha512-60G28ke/sXdtS9KZCpZSHHkCbdsOGEhIUGlwq6yhY74UpTiToIh8np7A8yphhM4BWsvNFtIvLpi4co+h9Mr9Ow==",
}


@dataclass(frozen=True)
class Asset:
    path: str  # under vendor/ (and under static/vendor/ of a Data Docs site)
    package: str  # a key of PACKAGES
    source: str  # its path inside the npm tarball
    urls: tuple[str, ...] = ()  # the CDN URLs GX 1.x pages load it from


ASSETS = (
    Asset("vega/vega.min.js", "vega@5.33.1", "build/vega.min.js", ("https://cdn.jsdelivr.net/npm/vega@5",)),
    Asset("vega/vega-lite.min.js", "vega-lite@5.23.0", "build/vega-lite.min.js",
          ("https://cdn.jsdelivr.net/npm/vega-lite@5",)),
    Asset("vega/vega-embed.min.js", "vega-embed@6.29.0", "build/vega-embed.min.js",
          ("https://cdn.jsdelivr.net/npm/vega-embed@6",)),
    Asset("jquery/jquery.min.js", "jquery@3.7.1", "dist/jquery.min.js",
          ("https://code.jquery.com/jquery-3.7.1.min.js",)),
    Asset("popper/popper.min.js", "popper.js@1.12.9", "dist/umd/popper.min.js",
          ("https://cdnjs.cloudflare.com/ajax/libs/popper.js/1.12.9/umd/popper.min.js",)),
    Asset("bootstrap/bootstrap.min.js", "bootstrap@4.3.1", "dist/js/bootstrap.min.js",
          ("https://stackpath.bootstrapcdn.com/bootstrap/4.3.1/js/bootstrap.min.js",)),
    Asset("bootstrap/bootstrap.min.css", "bootstrap@4.3.1", "dist/css/bootstrap.min.css",
          ("https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css",)),
    Asset("bootstrap-table/bootstrap-table.min.js", "bootstrap-table@1.19.1", "dist/bootstrap-table.min.js",
          ("https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.js",)),
    Asset("bootstrap-table/bootstrap-table.min.css", "bootstrap-table@1.19.1", "dist/bootstrap-table.min.css",
          ("https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.css",)),
    Asset("bootstrap-table/bootstrap-table-filter-control.min.js", "bootstrap-table@1.19.1",
          "dist/extensions/filter-control/bootstrap-table-filter-control.min.js",
          ("https://unpkg.com/bootstrap-table@1.19.1/dist/extensions/filter-control/bootstrap-table-filter-control.min.js",)),
    # GX asks for the 1.19.0 stylesheet (minified on one page, not on the others): 1.19.1's is the same rules.
    Asset("bootstrap-table/bootstrap-table-filter-control.min.css", "bootstrap-table@1.19.1",
          "dist/extensions/filter-control/bootstrap-table-filter-control.min.css",
          ("https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.min.css",
           "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.css")),
    Asset("bootstrap-datepicker/bootstrap-datepicker.min.js", "bootstrap-datepicker@1.9.0",
          "dist/js/bootstrap-datepicker.min.js",
          ("https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/js/bootstrap-datepicker.min.js",)),
    Asset("bootstrap-datepicker/bootstrap-datepicker.min.css", "bootstrap-datepicker@1.9.0",
          "dist/css/bootstrap-datepicker.min.css",
          ("https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/css/bootstrap-datepicker.min.css",)),
    # The minified build of the stylesheet GX links (883 kB unminified, 153 kB minified; same rules).
    Asset("bootstrap-dark/bootstrap-prefers-dark.min.css", "@forevolve/bootstrap-dark@1.1.0",
          "dist/css/bootstrap-prefers-dark.min.css",
          ("https://cdn.jsdelivr.net/npm/@forevolve/bootstrap-dark@1.1.0/dist/css/bootstrap-prefers-dark.css",)),
    Asset("fontawesome/css/all.min.css", "@fortawesome/fontawesome-free@6.6.0", "css/all.min.css",
          ("https://cdnjs.cloudflare.com/ajax/libs/font-awesome/6.6.0/css/all.min.css",)),
    # all.min.css loads these by ../webfonts/; browsers take the woff2 and never fetch the .ttf fallbacks.
    *(Asset(f"fontawesome/webfonts/{font}.woff2", "@fortawesome/fontawesome-free@6.6.0", f"webfonts/{font}.woff2")
      for font in ("fa-brands-400", "fa-regular-400", "fa-solid-900", "fa-v4compatibility")),
)

_BY_URL = {url: asset for asset in ASSETS for url in asset.urls}
# GX's navbar loads its logo from here (with a timestamp and the context id), not from the site's own copy.
GX_IMAGES = "https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/"
# <script>, <link> and <img> start tags, and the attributes in them that name a file.
_TAG = re.compile(r"<(?:script|link|img)\b[^>]*>", re.IGNORECASE)
_URL_ATTR = re.compile(r"""\b(src|href)\s*=\s*(["'])(.*?)\2""", re.IGNORECASE | re.DOTALL)
_SRI = re.compile(r"""\s+integrity\s*=\s*(["'])(.*?)\1""", re.IGNORECASE | re.DOTALL)
_CROSSORIGIN = re.compile(r"""\s+crossorigin(?:\s*=\s*(["']).*?\1)?""", re.IGNORECASE | re.DOTALL)
# Every GX page asks for Vega (830 kB), only pages with a chart (graph.j2) call it: the others lose these.
_VEGA_SCRIPTS = re.compile(
    "|".join(rf"""<script\s+src\s*=\s*["']{re.escape(url)}["']\s*>\s*</script>\s*"""
             for a in ASSETS if a.path.startswith("vega/") for url in a.urls),
    re.IGNORECASE,
)


def remote_refs(html: str) -> list[str]:
    """The http(s) URLs that a page's <script>, <link> and <img> tags still load (links to click don't count)."""
    return [
        m.group(3)
        for tag in _TAG.findall(html)
        for m in _URL_ATTR.finditer(tag)
        if re.match(r"(?:https?:)?//", m.group(3).strip(), re.IGNORECASE)
    ]


def _matches_sri(data: bytes, integrity: str) -> bool:
    for token in integrity.split():
        algo, _, digest = token.partition("-")
        if algo in ("sha256", "sha384", "sha512"):
            if base64.b64encode(hashlib.new(algo, data).digest()).decode() == digest:
                return True
    return False


def _localize_tag(tag: str, page: Path, site: Path, used: set[str]) -> str:
    for m in _URL_ATTR.finditer(tag):
        url = m.group(3).strip()
        # GX's own images: the logo (from S3), and the favicon of result pages (one "../" short in GX 1.x).
        if url.startswith(GX_IMAGES):
            name = url.removeprefix(GX_IMAGES).split("?")[0]
        else:
            name = url.partition("static/images/")[2]
        image = site / "static" / "images" / name
        if name and image.is_file() and not (page.parent / url).is_file():
            return tag[: m.start(3)] + Path(os.path.relpath(image, page.parent)).as_posix() + tag[m.end(3) :]
    match = next((m for m in _URL_ATTR.finditer(tag) if m.group(3).strip() in _BY_URL), None)
    if match is None:
        return tag
    asset = _BY_URL[match.group(3).strip()]
    sri = _SRI.search(tag)
    if sri and not _matches_sri((VENDOR / asset.path).read_bytes(), sri.group(2)):
        log.warning("Data Docs: %s is not the file its page pins (integrity); left on the CDN", asset.path)
        return tag
    used.add(asset.path.split("/")[0])
    local = Path(os.path.relpath(site / "static" / "vendor" / asset.path, page.parent)).as_posix()
    tag = tag[: match.start(3)] + local + tag[match.end(3) :]
    # A file:// page can't make the CORS request that `crossorigin`/`integrity` ask for (Chromium refuses the
    # script): the bytes were checked against the page's hash just above.
    return _CROSSORIGIN.sub("", _SRI.sub("", tag))


def localize_data_docs(site: str | os.PathLike) -> list[Path]:
    """Make a built GX Data Docs site load its scripts, styles and fonts from `static/vendor/` (and its logo
    from `static/images/`).

    Returns the pages that still load something remote (a GX release asking for files not in ASSETS:
    they are logged, the page keeps the CDN link).
    """
    site = Path(site)
    used: set[str] = set()  # top folders under vendor/ that some page loads from (a stylesheet brings its fonts)
    remote = []
    for page in sorted(site.rglob("*.html")):
        html = page.read_text("utf-8")
        new = html if "vegaEmbed(" in html else _VEGA_SCRIPTS.sub("", html)
        new = _TAG.sub(lambda m, p=page: _localize_tag(m.group(0), p, site, used), new)
        if new != html:
            page.write_text(new, "utf-8")
        if left := remote_refs(new):
            remote.append(page)
            log.warning("Data Docs page %s still loads from the network: %s", page.relative_to(site), ", ".join(left))
    for asset in ASSETS:
        if asset.path.split("/")[0] in used:
            (site / "static" / "vendor" / asset.path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(VENDOR / asset.path, site / "static" / "vendor" / asset.path)
    if used:
        shutil.copytree(VENDOR / "LICENSES", site / "static" / "vendor" / "LICENSES", dirs_exist_ok=True)
    return remote


# --------------------------------------------------------------------------- dvc plots

PLOTS_TEMPLATE = Path(".dvc") / "plots" / "offline.html"
_VEGA = ("vega/vega.min.js", "vega/vega-lite.min.js", "vega/vega-embed.min.js")

# dvc-render's default page, less its scripts placeholder (which it fills with CDN <script> tags) and
# with Vega, Vega-Lite and vega-embed inlined, so the page works wherever `dvc plots -o` writes it.
_PAGE = """<!DOCTYPE html>
<!-- The page of `dvc plots show` / `dvc plots diff` (dvc config plots.html_template), rendering offline.
     Generated by scripts/vendor_web_assets.py from src/baize/webassets/vendor/vega/: do not edit.
     Vega, Vega-Lite, vega-embed: BSD-3-Clause, Copyright (c) 2015, University of Washington Interactive
     Data Lab; with bundled parts under ISC, MIT and Unlicense: src/baize/webassets/vendor/LICENSES/. -->
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
%(scripts)s
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def plots_template() -> str:
    """The text of .dvc/plots/offline.html, from the vendored Vega files."""
    scripts = []
    for path in _VEGA:
        asset = next(a for a in ASSETS if a.path == path)
        code = (VENDOR / path).read_text("utf-8")
        # dvc-render replaces these placeholders anywhere in the template, and "</script" would end the tag.
        if "</script" in code.lower() or any("{%s}" % p in code for p in ("scripts", "plot_divs", "refresh_tag")):
            raise ValueError(f"{path} can't be inlined in a <script> of a DVC template")
        scripts.append(f"<script>/*! {asset.package} (BSD-3-Clause) */\n{code}\n</script>")
    return _PAGE % {"scripts": "\n".join(scripts)}
