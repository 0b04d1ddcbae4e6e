"""The notebooks run in order on the tiny built-in data and show what they promise; git keeps them without outputs."""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
from configs import TINY_DEMO

from dgnetpp_pl.train import STAGE_LABELS

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = ("01_quickstart.ipynb", "02_disentanglement.ipynb", "03_retrieval.ipynb")


def tagged_outputs(nb: nbformat.NotebookNode, tag: str) -> list[dict]:
    """Outputs of the one code cell tagged ``tag``."""
    cells = [c for c in nb.cells if c.cell_type == "code" and tag in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
    return cells[0].outputs


def has_png(outputs: list[dict]) -> bool:
    return any("image/png" in o.get("data", {}) for o in outputs)


def stdout_of(outputs: list[dict]) -> str:
    return "".join(o["text"] for o in outputs if o["output_type"] == "stream" and o["name"] == "stdout")


def table_row(text: str, label: str) -> tuple[float, float]:
    """The two percentages printed after ``label`` in a metrics table."""
    match = re.search(rf"^{re.escape(label)}\s+([\d.]+)\s+([\d.]+)\s*$", text, flags=re.MULTILINE)
    assert match, f"no row {label!r} in:\n{text}"
    return float(match.group(1)), float(match.group(2))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_has_no_outputs(name: str) -> None:
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and any(c.cell_type == "markdown" for c in nb.cells)
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, f"{name} cell {cell.id} holds outputs"


def pinned_kernel(mp: pytest.MonkeyPatch, root: Path) -> None:
    """Make the "python3" kernel this interpreter, whatever kernel specs the machine holds elsewhere."""
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client.kernelspec import KernelSpecManager

    write_kernel_spec(root / "kernels" / "python3")
    mp.setenv("JUPYTER_PATH", str(root))
    assert KernelSpecManager().get_kernel_spec("python3").argv[0] == sys.executable


def run_notebook(name: str) -> nbformat.NotebookNode:
    """Execute one notebook from the notebooks folder; raises CellExecutionError (with the traceback) on failure."""
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK_DIR)}}
    ).execute()
    return nb


def test_disentanglement_without_a_checkpoint_says_what_to_do(tmp_path: Path) -> None:
    from nbclient.exceptions import CellExecutionError

    with pytest.MonkeyPatch.context() as mp:
        pinned_kernel(mp, tmp_path / "jupyter")
        mp.setenv("DGNETPP_NOTEBOOK_STATE", str(tmp_path / "missing.json"))
        mp.delenv("DGNETPP_CKPT", raising=False)
        with pytest.raises(CellExecutionError, match=r"No checkpoint: set DGNETPP_CKPT=.*01_quickstart"):
            run_notebook("02_disentanglement.ipynb")


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory, synthetic_data_dir: Path):
    """Run the three notebooks in order (01 on the tiny preset); returns the executed notebooks and the run dir."""
    tmp = tmp_path_factory.mktemp("notebooks")
    run_dir = tmp / "run"
    overrides = [o for o in TINY_DEMO if o != "experiment=demo"]  # the notebook adds experiment=demo itself
    overrides += [f"paths.data_dir={synthetic_data_dir}", f"paths.output_dir={run_dir}"]
    env = {
        "DGNETPP_NOTEBOOK_OVERRIDES": shlex.join(overrides),
        "DGNETPP_NOTEBOOK_STATE": str(tmp / "state.json"),
        "WANDB_MODE": "offline",
    }
    notebooks = {}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        # MPLBACKEND=Agg would hide the figures; the checkpoints must come from the state file.
        for key in ("MPLBACKEND", "DGNETPP_CKPT", "DGNETPP_CKPT_SOURCE"):
            mp.delenv(key, raising=False)
        pinned_kernel(mp, tmp / "jupyter")
        for name in NOTEBOOKS:
            notebooks[name] = run_notebook(name)
    return notebooks, Path(env["DGNETPP_NOTEBOOK_STATE"]), run_dir


def assert_rows_match_run(text: str, labels: dict[str, str], run_dir: Path) -> None:
    """Each stage's table row (label -> mAP, Rank-1 in %) equals the run's test metrics to the printed digit."""
    results = json.loads((run_dir / "metrics.json").read_text())
    for stage, label in labels.items():
        m_ap, rank1 = table_row(text, label)
        assert m_ap == pytest.approx(100 * results[stage]["test/mAP"], abs=0.051)
        assert rank1 == pytest.approx(100 * results[stage]["test/Rank-1"], abs=0.051)


