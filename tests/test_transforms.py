"""Train / test transforms and the batched random erasing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dgnetpp_pl.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_test_transform,
    build_train_transform,
    denormalize,
    random_erasing,
)


def gradient_image(width: int = 24, height: int = 48) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.uint8)[None, :, None]
    y = np.linspace(255, 0, height, dtype=np.uint8)[:, None, None]
    return Image.fromarray(np.concatenate(np.broadcast_arrays(x, y, x // 2), axis=2).astype(np.uint8))


def test_test_transform_shape_and_normalisation() -> None:
    out = build_test_transform(32, 16)(Image.new("RGB", (7, 11), (255, 0, 128)))
    assert out.shape == (3, 32, 16) and out.dtype == torch.float32
    expected = (torch.tensor([1.0, 0.0, 128 / 255]) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(out.mean(dim=(1, 2)), expected, atol=1e-5)


def test_train_transform_pads_with_edge_values_not_zeros() -> None:
    # A constant image stays constant under flip, resize, edge padding and cropping; zero padding would not.
    transform = build_train_transform(32, 16, pad=10)
    expected = (torch.tensor([0.2, 0.6, 0.4]) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    image = Image.new("RGB", (16, 32), (51, 153, 102))
    for seed in range(10):
        torch.manual_seed(seed)
        out = transform(image)
        assert out.shape == (3, 32, 16)
        assert torch.allclose(out, expected.view(3, 1, 1).expand_as(out), atol=1e-5)


def test_train_transform_flips_before_a_bicubic_resize() -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 10, 3), dtype=np.uint8))
    flipped = build_train_transform(32, 16, pad=0, flip_p=1.0)(image)
    assert torch.allclose(flipped, build_test_transform(32, 16)(image.transpose(Image.FLIP_LEFT_RIGHT)))

    def as_tensor(resample: int) -> torch.Tensor:
        pixels = np.array(image.transpose(Image.FLIP_LEFT_RIGHT).resize((16, 32), resample))
        return torch.from_numpy(pixels).permute(2, 0, 1) / 255

    assert torch.allclose(denormalize(flipped), as_tensor(Image.BICUBIC), atol=1.5 / 255)
    assert not torch.allclose(denormalize(flipped), as_tensor(Image.BILINEAR), atol=1.5 / 255)


def test_train_transform_crops_at_random_offsets() -> None:
    transform = build_train_transform(32, 16, pad=10, flip_p=0.0)
    outputs = []
    for seed in range(6):
        torch.manual_seed(seed)
        outputs.append(transform(gradient_image()))
    assert len({tuple(o[:, 16, 8].tolist()) for o in outputs}) > 1


def test_denormalize_inverts_normalisation() -> None:
    image = gradient_image()
    out = denormalize(build_test_transform(48, 24)(image))
    expected = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    assert torch.allclose(out, expected, atol=2e-3)
    assert denormalize(torch.full((2, 3, 4, 4), 100.0)).max() == 1.0


def erased_boxes(mask: torch.Tensor) -> list[tuple[int, int, int, int] | None]:
    """Bounding box (top, left, h, w) of the erased pixels of each sample, None if untouched."""
    boxes = []
    for m in mask:
        rows, cols = torch.nonzero(m.any(dim=1)).flatten(), torch.nonzero(m.any(dim=0)).flatten()
        if len(rows) == 0:
            boxes.append(None)
            continue
        top, left = int(rows.min()), int(cols.min())
        h, w = int(rows.max()) - top + 1, int(cols.max()) - left + 1
        assert bool(m[top : top + h, left : left + w].all()), "erased pixels must form a filled rectangle"
        boxes.append((top, left, h, w))
    return boxes


def test_random_erasing_rectangles_area_and_fill() -> None:
    x = torch.randn(64, 3, 64, 32) + 10.0  # no pixel is 0 before erasing
    out = random_erasing(x, p=1.0, value=0.0, generator=torch.Generator().manual_seed(0))
    mask = out == 0.0
    assert bool((mask == mask[:, :1]).all()), "all channels are erased together"
    boxes = erased_boxes(mask[:, 0])
    assert all(b is not None for b in boxes)
    fractions = np.array([h * w / (64 * 32) for _, _, h, w in boxes])
    assert fractions.min() >= 0.015 and fractions.max() <= 0.42
    assert len(set(boxes)) > 50, "each sample draws its own rectangle"
    assert torch.equal(out[~mask], x[~mask])


def test_random_erasing_probability_and_no_inplace() -> None:
    x = torch.ones(2000, 3, 16, 8)
    copy = x.clone()
    out = random_erasing(x, p=0.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(x, copy)
    erased = (out == 0).flatten(1).any(dim=1).float().mean().item()
    assert 0.45 < erased < 0.55
    assert torch.equal(random_erasing(x, p=0.0), x)


def test_random_erasing_is_deterministic_given_a_generator() -> None:
    x = torch.randn(8, 3, 32, 16)
    a = random_erasing(x, generator=torch.Generator().manual_seed(5))
    b = random_erasing(x, generator=torch.Generator().manual_seed(5))
    c = random_erasing(x, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_random_erasing_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"\(B, C, H, W\).*\(3, 8, 8\)"):
        random_erasing(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="p must be in"):
        random_erasing(torch.zeros(1, 3, 8, 8), p=1.5)
