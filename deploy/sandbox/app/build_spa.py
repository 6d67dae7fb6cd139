#!/usr/bin/env python3
"""Build a frontend's static SPA the way `vite build` lays it out, offline and with the standard
library only (it runs inside `docker build --network=none`).

    python3 build_spa.py --src frontend-web --out /usr/share/nginx/html --service frontend-web

Input (``--src``): index.html, src/main.js, src/style.css, build_id. Output (``--out``, replaced):

    index.html                    references the two assets below; carries the build id
    assets/app.<hash8>.js         content-hashed: a new build gets new names, so nginx can
    assets/app.<hash8>.css        cache them for a year (the production nginx.conf does)
    build.json                    {"service", "build", "assets"} for tests and operators

The build id goes into the JS bundle, so every build id has its own asset names (as a changed
source would): a page loaded from one release asks for assets only that release has.
Same input, same output (byte for byte).
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import shutil
import sys
from pathlib import Path


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:8]


def build(src: Path, out: Path, service: str, build_id: str | None = None) -> dict:
    src, out = Path(src), Path(out)
    if build_id is None:
        build_id = (src / "build_id").read_text(encoding="utf-8").strip()
    js = (src / "src" / "main.js").read_text(encoding="utf-8")
    css = (src / "src" / "style.css").read_text(encoding="utf-8")
    page = (src / "index.html").read_text(encoding="utf-8")
    # Build-time constants, like Vite's `define` (JSON literals: safe to inline in JS).
    js = js.replace("__BUILD_ID__", json.dumps(build_id)).replace("__SERVICE__", json.dumps(service))
    js_bytes, css_bytes = js.encode(), css.encode()
    assets = {"js": f"assets/app.{content_hash(js_bytes)}.js", "css": f"assets/app.{content_hash(css_bytes)}.css"}
    for marker in ("%BUILD_ID%", "%SERVICE%", "%APP_JS%", "%APP_CSS%"):
        if marker not in page:
            raise SystemExit(f"build_spa: {src / 'index.html'} has no {marker}")
    page = (page.replace("%BUILD_ID%", html.escape(build_id)).replace("%SERVICE%", html.escape(service))
            .replace("%APP_JS%", "/" + assets["js"]).replace("%APP_CSS%", "/" + assets["css"]))
    if out.exists():
        shutil.rmtree(out)
    (out / "assets").mkdir(parents=True)
    (out / assets["js"]).write_bytes(js_bytes)
    (out / assets["css"]).write_bytes(css_bytes)
    (out / "index.html").write_text(page, encoding="utf-8")
    info = {"service": service, "build": build_id, "assets": ["/" + assets["js"], "/" + assets["css"]]}
    (out / "build.json").write_text(json.dumps(info, sort_keys=True) + "\n", encoding="utf-8")
    return info


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", required=True, help="the frontend's directory (index.html, src/, build_id)")
    parser.add_argument("--out", required=True, help="output directory (replaced)")
    parser.add_argument("--service", required=True)
    parser.add_argument("--build-id", help="default: the build_id file of --src")
    args = parser.parse_args(argv)
    info = build(Path(args.src), Path(args.out), args.service, args.build_id)
    print(f"build_spa: {info['service']} build {info['build']}: {', '.join(info['assets'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
