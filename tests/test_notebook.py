"""notebooks/fid_vs_gflops.ipynb runs top to bottom on a folder of synthetic run records."""

import base64
import io
from pathlib import Path

import nbformat
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from PIL import Image

from test_report import write_table4_records

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "fid_vs_gflops.ipynb"


def kernel_manager(tmp_path: Path) -> KernelManager:
    """A kernel of this interpreter (the venv's), from a kernel spec written for the test: independent of
    whatever Jupyter kernels the machine has installed."""
    kernels = tmp_path / "kernels"
    write_kernel_spec(kernels / "ditlab-test")  # argv: [sys.executable, "-m", "ipykernel_launcher", ...]
    specs = KernelSpecManager(kernel_dirs=[str(kernels)], ensure_native_kernel=False)
    return KernelManager(kernel_name="ditlab-test", kernel_spec_manager=specs)


def test_notebook_runs_on_synthetic_records(tmp_path):
    runs = write_table4_records(tmp_path / "multirun" / "2026-01-31_12-00-00")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code")  # stored clean
    (i,) = [i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])]
    nb.cells.insert(i + 1, nbformat.v4.new_code_cell(f"RUNS = [{str(runs)!r}]"))  # as papermill injects

    NotebookClient(
        nb, km=kernel_manager(tmp_path), timeout=120, resources={"metadata": {"path": str(tmp_path)}}
    ).execute()

    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    text = "".join(out.get("text", "") for out in outputs)
    assert "12 runs:" in text and "adaln_zero-DiT-B-p4" in text
    markdown = "".join(out.data["text/markdown"] for out in outputs if "text/markdown" in out.get("data", {}))
    assert "| DiT-B | 122.74 | 68.38 | 43.47 |" in markdown
    images = [out.data["image/png"] for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) == 2  # FID vs Gflops, FID vs training compute
    for data in images:
        with Image.open(io.BytesIO(base64.b64decode(data))) as image:
            assert image.format == "PNG" and min(image.size) > 200


def test_notebook_is_valid_and_reads_the_sweeps_folder_by_default():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    namespace: dict = {}
    exec(cell.source, namespace)
    assert namespace["RUNS"] == ["../multirun"] and namespace["WANDB"] is None
