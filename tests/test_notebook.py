"""notebooks/fid_vs_gflops.ipynb runs top to bottom: as committed, on the committed CPU campaign's records (what a
fresh clone shows), and on a folder of synthetic run records."""

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

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "fid_vs_gflops.ipynb"
CAMPAIGN = "experiments/results/cpu_design_space"  # committed records: 6 points × 2 seeds


def kernel_manager(tmp_path: Path) -> KernelManager:
    """A kernel of this interpreter (the venv's), from a kernel spec written for the test: independent of
    whatever Jupyter kernels the machine has installed."""
    kernels = tmp_path / "kernels"
    write_kernel_spec(kernels / "ditlab-test")  # argv: [sys.executable, "-m", "ipykernel_launcher", ...]
    specs = KernelSpecManager(kernel_dirs=[str(kernels)], ensure_native_kernel=False)
    return KernelManager(kernel_name="ditlab-test", kernel_spec_manager=specs)


def execute(nb, tmp_path: Path, cwd: Path) -> list:
    """Runs every cell in a fresh kernel started in `cwd`; the outputs of all code cells, none an error."""
    NotebookClient(
        nb, km=kernel_manager(tmp_path), timeout=120, resources={"metadata": {"path": str(cwd)}}
    ).execute()
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"], [
        out for out in outputs if "ename" in out
    ]
    return outputs


def markdown_of(outputs: list) -> str:
    return "".join(out.data["text/markdown"] for out in outputs if "text/markdown" in out.get("data", {}))


def check_figures(outputs: list) -> None:
    images = [out.data["image/png"] for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) == 2  # FID vs Gflops, FID vs training compute
    for data in images:
        with Image.open(io.BytesIO(base64.b64decode(data))) as image:
            assert image.format == "PNG" and min(image.size) > 200


def test_notebook_as_committed_shows_the_committed_campaign(tmp_path):
    """A fresh clone: nothing run first, the kernel started outside the checkout (the notebook finds the
    repository root itself), the default RUNS read experiments/results/cpu_design_space."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    outputs = execute(nb, tmp_path, cwd=tmp_path)
    text = "".join(out.get("text", "") for out in outputs)
    assert "12 runs:" in text and "adaln_zero-DiT-Ti-p2" in text and "in_context-DiT-Ti-p4" in text
    markdown = markdown_of(outputs)
    assert "152.79 (150.89–154.69)" in markdown  # adaLN-Zero /2, mean (range) over the two seeds
    assert "| in-context | Ti/4 |" in markdown  # the block ablation's table
    check_figures(outputs)


def test_notebook_runs_on_synthetic_records(tmp_path):
    runs = write_table4_records(tmp_path / "multirun" / "2026-01-31_12-00-00")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code")  # stored clean
    (i,) = [i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])]
    nb.cells.insert(i + 1, nbformat.v4.new_code_cell(f"RUNS = [{str(runs)!r}]"))  # as papermill injects

    outputs = execute(nb, tmp_path, cwd=tmp_path)
    text = "".join(out.get("text", "") for out in outputs)
    assert "12 runs:" in text and "adaln_zero-DiT-B-p4" in text
    assert "| DiT-B | 122.74 | 68.38 | 43.47 |" in markdown_of(outputs)
    check_figures(outputs)


def test_notebook_is_valid_and_reads_the_committed_campaign_by_default():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    namespace: dict = {}
    exec(cell.source, namespace)
    assert namespace["RUNS"] == [CAMPAIGN] and namespace["WANDB"] is None  # relative to the repository root
    assert len(list((ROOT / CAMPAIGN).rglob("results.json"))) == 12  # committed, not produced by a run
