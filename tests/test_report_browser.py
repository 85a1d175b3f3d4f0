"""A study report in a real browser (headless Chromium) at a phone's width: it loads without console errors,
every image decodes, the page is not blank, and nothing but a scroll box is wider than the 390 px viewport.

Chromium is the Debian package ``chromium`` (``.ci/run`` installs it). Where it is missing the test skips,
except when ``MERGELAB_REQUIRE_BROWSER`` is set (CI sets it): then a missing browser is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from mergelab.studies import run_study

WIDTH = 390  # CSS pixels: a current phone in portrait

# Runs before the page's own script: records errors; after load (every image loaded or failed) checks that
# each image decoded, measures what sticks out of the viewport outside a scroll box, and posts the findings to
# the wrapper page, which writes them into its DOM for --dump-dom.
_PROBE = """<script>
window.__errors = [];
window.addEventListener('error', function (e) { __errors.push('error: ' + (e.message || e.type)); }, true);
(function () { var orig = console.error; console.error = function () {
  __errors.push('console.error: ' + Array.prototype.join.call(arguments, ' ')); orig.apply(console, arguments); }; })();
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images), vw = document.documentElement.clientWidth, over = [];
  document.body.querySelectorAll('*').forEach(function (el) {
    if (el.parentElement && el.parentElement.closest('.scroll')) return;
    var r = el.getBoundingClientRect();
    if (r.width > 0 && (r.right > vw + 1 || r.left < -1)) over.push(el.tagName + '.' + el.className);
  });
  parent.postMessage(JSON.stringify({errors: __errors,
    undecodable: imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).map(function (i) {
      return i.alt; }),
    images: imgs.map(function (i) { return [i.alt, i.naturalWidth, i.naturalHeight]; }),
    overflow: over, viewport: vw, scrollWidth: document.documentElement.scrollWidth}), '*');
});
</script>"""

# headless Chromium's window is at least 500 px wide: the page goes into a 390 px frame to get a phone's viewport
_WRAPPER = """<!doctype html><html><body style="margin:0"><pre id="__probe"></pre>
<script>window.addEventListener('message', function (e) {{ document.getElementById('__probe').textContent = e.data; }});
</script><iframe src="{src}" style="width:{width}px;height:2400px;border:0"></iframe></body></html>"""


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        if os.environ.get("MERGELAB_REQUIRE_BROWSER"):
            pytest.fail("MERGELAB_REQUIRE_BROWSER is set but no chromium is on PATH (apt-get install -y chromium)")
        pytest.skip("chromium is not installed here (Debian: apt-get install -y chromium; .ci/run installs it)")
    return exe


def _run(exe: str, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--mute-audio",
           "--no-first-run", f"--window-size={WIDTH},2400", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)


@pytest.fixture(scope="module")
def study_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real study report (weights vs features on a tiny digits zoo): tables wider than a phone, figures."""
    root = tmp_path_factory.mktemp("browser")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MERGELAB_CACHE", str(tmp_path_factory.getbasetemp() / "studies-cache"))
        return run_study("weights-vs-features", root / "study", quick=True, datasets=("digits",),
                         archs=("linear", "vgg6bn"), independent_archs=("vgg6bn",), ns=(2, 3), n_train=300,
                         epochs=1, pretrain_epochs=1, width=4, workers=1, show_progress=False)


def test_study_report_reads_well_in_chromium_at_phone_width(study_report: Path, tmp_path: Path) -> None:
    exe = _chromium()
    page = study_report.read_text(encoding="utf-8")
    assert "name='viewport'" in page and "class=\"banner\"" in page  # quick run: the noise banner is shown
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("<head>", "<head>" + _PROBE, 1), encoding="utf-8")
    wrapper = tmp_path / "wrapper.html"
    wrapper.write_text(_WRAPPER.format(src=probed.name, width=WIDTH), encoding="utf-8")
    dom = _run(exe, "--virtual-time-budget=30000", "--allow-file-access-from-files", "--dump-dom", wrapper.as_uri())
    found = re.search(r'<pre id="__probe">(.+?)</pre>', dom.stdout, re.S)
    assert found, f"the probe did not report (chromium rc {dom.returncode}): {dom.stderr[-2000:]}"
    probe = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<")
                       .replace("&gt;", ">"))
    assert probe["viewport"] == WIDTH
    assert probe["errors"] == []
    assert probe["undecodable"] == []
    assert len(probe["images"]) == page.count("<figure>") >= 3
    assert all(w > 100 and h > 100 for _, w, h in probe["images"])
    assert probe["overflow"] == [], f"wider than {WIDTH} px outside a scroll box: {probe['overflow'][:10]}"
    assert probe["scrollWidth"] <= WIDTH

    shot = tmp_path / "shot.png"
    result = _run(exe, f"--screenshot={shot}", study_report.as_uri())
    assert shot.exists(), result.stderr[-2000:]
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape[1] == WIDTH
    dark = float((pixels < 128).mean())
    assert pixels.std() > 20 and 0.01 < dark < 0.6, f"screenshot looks blank (std {pixels.std():.1f}, dark {dark})"
