"""docs/quickstart.ipynb runs top to bottom and draws its figure (nbclient, a fresh kernel)."""

import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "docs" / "quickstart.ipynb"


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
    images = [o for o in code[-1].outputs if "image/png" in o.get("data", {})]
    assert images, "the last cell should plot ntk/drift_from_init"
    assert list(tmp_path.iterdir()) == [], "run_dir=None wrote files"
