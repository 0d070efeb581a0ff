"""Fetch the web assets of src/baize/webassets (ASSETS, PACKAGES) from the npm registry and write the DVC template.

Only needed to change a version: edit PACKAGES / ASSETS, then `python scripts/vendor_web_assets.py` (network to
registry.npmjs.org) and commit src/baize/webassets/vendor/ and .dvc/plots/offline.html. Each tarball is checked
against its pinned sha512 before anything is extracted; the files are copied unchanged, with each package's
license file into vendor/LICENSES/.
"""

from __future__ import annotations

import base64
import hashlib
import io
import shutil
import sys
import tarfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from baize.webassets import ASSETS, PACKAGES, PLOTS_TEMPLATE, VENDOR, plots_template  # noqa: E402

REGISTRY = "https://registry.npmjs.org"
LICENSE_NAMES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "license")


def _tarball(spec: str) -> tarfile.TarFile:
    name, _, version = spec.rpartition("@")
    url = f"{REGISTRY}/{name}/-/{name.split('/')[-1]}-{version}.tgz"
    with urllib.request.urlopen(url, timeout=60) as resp:
        data = resp.read()
    algo, _, digest = PACKAGES[spec].partition("-")
    if base64.b64encode(hashlib.new(algo, data).digest()).decode() != digest:
        raise SystemExit(f"{url}: checksum differs from PACKAGES[{spec!r}]")
    return tarfile.open(fileobj=io.BytesIO(data), mode="r:gz")


def main() -> None:
    notes = VENDOR / "LICENSES" / "README.md"  # written by hand: kept
    kept = notes.read_bytes() if notes.is_file() else None
    shutil.rmtree(VENDOR, ignore_errors=True)
    (VENDOR / "LICENSES").mkdir(parents=True)
    if kept is not None:
        notes.write_bytes(kept)
    for spec in PACKAGES:
        with _tarball(spec) as tar:
            members = {m.name.removeprefix("package/"): m for m in tar.getmembers() if m.isfile()}
            for asset in (a for a in ASSETS if a.package == spec):
                out = VENDOR / asset.path
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(tar.extractfile(members[asset.source]).read())
            license_file = next((members[n] for n in LICENSE_NAMES if n in members), None)
            if license_file is not None:
                text = tar.extractfile(license_file).read()
                name = spec.rpartition("@")[0].lstrip("@").replace("/", "__")
                (VENDOR / "LICENSES" / f"{name}.txt").write_bytes(text)
            else:
                print(f"{spec}: no license file in the tarball; see vendor/LICENSES/README.md")
    (ROOT / PLOTS_TEMPLATE).parent.mkdir(parents=True, exist_ok=True)
    (ROOT / PLOTS_TEMPLATE).write_text(plots_template(), "utf-8")
    print(f"wrote {VENDOR.relative_to(ROOT)} and {PLOTS_TEMPLATE}")


if __name__ == "__main__":
    main()
