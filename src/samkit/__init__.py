"""samkit: sharpness-aware training for PyTorch.

The optimizers and their protocol are re-exported here; measurements live in
:mod:`samkit.sharpness`, training in :mod:`samkit.train`, sweeps in :mod:`samkit.bench`.
"""

from samkit.optim import (
    ASAM,
    AUSAM,
    ESAM,
    GSAM,
    MESA,
    SAF,
    SAM,
    SSAM,
    BatchClosure,
    BilateralSAM,
    FriendlySAM,
    LookSAM,
    MicroBatchSAM,
    NonFiniteError,
    OptimizerInfo,
    RepeatedSampleWarning,
    SharpnessAwareOptimizer,
    create_optimizer,
    frozen_bn_stats,
    get_optimizer_info,
    list_optimizers,
    make_closure,
    register,
)

__version__ = "0.1.0"

__all__ = [
    "ASAM",
    "AUSAM",
    "ESAM",
    "MESA",
    "SAF",
    "SAM",
    "SSAM",
    "BatchClosure",
    "BilateralSAM",
    "FriendlySAM",
    "GSAM",
    "LookSAM",
    "MicroBatchSAM",
    "NonFiniteError",
    "OptimizerInfo",
    "RepeatedSampleWarning",
    "SharpnessAwareOptimizer",
    "__version__",
    "create_optimizer",
    "frozen_bn_stats",
    "get_optimizer_info",
    "list_optimizers",
    "make_closure",
    "register",
]
