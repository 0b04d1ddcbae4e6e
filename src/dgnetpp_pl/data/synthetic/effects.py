"""Pure camera-effects renderer: what one camera does to the light reaching its sensor."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from dgnetpp_pl.data.synthetic.cameras import Camera
from dgnetpp_pl.data.synthetic.spec import SyntheticDomainSpec


def camera_effects(image: Image.Image, spec: SyntheticDomainSpec, cam: Camera, rng: np.random.Generator) -> Image.Image:
    """Colour cast, exposure, tone curve, light gradient, resolution loss, blur and sensor noise."""
    w, h = image.size
    x = np.asarray(image, dtype=np.float32) / 255.0
    x = x**cam.gamma
    light = 1.0 + cam.light_slope * (np.linspace(-0.5, 0.5, w, dtype=np.float32)[None, :, None])
    x = x * cam.gains * (cam.exposure * rng.uniform(0.95, 1.05)) * light
    image = Image.fromarray((np.clip(x, 0.0, 1.0) * 255 + 0.5).astype(np.uint8))
    if spec.downsample < 1.0:
        small = (max(int(w * spec.downsample), 4), max(int(h * spec.downsample), 8))
        image = image.resize(small, Image.BILINEAR).resize((w, h), Image.BILINEAR)
    radius = rng.uniform(*spec.blur)
    if radius > 0.05:
        image = image.filter(ImageFilter.GaussianBlur(radius))
    x = np.asarray(image, dtype=np.float32) + rng.normal(0.0, spec.noise * 255, (h, w, 3)).astype(np.float32)
    return Image.fromarray(np.clip(x + 0.5, 0, 255).astype(np.uint8))