@pytest.mark.slow
def test_quickstart_shows_curves_swap_grid_and_metrics_and_hands_over_checkpoints(executed) -> None:
    notebooks, state_file, run_dir = executed
    nb = notebooks["01_quickstart.ipynb"]
    assert has_png(tagged_outputs(nb, "loss-curves"))
    assert has_png(tagged_outputs(nb, "swap-grid"))
    table = stdout_of(tagged_outputs(nb, "metrics-table"))
    assert "target mAP" in table and "target Rank-1" in table
    ran = json.loads((run_dir / "metrics.json").read_text())  # the demo trains no teacher
    assert_rows_match_run(table, {stage: STAGE_LABELS[stage] for stage in ran}, run_dir)
    state = json.loads(state_file.read_text())
    assert state["adapt_ckpt"] == str((run_dir / "checkpoints" / "adapt" / "final.ckpt").resolve())
    assert state["source_ckpt"] == str((run_dir / "checkpoints" / "source" / "final.ckpt").resolve())
    assert Path(state["adapt_ckpt"]).is_file() and Path(state["source_ckpt"]).is_file()


@pytest.mark.slow
def test_disentanglement_shows_swap_grid_and_interpolation(executed) -> None:
    notebooks, state_file, _ = executed
    nb = notebooks["02_disentanglement.ipynb"]
    assert has_png(tagged_outputs(nb, "swap-grid"))
    assert has_png(tagged_outputs(nb, "interpolation"))
    text = "".join(stdout_of(c.outputs) for c in nb.cells if c.cell_type == "code")
    assert json.loads(state_file.read_text())["adapt_ckpt"] in text  # the model it loaded


@pytest.mark.slow
def test_retrieval_evaluates_both_checkpoints_and_plots_embedding(executed) -> None:
    notebooks, _, run_dir = executed
    nb = notebooks["03_retrieval.ipynb"]
    assert has_png(tagged_outputs(nb, "rank-lists"))
    assert has_png(tagged_outputs(nb, "embedding"))
    # Its own evaluation of the two checkpoints reproduces the metrics of the training run.
    text = "".join(stdout_of(c.outputs) for c in nb.cells if c.cell_type == "code")
    assert_rows_match_run(text, {"source": "before (source only)", "adapt": "after (DG-Net++)"}, run_dir)


def independent_domain_gap(source: np.ndarray, target: np.ndarray, k: int = 10) -> tuple[float, float]:
    """(distance between the domain means, share of cross-domain neighbours among each row's k nearest by cosine
    similarity, itself excluded), computed here in numpy."""
    x = np.concatenate([source, target]).astype(np.float64)
    domain = np.r_[np.zeros(len(source)), np.ones(len(target))]
    similarity = x @ x.T
    np.fill_diagonal(similarity, -np.inf)
    neighbours = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    cross = float((domain[neighbours] != domain[:, None]).mean())
    return float(np.linalg.norm(source.mean(0) - target.mean(0))), cross


@pytest.mark.slow
def test_retrieval_states_the_domain_gap_it_measures(executed) -> None:
    from configs import typed_train

    from dgnetpp_pl.data.domains import build_domain
    from dgnetpp_pl.extract import FeatureExtractor

    notebooks, state_file, _ = executed
    text = stdout_of(tagged_outputs(notebooks["03_retrieval.ipynb"], "domain-gap"))
    state = json.loads(state_file.read_text())
    cfg = typed_train(*state["overrides"])
    domains = {
        role: build_domain(getattr(cfg.data, role), cfg.data.synthetic, cfg.data.data_dir, role)
        for role in ("source", "target")
    }
    measured = {}
    for label, ckpt in (("before (source only)", state["source_ckpt"]), ("after (DG-Net++)", state["adapt_ckpt"])):
        extract = FeatureExtractor(ckpt, device="cpu", batch_size=32)
        feats = [extract([r.path for r in (*d.query, *d.gallery)]).numpy() for d in domains.values()]
        gap, cross = independent_domain_gap(*feats)
        match = re.search(rf"^{re.escape(label)}\s+([\d.]+)\s+([\d.]+)%$", text, flags=re.MULTILINE)
        assert match, f"no row {label!r} in:\n{text}"
        assert float(match.group(1)) == pytest.approx(gap, abs=6e-4)
        assert float(match.group(2)) == pytest.approx(100 * cross, abs=0.06)
        measured[label] = (gap, cross)
    (gap_b, cross_b), (gap_a, cross_a) = measured.values()
    # The sentences say which way each measure moved: a lower mean gap, or more cross-domain neighbours, is closer.
    gap_word = "closer" if gap_a < gap_b else "further apart"
    cross_word = "unchanged" if cross_a == cross_b else "closer" if cross_a > cross_b else "further apart"  # counts
    assert f"went from {gap_b:.3f} to {gap_a:.3f}: by this measure the domains are {gap_word} after" in text
    shares = f"{100 * cross_b:.1f}% to {100 * cross_a:.1f}%"
    assert f"went from {shares}: by this measure the domains are {cross_word} after" in text
