"""Measuring sharpness: Hessian spectrum, sharpness notions and loss landscapes.

Every function takes ``(model, loss_fn, data, ...)`` with ``data`` an iterable of
``(inputs, targets)`` batches and ``loss_fn(model(inputs), targets)`` the batch's unreduced
losses (batch first, ``reduction="none"``) or their mean, reduced like ``make_closure`` does;
results are averaged over batches with batch-size weights (m-sharpness for batches of size m).
Models run in eval mode by default and are left exactly as they were. See ``docs/sharpness.md``.

Under ``torch.distributed`` every measure is over the union of every process's batches and
returns the same result on every process (``distributed=False``: this process's batches);
parameters sharded with FSDP2 are measured shard by shard. Call a measure on every process
and write its result from the one where :func:`is_writer` is true.
"""

from ._distributed import (
    PeerError,
    collective_timeout,
    is_writer,
    set_collective_timeout,
    shard_batches,
)
from .blocks import BlockRow, BlockTable, block_table, default_blocks
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
    "BlockRow",
    "BlockTable",
    "PeerError",
    "EigenResult",
    "Landscape1D",
    "Landscape2D",
    "SharpnessResult",
    "SpectralDensity",
    "TraceResult",
    "ascent_direction_sharpness",
    "average_direction_sharpness",
    "block_table",
    "collective_timeout",
    "default_blocks",
    "density_on_grid",
    "gradient",
    "gradient_eigenvector_alignment",
    "hessian_trace",
    "hvp",
    "interpolate",
    "is_writer",
    "landscape_1d",
    "landscape_2d",
    "measure_all",
    "min_sharpness",
    "plot_landscape_1d",
    "plot_landscape_2d",
    "random_directions",
    "set_collective_timeout",
    "shard_batches",
    "spectral_density",
    "top_eigenvalues",
    "worst_direction_sharpness",
]
