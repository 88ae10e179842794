"""Measuring sharpness: Hessian spectrum, sharpness notions and loss landscapes.

Every function takes ``(model, loss_fn, data, ...)`` with ``data`` an iterable of
``(inputs, targets)`` batches and ``loss_fn(model(inputs), targets)`` the batch's unreduced
losses (batch first, ``reduction="none"``) or their mean, reduced like ``make_closure`` does;
results are averaged over batches with batch-size weights (m-sharpness for batches of size m).
Models run in eval mode by default and are left exactly as they were. See ``docs/sharpness.md``.
"""

from .hessian import (
    EigenResult,
    SpectralDensity,
    TraceResult,
    density_on_grid,
    gradient,
    hessian_trace,
    hvp,
    spectral_density,
    top_eigenvalues,
)
from .landscape import (
    Landscape1D,
    Landscape2D,
    interpolate,
    landscape_1d,
    landscape_2d,
    plot_landscape_1d,
    plot_landscape_2d,
    random_directions,
)
from .notions import (
    AlignmentResult,
    SharpnessResult,
    ascent_direction_sharpness,
    average_direction_sharpness,
    gradient_eigenvector_alignment,
    measure_all,
    min_sharpness,
    worst_direction_sharpness,
)

__all__ = [
    "AlignmentResult",
    "EigenResult",
    "Landscape1D",
    "Landscape2D",
    "SharpnessResult",
    "SpectralDensity",
    "TraceResult",
    "ascent_direction_sharpness",
    "average_direction_sharpness",
    "density_on_grid",
    "gradient",
    "gradient_eigenvector_alignment",
    "hessian_trace",
    "hvp",
    "interpolate",
    "landscape_1d",
    "landscape_2d",
    "measure_all",
    "min_sharpness",
    "plot_landscape_1d",
    "plot_landscape_2d",
    "random_directions",
    "spectral_density",
    "top_eigenvalues",
    "worst_direction_sharpness",
]
