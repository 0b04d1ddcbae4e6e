"""The built-in cross-domain person dataset: drawn people, two camera networks, Market-1501 layout on disk.

Identity lives in clothing colours and patterns, body proportions, skin and hair, and accessories; it is a
deterministic function of (seed, domain name, pid). Each image has its own pose, scale, position, optional
occluder and sensor noise. The two preset domains differ like real camera networks in their scenes (indoor walls
and floor vs outdoor sky / facade and textured ground, a different number of cameras) and in how people appear
in them (scale, stride, lean, occlusion). Colour cast, exposure, blur, resolution and noise are per-camera
settings of the spec too. The data seed draws the identities, the cameras' scenes and photometry, which cameras
see whom, and every image.

Modules: ``spec`` (sizes, style, presets), ``identities``, ``cameras`` (scenes), ``person`` and ``effects`` (pure
renderers), ``render`` (one image), ``plan`` (the files of a domain), ``writer`` (JPEG files), ``pool`` (worker
processes) and ``cache`` (folders, markers, atomic publication). None of them imports torch.
"""

from dgnetpp_pl.data.synthetic.cache import (
    MARKER,
    generate_domain,
    generate_domains,
    make_synthetic_pair,
    read_marker,
    spec_digest,
    synthetic_domain_dir,
)
from dgnetpp_pl.data.synthetic.identities import Identity, make_identity
from dgnetpp_pl.data.synthetic.render import GENERATOR_VERSION, render_image
from dgnetpp_pl.data.synthetic.spec import SMALL_SIZES, SOURCE_STYLE, TARGET_STYLE, SyntheticDomainSpec

__all__ = [
    "GENERATOR_VERSION",
    "MARKER",
    "SMALL_SIZES",
    "SOURCE_STYLE",
    "TARGET_STYLE",
    "Identity",
    "SyntheticDomainSpec",
    "generate_domain",
    "generate_domains",
    "make_identity",
    "make_synthetic_pair",
    "read_marker",
    "render_image",
    "spec_digest",
    "synthetic_domain_dir",
]
