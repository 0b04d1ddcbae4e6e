"""ONNX export of the appearance encoder: onnxruntime features equal PyTorch's for any batch size."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from dgnetpp_pl.data.transforms import build_test_transform
from dgnetpp_pl.export import export_onnx, onnx_features
from dgnetpp_pl.extract import FeatureExtractor
from dgnetpp_pl.features import embed_images

onnx = pytest.importorskip("onnx", reason="the export extra is not installed (pip install -e .[export])")
pytest.importorskip("onnxruntime", reason="the export extra is not installed (pip install -e .[export])")
pytest.importorskip("onnxscript", reason="the export extra is not installed (pip install -e .[export])")

TOL = 1e-4


@pytest.fixture(scope="module")
def exported(tiny_source_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[bool, tuple[Path, object]]:
    """The tiny trained checkpoint exported with and without flip averaging in the graph."""
    out = tmp_path_factory.mktemp("onnx")
    return {flip: export_onnx(tiny_source_ckpt, out / f"flip_{flip}.onnx", flip=flip) for flip in (True, False)}


@pytest.mark.parametrize("flip", [True, False])
def test_onnxruntime_matches_pytorch_for_batches_of_1_and_7(exported, flip: bool) -> None:
    path, graph = exported[flip]
    h, w = graph.image_size
    gen = torch.Generator().manual_seed(1)
    for batch in (1, 7):
        x = torch.randn(batch, 3, h, w, generator=gen)
        ref = embed_images(graph.e_app, x, alpha=graph.alpha, flip=flip)
        got = onnx_features(path, x)
        assert got.shape == ref.shape == (batch, 2 * graph.e_app.bottleneck_dim)
        assert float((got - ref).abs().max()) <= TOL
        assert torch.allclose(got.norm(dim=1), torch.ones(batch), atol=1e-5)


def test_flip_is_in_the_graph(exported) -> None:
    (with_flip, graph), (without, _) = exported[True], exported[False]
    x = torch.randn(2, 3, *graph.image_size)
    assert float((onnx_features(with_flip, x) - onnx_features(without, x)).abs().max()) > 1e-3


def test_the_batch_dimension_is_dynamic(exported) -> None:
    model = onnx.load(str(exported[True][0]))
    (images,) = model.graph.input
    dims = images.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, *exported[True][1].image_size]
    assert [o.name for o in model.graph.output] == ["features"]


def test_features_equal_the_feature_extractor_on_image_files(exported, tiny_source_ckpt: Path, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    files = []
    for i in range(3):
        pixels = (torch.rand(80, 40, 3, generator=g) * 255).to(torch.uint8).numpy()
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(pixels).save(files[-1])
    ref = FeatureExtractor(tiny_source_ckpt, device="cpu")(files)
    path, graph = exported[True]
    transform = build_test_transform(*graph.image_size)
    x = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    assert float((onnx_features(path, x) - ref).abs().max()) <= TOL


@pytest.mark.slow
def test_export_cli_writes_and_checks_the_graph(tiny_source_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "encoder.onnx"
    cmd = [sys.executable, "-m", "dgnetpp_pl.export", f"ckpt_path={tiny_source_ckpt}", f"out={out}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=os.environ.copy(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "onnxruntime vs PyTorch, batches of 1 and 7: max abs difference" in proc.stdout
    diff = float(proc.stdout.split("max abs difference ")[1].split()[0].rstrip("."))
    assert diff <= TOL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder.onnx"]  # one file, no run folder
