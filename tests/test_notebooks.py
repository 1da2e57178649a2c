"""The notebooks execute headless with the tiny models (nbclient)."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["kmeans_features.ipynb", "demo.ipynb"])
def test_notebook_executes(name, tmp_path):
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no figure was displayed"


def test_kmeans_matches_scipy_on_separable_features():
    import torch

    from odise_pl.analysis.features import kmeans_labels

    f = torch.zeros(3, 4, 6)
    f[0, :, :3] = 1.0
    f[1, :, 3:] = 1.0
    labels = kmeans_labels(f, k=2)
    assert len(set(labels[:, :3].ravel())) == 1 and len(set(labels[:, 3:].ravel())) == 1
    assert labels[0, 0] != labels[0, 5]
