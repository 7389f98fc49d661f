"""Open an HTML file in headless Chromium and read back how its images decoded."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome", "headless_shell")
# Appended to a copy of the page: after load, write every image's decoded size into the DOM.
PROBE = """
<script>
window.addEventListener("load", () => {
  const sizes = [...document.images].map((img) => [img.className, img.naturalWidth, img.naturalHeight]);
  const out = document.createElement("pre");
  out.id = "image-probe";
  out.textContent = JSON.stringify(sizes);
  document.body.appendChild(out);
});
</script>
"""


def find_chromium() -> str | None:
    """Path of a Chromium-family browser, or None."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def decoded_image_sizes(html: Path, browser: str, scratch: Path) -> list[tuple[str, int, int]]:
    """(class, naturalWidth, naturalHeight) of every <img> after Chromium loaded the page; 0x0 = broken."""
    probe_page = scratch / "probe.html"
    probe_page.write_text(html.read_text().replace("</body>", PROBE + "</body>"))
    command = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--virtual-time-budget=10000",
        "--dump-dom",
        probe_page.as_uri(),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    found = re.search(r'<pre id="image-probe">(.*?)</pre>', result.stdout, re.S)
    assert found, f"the probe did not run; chromium printed: {result.stderr[-2000:]}"
    return [tuple(entry) for entry in json.loads(found.group(1))]
