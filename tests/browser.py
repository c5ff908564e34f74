"""A page loaded in a real headless Chromium, from disk with the network shut: the errors it
raised and whether every image decoded. A test that asks for it skips where no Chromium is
installed (.ci/run installs Debian's)."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = next((p for name in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(name))), None)
# first in <head>: records every error (script, console.error, a resource that failed) and, at
# `load` (fired once every image has loaded or failed), each image's natural size, into the DOM
PROBE = """<script>
window.__errors = [];
window.addEventListener("error", e => __errors.push(String(e.message || (e.target && e.target.src) || "error")), true);
const __consoleError = console.error;
console.error = (...a) => { __errors.push(a.join(" ")); __consoleError(...a); };
window.addEventListener("load", () => {
  const sizes = [...document.images].map(i => [i.naturalWidth, i.naturalHeight]);
  document.documentElement.setAttribute("data-probe", JSON.stringify({errors: __errors, sizes: sizes}));
});
</script>"""
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--host-resolver-rules=MAP * ~NOTFOUND",  # a page that reaches for the network fails to load it
]


def require_chromium() -> str:
    if CHROMIUM is None:
        pytest.skip("no Chromium here (.ci/run installs it)")
    return CHROMIUM


def load_page(page: Path, tmp: Path) -> dict:
    """{"errors": [...], "sizes": [[w, h] per <img>]} of a copy of `page` with the probe in it."""
    chromium = require_chromium()
    probed = tmp / f"probed-{page.name}"
    probed.write_text(page.read_text().replace("<head>", "<head>" + PROBE, 1))
    done = subprocess.run(
        [chromium, *FLAGS, f"--user-data-dir={tmp / 'chromium-profile'}", "--dump-dom", probed.as_uri()],
        capture_output=True,
        text=True,
        timeout=180,
    )
    found = re.search(r'data-probe="([^"]*)"', done.stdout)
    assert found, f"Chromium gave no probe result (exit {done.returncode}): {done.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


def assert_renders(page: Path, tmp: Path, least_images: int) -> None:
    """No error, every <img> of the page (at least `least_images`) with a natural size."""
    result = load_page(page, tmp)
    assert result["errors"] == []
    assert len(result["sizes"]) == page.read_text().count("<img ") >= least_images
    assert all(w > 0 and h > 0 for w, h in result["sizes"]), result["sizes"]
    assert not re.search(r'(src|href)="(https?:)?//', page.read_text()), "the page reaches for the network"
