"""The dashboard's charting library (uPlot), pinned: `make deps` fetches its
npm tarball with `npm pack`, then `python -m deploy.static_assets TARBALL`
checks it against the pinned sha512 integrity and unpacks the two files the
page needs into var/static/uplot-<version>/, which the admin API serves
(router/dashboard.py). Nothing is committed and nothing comes from a CDN.

Standard library only: it runs before the project's venv may exist.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import sys
import tarfile
from pathlib import Path

UPLOT_VERSION = "1.6.32"
# The registry's `dist.integrity` of uplot@1.6.32 (`npm view uplot@1.6.32 dist.integrity`).
UPLOT_INTEGRITY = ("sha512-KIMVnG68zvu5XXUbC4LQEPnhwOxBuLyW1AHtpm6IKTXImkbLgkMy+jab"
                   "jLgSLMasNuGGzQm/ep3tOkyTxpiQIw==")
# In the tarball -> served as
UPLOT_FILES = {"package/dist/uPlot.iife.min.js": "uPlot.iife.min.js",
               "package/dist/uPlot.min.css": "uPlot.min.css",
               "package/LICENSE": "LICENSE"}
PROJECT_DIR = Path(__file__).resolve().parent.parent
VENDOR_DIR = PROJECT_DIR / "var" / "static" / f"uplot-{UPLOT_VERSION}"


def integrity_of(data: bytes) -> str:
    """Subresource-integrity form, as npm records it."""
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def unpack(tarball: Path, dest: Path, integrity: str = UPLOT_INTEGRITY) -> None:
    """Raises ValueError, writing nothing, unless the tarball is the pinned one."""
    data = tarball.read_bytes()
    if integrity_of(data) != integrity:
        raise ValueError(f"{tarball} does not match the pinned integrity {integrity}")
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball, "r:gz") as archive:
        for member, name in UPLOT_FILES.items():
            source = archive.extractfile(member)
            if source is None:
                raise ValueError(f"{tarball} has no file {member}")
            (dest / name).write_bytes(source.read())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.static_assets")
    parser.add_argument("tarball", type=Path, help=f"uplot-{UPLOT_VERSION}.tgz from npm pack")
    parser.add_argument("--dest", type=Path, default=VENDOR_DIR)
    args = parser.parse_args(argv)
    try:
        unpack(args.tarball, args.dest)
    except (OSError, ValueError, tarfile.TarError) as exc:
        print(f"static_assets: {exc}", file=sys.stderr)
        return 1
    print(f"uPlot {UPLOT_VERSION} in {args.dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
