"""One synthetic image from its keys: scene, person (or distractor / junk crop), then camera effects."""

from __future__ import annotations

import numpy as np
from PIL import Image

from dgnetpp_pl.data.synthetic.cameras import make_camera, render_scene
from dgnetpp_pl.data.synthetic.effects import camera_effects
from dgnetpp_pl.data.synthetic.identities import make_identity, sample_identity
from dgnetpp_pl.data.synthetic.person import draw_occluder, draw_person
from dgnetpp_pl.data.synthetic.spec import SyntheticDomainSpec
from dgnetpp_pl.data.synthetic.streams import STREAM_DISTRACTOR, STREAM_IMAGE, STREAM_JUNK, stream_rng

GENERATOR_VERSION = 1  # bump when the drawing changes, so cached folders are regenerated
_SUPERSAMPLE = 2  # draw at twice the size, then reduce: cheap anti-aliasing


def render_image(spec: SyntheticDomainSpec, seed: int, kind: str, pid: int, cam: int, shot: int) -> Image.Image:
    """Render one image (``height x width`` RGB) deterministically from its (seed, kind, pid, cam, shot)."""
    stream = {"person": STREAM_IMAGE, "distractor": STREAM_DISTRACTOR, "junk": STREAM_JUNK}[kind]
    rng = stream_rng(seed, spec.name, stream, pid, cam, shot)
    camera = make_camera(spec, seed, cam)
    h, w = spec.height * _SUPERSAMPLE, spec.width * _SUPERSAMPLE
    canvas = Image.fromarray(np.clip(render_scene(spec, camera, rng, h, w), 0, 255).astype(np.uint8))
    size = h * rng.uniform(*spec.scale)
    cx, foot = w * (0.5 + rng.normal(0.0, 0.05)), h * (0.975 + rng.normal(0.0, 0.008))
    if kind == "person":
        ident = make_identity(spec.name, seed, pid)
        draw_person(canvas, ident, rng, spec, cx, foot, size * ident.height)
        if rng.random() < spec.occlusion_p:
            draw_occluder(canvas, rng, foot, size)
    elif kind == "distractor":  # a badly cropped stranger, or a box on an empty scene
        if rng.random() < 0.6:
            shift = rng.choice([-1, 1]) * rng.uniform(0.3, 0.6) * w
            draw_person(
                canvas,
                sample_identity(rng),
                rng,
                spec,
                cx + shift,
                foot + rng.uniform(0, 0.4) * h,
                size * rng.uniform(1.0, 1.6),
            )
        else:
            draw_occluder(canvas, rng, foot, size)
    else:  # junk: background with a fragment of a body, the typical false detection
        draw_person(canvas, sample_identity(rng), rng, spec, cx, foot + rng.uniform(0.4, 0.7) * h, size)
    canvas = canvas.reduce(_SUPERSAMPLE)
    return camera_effects(canvas, spec, camera, rng)
