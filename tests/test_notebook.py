"""docs/quickstart.ipynb runs top to bottom and draws its figure (nbclient, a fresh kernel)."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "docs" / "quickstart.ipynb"


@pytest.mark.e2e
def test_quickstart_notebook_runs(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    # run from an empty directory: run_dir=None must write nothing
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    client.execute(env={**os.environ, "PYTHONPATH": pythonpath})  # this checkout's ntk_rnn
    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    stderr = "".join(o.get("text", "") for c in code for o in c.outputs
                     if o.get("name") == "stderr")
    assert "TqdmWarning" not in stderr and "IProgress not found" not in stderr  # a real kernel
    assert "100%" in stderr  # fit() drew its progress bar (text: no ipywidgets here)
    images = [o for o in code[-1].outputs if "image/png" in o.get("data", {})]
    assert images, "the last cell should plot ntk/drift_from_init"
    assert list(tmp_path.iterdir()) == [], "run_dir=None wrote files"


def test_quickstart_text_matches_its_plot(monkeypatch):
    """The closing text's claims hold for the numbers the notebook plots (run in-process)."""
    import re

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.setattr(plt, "show", lambda: None)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    ns: dict = {}
    for cell in nb.cells:
        if cell.cell_type == "code":
            exec(compile(cell.source, str(NOTEBOOK), "exec"), ns)
    text = nb.cells[-1].source
    (t128, d128), (t512, d512) = ns["runs"][128], ns["runs"][512]
    assert t128 == t512 and len(t128) == 9  # the default cadence: t = 0, 1/8, ..., 1
    if "grows with" in text:
        assert all(b >= a for a, b in zip(d128, d128[1:])), "the drift does not grow throughout"
    peak = re.search(r"peaks near \$t \\approx ([0-9.]+)\$", text)
    if peak:
        i = max(range(len(d128)), key=d128.__getitem__)
        assert abs(t128[i] - float(peak[1])) <= 0.125 and d128[-1] < d128[i]
    if "several times smaller at every" in text:
        assert all(b < a / 2 for a, b in zip(d128[1:], d512[1:]))
