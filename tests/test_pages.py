"""Pages that render offline: `dvc plots show` with the project's template draws the training curves with no
network; the template is the vendored Vega; the vendored files are the ones GX's pages pin.

The Data Docs screenshots are in test_validation.py (they need a validated site), the `dvc plots diff` of a
fresh pipeline run in test_pipeline_e2e.py.
"""

from __future__ import annotations

import base64
import hashlib
import re
import subprocess
import sys
from pathlib import Path

from browser import count_color, needs_browser, screenshot

from baize.webassets import ASSETS, PLOTS_TEMPLATE, VENDOR, plots_template, remote_refs

ROOT = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).parent / "dvc")
# The colour dvc-render gives the first revision's lines (its OPTIONAL_ANCHOR_RANGES).
FIRST_REV = (0x94, 0x5D, 0xD6)


def _plots_show(out: Path, *args: str) -> str:
    proc = subprocess.run([DVC, "plots", "show", "-o", str(out), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return (out / "index.html").read_text("utf-8")


def test_dvc_uses_the_committed_offline_template():
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        assert (ROOT / ".dvc" / repo.config["plots"]["html_template"]).resolve() == (ROOT / PLOTS_TEMPLATE).resolve()
    text = (ROOT / PLOTS_TEMPLATE).read_text("utf-8")
    assert text == plots_template(), "re-run scripts/vendor_web_assets.py after changing the vendored Vega"
    # dvc-render would put its CDN <script> tags where a {scripts} placeholder is.
    assert "{scripts}" not in text and text.count("{plot_divs}") == 1 and not remote_refs(text)


def test_vendored_files_are_what_gx_pages_pin():
    """Where GX's templates pin a CDN file by hash (integrity=), ours is that very file."""
    from importlib.util import find_spec

    templates = Path(find_spec("great_expectations").origin).parent / "render" / "view" / "templates"
    pinned = re.findall(r"""src="([^"]+)"\s+integrity="sha384-([^"]+)\"""", "".join(
        p.read_text("utf-8") for p in templates.glob("*.j2")))
    assert pinned
    by_url = {url: a for a in ASSETS for url in a.urls}
    for url, digest in pinned:
        data = (VENDOR / by_url[url].path).read_bytes()
        assert base64.b64encode(hashlib.sha384(data).digest()).decode() == digest, url


@needs_browser
def test_dvc_plots_show_draws_the_training_curves_offline(tmp_path):
    html = _plots_show(tmp_path / "plots")
    assert not remote_refs(html)
    shot = screenshot(tmp_path / "plots" / "index.html", tmp_path / "plots.png", size=(1000, 700))
    drawn = count_color(shot, FIRST_REV)
    # Control: dvc-render's own page (Vega from a CDN) stays blank offline, so the count above means marks.
    from dvc_render.html import PAGE_HTML

    (tmp_path / "cdn.html").write_text(PAGE_HTML, "utf-8")
    _plots_show(tmp_path / "cdn", "--html-template", str(tmp_path / "cdn.html"))
    blank = count_color(screenshot(tmp_path / "cdn" / "index.html", tmp_path / "cdn.png", size=(1000, 700)), FIRST_REV)
    assert blank == 0
    # The loss line of reports/train/steps.csv (10 steps) across the plot: ~1500 pixels; legend dots alone ~150.
    assert drawn > 400, f"{drawn} pixels of the curves' colour: no marks drawn ({tmp_path / 'plots.png'})"


def test_localize_data_docs_rewrites_known_cdn_files_and_reports_the_rest(tmp_path):
    """A site of two pages in GX's layout: Vega stays only where a chart is drawn, pinned scripts lose the
    CORS attributes a file:// page can't satisfy, and a file we don't ship is reported, not dropped."""
    from baize.webassets import localize_data_docs

    head = "".join(f'<script src="{url}"></script>' for url in (
        "https://cdn.jsdelivr.net/npm/vega@5", "https://cdn.jsdelivr.net/npm/vega-lite@5",
        "https://cdn.jsdelivr.net/npm/vega-embed@6", "https://code.jquery.com/jquery-3.7.1.min.js"))
    head += ('<script src="https://cdnjs.cloudflare.com/ajax/libs/popper.js/1.12.9/umd/popper.min.js" '
             'integrity="sha384-ApNbgh9B+Y1QKtv3Rn7W3mgPxhU9K/ScQsAP7hUibX39j7fakFPskvXusvfa0b4Q" crossorigin="anonymous">'
             '</script>')
    chart = tmp_path / "validations" / "suite" / "run" / "chart.html"
    chart.parent.mkdir(parents=True)
    chart.write_text(f"<html><head>{head}</head><body><script>vegaEmbed('#g', {{}});</script></body></html>")
    plain = tmp_path / "index.html"
    plain.write_text(f'<html><head>{head}<link rel="stylesheet" href="https://example.org/new.css"></head></html>')

    assert localize_data_docs(tmp_path) == [plain]
    chart_html, plain_html = chart.read_text(), plain.read_text()
    assert '<script src="../../../static/vendor/vega/vega-embed.min.js"></script>' in chart_html
    assert '<script src="static/vendor/jquery/jquery.min.js"></script>' in plain_html
    assert "vega" not in plain_html and plain_html.count("</script>") == 2
    assert remote_refs(plain_html) == ["https://example.org/new.css"]
    assert '<script src="static/vendor/popper/popper.min.js"></script>' in plain_html  # no integrity/crossorigin
    assert not remote_refs(chart_html)
    for ref in re.findall(r'src="([^"]+)"', chart_html):
        assert (chart.parent / ref).is_file(), ref
