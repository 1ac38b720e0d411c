"""TensorBoard in a real browser (headless Chromium driven by selenium): a small run and a 4-job
sweep made through the CLI, served by ``tensorboard`` on 127.0.0.1, must open on the NTK:

- Time Series: the first group is ``ntk``, and its first cards are the distance to the limit and
  the drift from init;
- HParams: the table shows width, seed, drift from init and distance to limit by default.

A screenshot of every tab is saved (into ``$NTK_RNN_SCREENSHOTS``, which ``make screenshots``
sets to ``docs/img``; else into the test's temporary directory).

Run it with ``make test-browser`` (``pytest -m browser``, after installing Chromium, its driver
and selenium). Selected so, a missing browser, driver or selenium FAILS the test with what to
install; in a plain ``pytest`` run (not ``-m browser``) it is skipped, saying how to run it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from .conftest import ROOT, run_cli

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1920,1080"]
# tiny runs: NTK every 8 steps on 16 short probes, images every 16 steps
NTK = ["callbacks.ntk.n_probes=16", "callbacks.ntk.probe_length=8",
       "callbacks.ntk.limit_tol=2e-3", "callbacks.ntk.every_n_steps=8",
       "callbacks.ntk.image_every_n_steps=16", "callbacks.ntk.histogram_every_n_steps=16"]
# short trial names that show the swept values (ntk_rnn.logging.trial_name)
SUBDIR = "${hydra.job.num}_${ntk_trial:${hydra.sweep.dir},${hydra.job.override_dirname}}"
TABS = ("timeseries", "scalars", "custom_scalars", "images", "distributions", "histograms",
        "text", "hparams")
WAIT_S = 40

# text of every node under ``root``, through shadow roots (Polymer dashboards use them)
DEEP_TEXT = """
function deepText(root) {
  let out = [];
  const walk = (node) => {
    if (node.nodeType === Node.TEXT_NODE) { const t = node.textContent.trim(); if (t) out.push(t); }
    if (node.shadowRoot) walk(node.shadowRoot);
    for (const c of node.childNodes) walk(c);
  };
  walk(root);
  return out;
}
"""
# Time Series: the groups in order (title, card titles); Pinned is not a card group
TS_GROUPS = """
return Array.from(document.querySelectorAll('metrics-card-groups-component .card-group')).map(g => {
  const t = g.querySelector('.group-title');
  const cards = Array.from(g.querySelectorAll('metrics-card-grid card-view')).map(
      c => c.innerText.split('\\n').slice(0, 2).join('').trim());
  return [t ? t.innerText.trim() : '', cards];
});
"""
# HParams: the header cells of the sessions table (a vaadin-grid inside shadow roots)
HP_HEADERS = DEEP_TEXT + """
const find = (root, sel) => {
  const hit = root.querySelector(sel);
  if (hit) return hit;
  for (const el of root.querySelectorAll('*')) {
    if (el.shadowRoot) { const h = find(el.shadowRoot, sel); if (h) return h; }
  }
  return null;
};
const view = find(document, 'tf-hparams-table-view');
if (!view) return null;
const grid = find(view.shadowRoot || view, 'vaadin-grid');
if (!grid || !grid.shadowRoot) return null;
return Array.from(grid.shadowRoot.querySelectorAll('thead th')).map(th => {
  const slot = th.querySelector('slot');
  const nodes = slot ? slot.assignedNodes() : [th];
  return nodes.map(n => deepText(n).join(' ')).join(' ').trim();
});
"""


def _explicitly_selected(config) -> bool:
    expr = config.getoption("markexpr") or ""
    return "browser" in expr and "not browser" not in expr


@pytest.fixture(scope="module")
def webdriver_mod(request):
    """selenium's webdriver, after checking the browser, its driver and selenium are there."""
    if not _explicitly_selected(request.config):
        pytest.skip("real-browser test: run `make test-browser` (pytest -m browser)")
    missing = [f"{p} (apt-get install {pkg})" for p, pkg in
               ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver"))
               if not (os.path.isfile(p) and os.access(p, os.X_OK))]
    try:
        from selenium import webdriver
    except ImportError:
        missing.append(f"selenium ({sys.executable} -m pip install selenium)")
        webdriver = None
    if missing:
        pytest.fail("the real-browser test needs " + "; ".join(missing) +
                    ": `make browser-deps` installs them", pytrace=False)
    return webdriver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str):
    return json.loads(urllib.request.urlopen(url, timeout=5).read())


