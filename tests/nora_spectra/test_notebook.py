"""``docs/notebooks/tour.ipynb`` runs from top to bottom with the current code, and is kept with its outputs.

The notebook is executed in a fresh kernel by nbclient (a dev dependency, with nbformat and ipykernel) in
a scratch directory; a cell that raises fails this test, so the tour can never go stale. To refresh the
committed outputs after changing the code or the notebook::

    .venv/bin/python -m tests.nora_spectra.test_notebook --write
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[2] / "docs" / "notebooks" / "tour.ipynb"


def execute(path: Path, workdir: Path):
    """The notebook at ``path`` executed in a new ``python3`` kernel whose working directory is ``workdir``."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=180, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(workdir)}})
    client.execute()
    return notebook


def _outputs(notebook) -> dict[int, list]:
    return {i: cell.outputs for i, cell in enumerate(notebook.cells) if cell.cell_type == "code"}


def test_the_tour_runs_and_shows_what_it_says(tmp_path):
    pytest.importorskip("nbclient", reason="nbclient (a dev dependency) executes the notebook")
    pytest.importorskip("ipykernel", reason="ipykernel (a dev dependency) runs the notebook's kernel")
    notebook = execute(NOTEBOOK, tmp_path)
    outputs = _outputs(notebook)
    kinds = {kind for outs in outputs.values() for out in outs for kind in out.get("data", {})}
    assert {"text/html", "image/png"} <= kinds  # result tables render as HTML, figures as PNG
    assert not [out for outs in outputs.values() for out in outs if out.output_type == "error"]
    texts = "\n".join(out.get("data", {}).get("text/plain", "") + out.get("text", "")
                      for outs in outputs.values() for out in outs)
    assert "Resize(input='r32', output='r32-small', policy='--energy 0.9', modules=8, rank 256 -> 32" in texts
    assert "Overlap(a='r8', b='r32'" in texts and "[tool.spectra.check]" in texts


def test_the_committed_tour_holds_its_outputs():
    import json

    data = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    code = [cell for cell in data["cells"] if cell["cell_type"] == "code"]
    assert code and all(cell["execution_count"] is not None for cell in code), "run with --write to refresh"
    assert all(cell["outputs"] for cell in code)
    assert [cell["execution_count"] for cell in code] == list(range(1, len(code) + 1))


if __name__ == "__main__":  # pragma: no cover - refreshes the committed outputs
    import tempfile

    import nbformat

    if sys.argv[1:] != ["--write"]:
        raise SystemExit("usage: python -m tests.nora_spectra.test_notebook --write")
    with tempfile.TemporaryDirectory() as scratch:
        executed = execute(NOTEBOOK, Path(scratch))
    nbformat.write(executed, NOTEBOOK)
    print(f"wrote {NOTEBOOK} with its outputs")
