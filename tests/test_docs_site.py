"""The built documentation site in headless Chromium, offline: the theory page shows rendered
math (MathJax is served with the site), the API reference shows no raw reST roles and no
implementation attributes. `make test-browser` (it builds the site first, `make docs`)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .test_browser import CHROMEDRIVER, CHROMIUM, FLAGS, webdriver_mod  # noqa: F401 (fixture)

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
SITE = Path(os.environ.get("NTK_RNN_SITE", ROOT / "site"))
OFFLINE = "--host-resolver-rules=MAP * ~NOTFOUND"  # no host name resolves: no network


@pytest.fixture(scope="module")
def site(webdriver_mod):
    """The site `make docs` built (built here with mkdocs when missing)."""
    if not (SITE / "theory.html").is_file():
        mkdocs = Path(sys.executable).parent / "mkdocs"
        if not mkdocs.exists():
            pytest.fail(f"no site in {SITE} and no mkdocs: run `make docs` first", pytrace=False)
        r = subprocess.run([str(mkdocs), "build", "--strict", "-d", str(SITE)], cwd=ROOT,
                           capture_output=True, text=True, timeout=600,
                           env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))
        assert r.returncode == 0, r.stderr[-3000:]
    return SITE


@pytest.fixture(scope="module")
def offline_browser(webdriver_mod):
    from selenium.webdriver.chrome.service import Service

    opts = webdriver_mod.ChromeOptions()
    for flag in FLAGS + [OFFLINE, "--allow-file-access-from-files"]:
        opts.add_argument(flag)
    opts.binary_location = CHROMIUM
    driver = webdriver_mod.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def _load(driver, page: Path, until: str, wait_s: float = 30.0):
    driver.get(page.as_uri())
    deadline = time.time() + wait_s
    while time.time() < deadline:
        if driver.execute_script(until):
            return
        time.sleep(0.25)


def test_theory_page_renders_its_math_offline(site, offline_browser):
    d = offline_browser
    _load(d, site / "theory.html", "return document.querySelectorAll('mjx-container').length > 100")
    rendered = d.execute_script("return document.querySelectorAll('mjx-container').length")
    left = d.execute_script("return Array.from(document.querySelectorAll('.arithmatex'))"
                            ".filter(e => !e.querySelector('mjx-container')).length")
    text = d.execute_script("return document.body.innerText")
    assert rendered > 100 and left == 0, (rendered, left)
    assert "\\(" not in text and "\\beta" not in text  # no raw TeX, table of contents included


def test_api_reference_shows_no_roles_and_no_assignment_code(site, offline_browser):
    d = offline_browser
    _load(d, site / "api" / "training.html", "return !!document.querySelector('article')")
    text = d.execute_script("return document.querySelector('article').innerText")
    for raw in (":class:", ":meth:", ":func:", ":mod:", "cfg = _cfg", "stepper = None",
                "status = 'pending'", "_cfg"):
        assert raw not in text, raw
    for documented in ("alpha", "horizon", "progress", "every_t", "limit_tol"):
        assert documented in text