@pytest.fixture(scope="module")
def logdir(webdriver_mod, tmp_path_factory):
    """A single run and a 4-job width × seed sweep (with the sweep's plot against t)."""
    d = tmp_path_factory.mktemp("tb")
    r = run_cli("model.width=32", "train.horizon=1", *NTK, f"hydra.run.dir={d / 'run'}")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("-m", "model.width=32,64", "seed=0,1", "train.horizon=1", *NTK,
                f"hydra.sweep.dir={d / 'sweep'}", f"hydra.sweep.subdir='{SUBDIR}'")
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "ntk_rnn.sweep", str(d / "sweep"), "--plot"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return d


@pytest.fixture(scope="module")
def tensorboard_url(logdir):
    port = _free_port()
    tb = shutil.which("tensorboard", path=str(Path(sys.executable).parent)) or "tensorboard"
    proc = subprocess.Popen([tb, "--logdir", str(logdir), "--host", "127.0.0.1", "--port",
                             str(port), "--load_fast=false", "--reload_interval=2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        want = {"run", "sweep", *(f"sweep/{p.name}" for p in (logdir / "sweep").iterdir()
                                  if p.is_dir())}
        runs: list = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not want <= set(runs):
            if proc.poll() is not None:
                pytest.fail(f"tensorboard exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                runs = _get_json(f"{url}/data/runs")
            except OSError:
                pass
            time.sleep(0.5)
        assert want <= set(runs), f"tensorboard loaded {runs}, expected {sorted(want)}"
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def browser(webdriver_mod, tensorboard_url, tmp_path_factory):
    from selenium.webdriver.chrome.service import Service

    opts = webdriver_mod.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    drv = webdriver_mod.Chrome(service=Service(CHROMEDRIVER), options=opts)
    drv.set_page_load_timeout(WAIT_S)
    try:
        yield drv
    finally:
        drv.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    d = Path(os.environ.get("NTK_RNN_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    if not d.is_absolute():
        d = ROOT / d
    d.mkdir(parents=True, exist_ok=True)
    return d


def _open(browser, url: str, tab: str) -> None:
    browser.get(f"{url}/#{tab}")


def _wait(browser, script: str, ok, what: str):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    last = []

    def check(drv):
        last[:] = [drv.execute_script(script)]
        return last[0] if ok(last[0]) else False

    try:
        return WebDriverWait(browser, WAIT_S, poll_frequency=0.5).until(check)
    except TimeoutException:
        pytest.fail(f"{what}: after {WAIT_S} s the page shows {last[0] if last else None!r}")


def test_time_series_opens_on_the_ntk_group(browser, tensorboard_url, shots):
    _open(browser, tensorboard_url, "timeseries")
    groups = _wait(browser, TS_GROUPS, lambda g: bool(g) and len(g[0][1]) >= 2,
                   "Time Series groups")
    title, cards = groups[0]
    assert title == "ntk", f"first Time Series group is {title!r}: {[g[0] for g in groups]}"
    assert cards[:2] == ["ntk/distance_to_limit", "ntk/drift_from_init"], cards[:6]
    assert "sweep" in [g[0] for g in groups]  # the sweep's plot against t, at its root
    time.sleep(1.0)  # let the charts draw
    browser.save_screenshot(str(shots / "tensorboard_timeseries.png"))


def test_hparams_table_shows_width_seed_drift_and_distance(browser, tensorboard_url, shots):
    _open(browser, tensorboard_url, "hparams")
    want = ("width", "seed", "drift from init", "distance to limit")
    headers = _wait(browser, HP_HEADERS, lambda h: bool(h) and all(w in h for w in want),
                    "HParams table headers")
    assert headers.index("width") < headers.index("drift from init")
    trials = _wait(browser, DEEP_TEXT + "return deepText(document.body);",
                   lambda t: any(s.startswith("sweep/0_width=32,seed=0") for s in t),
                   "HParams trial names")
    assert "32" in trials and "64" in trials  # integers as integers (not 32.000)
    browser.save_screenshot(str(shots / "tensorboard_hparams.png"))


def test_screenshots_of_the_other_tabs(browser, tensorboard_url, shots):
    expect = {"custom_scalars": "distance to limit ‖K_t − K_∞‖/‖K_∞‖",
              "images": "ntk_images/K_t", "text": "ntk/limit_kernel",
              "scalars": "ntk/drift_from_init"}
    for tab in TABS:
        if tab in ("timeseries", "hparams"):
            continue
        _open(browser, tensorboard_url, tab)
        if tab in expect:
            _wait(browser, DEEP_TEXT + "return deepText(document.body);",
                  lambda t, s=expect[tab]: any(s in x for x in t), f"the {tab} tab")
        time.sleep(1.5)  # let the charts draw
        browser.save_screenshot(str(shots / f"tensorboard_{tab}.png"))
    assert len(list(shots.glob("tensorboard_*.png"))) >= len(TABS) - 2
