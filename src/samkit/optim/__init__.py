"""Sharpness-aware optimizers: a shared base, one module per method family, a registry."""

from samkit.optim._trajectory import RepeatedSampleWarning
from samkit.optim.ausam import AUSAM
from samkit.optim.base import (
    BASE_OPTIMIZERS,
    NonFiniteError,
    SharpnessAwareOptimizer,
    resolve_base_optimizer,
)
from samkit.optim.batchnorm import frozen_bn_stats
from samkit.optim.bsam import BilateralSAM
from samkit.optim.closure import BatchClosure, make_closure
from samkit.optim.esam import ESAM
from samkit.optim.fsam import FriendlySAM
from samkit.optim.gsam import GSAM
from samkit.optim.looksam import LookSAM
from samkit.optim.mesa import MESA
from samkit.optim.msam import MicroBatchSAM
from samkit.optim.registry import (
    OptimizerInfo,
    create_optimizer,
    get_optimizer_info,
    is_sharpness_aware,
    list_optimizers,
    register,
    registered,
    unregister,
)
from samkit.optim.saf import SAF
from samkit.optim.sam import ASAM, SAM
from samkit.optim.ssam import SSAM

__all__ = [
    "ASAM",
    "AUSAM",
    "ESAM",
    "BASE_OPTIMIZERS",
    "BatchClosure",
    "BilateralSAM",
    "FriendlySAM",
    "GSAM",
    "LookSAM",
    "MicroBatchSAM",
    "MESA",
    "NonFiniteError",
    "OptimizerInfo",
    "RepeatedSampleWarning",
    "SAF",
    "SAM",
    "SSAM",
    "SharpnessAwareOptimizer",
    "create_optimizer",
    "frozen_bn_stats",
    "get_optimizer_info",
    "is_sharpness_aware",
    "list_optimizers",
    "make_closure",
    "register",
    "registered",
    "resolve_base_optimizer",
    "unregister",
]
