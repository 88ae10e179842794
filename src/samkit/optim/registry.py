"""The optimizer registry: ``create_optimizer(name, params, ...)`` and ``list_optimizers()``.

A method is one :func:`register` call at the end of this module; the registry is what the
CLI, the benchmarks and the registry-parametrised tests iterate over. :func:`registered`
adds a method for the duration of a ``with`` block (an experiment, a test) and leaves the
registry as it was; :func:`unregister` removes one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Iterable, Iterator
from typing import Any

from torch.optim import Optimizer

from samkit.optim.ausam import AUSAM
from samkit.optim.base import BASE_OPTIMIZERS, SharpnessAwareOptimizer, resolve_base_optimizer
from samkit.optim.bsam import BilateralSAM
from samkit.optim.esam import ESAM
from samkit.optim.fsam import FriendlySAM
from samkit.optim.gsam import GSAM
from samkit.optim.looksam import LookSAM
from samkit.optim.mesa import MESA
from samkit.optim.msam import MicroBatchSAM
from samkit.optim.saf import SAF
from samkit.optim.sam import ASAM, SAM
from samkit.optim.search import SearchDim
from samkit.optim.ssam import SSAM

__all__ = [
    "OptimizerInfo",
    "register",
    "registered",
    "unregister",
    "create_optimizer",
    "list_optimizers",
    "get_optimizer_info",
]


@dataclasses.dataclass(frozen=True)
class OptimizerInfo:
    """What the registry knows about one optimizer name.

    A registered name builds exactly its class: the class's keyword defaults are the paper's
    values and the only defaults samkit has (:attr:`hyperparameters` lists them). Values
    tuned for a task live in recipes (``samkit train --recipe``), never here.

    Attributes:
        name: registry name (lower case).
        cls: the optimizer class; for plain baselines, the torch class.
        description: one line for ``samkit list`` and the docs.
        sharpness_aware: False for the plain baselines (``sgd``, ``adamw``).
        passes: forward+backward passes per step, on average (for planning an equal budget;
            reports use the passes each run measured).
        needs_batch_closure: the method needs a :class:`~samkit.BatchClosure` (per-sample
            losses, sub-batches or sample indices) rather than a plain closure.
        reference: the paper.
        search_space: the ranges a tuning study draws this optimizer's hyperparameters from
            (:class:`~samkit.optim.search.SearchDim`): a sharpness-aware method's own (a method
            over a base optimizer also gets the base's, e.g. its learning rate); a plain
            optimizer's, its own settings. Each name must be a keyword argument of ``cls``.
    """

    name: str
    cls: type[Optimizer]
    description: str
    sharpness_aware: bool = True
    passes: float = 2.0
    needs_batch_closure: bool = False
    reference: str = ""
    search_space: tuple[SearchDim, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "search_space", tuple(self.search_space))
        takes = _init_keywords(self.cls)
        seen: set[str] = set()
        for dim in self.search_space:
            if not isinstance(dim, SearchDim):
                raise TypeError(f"optimizer {self.name!r}: search space entry {dim!r} is not a SearchDim")  # fmt: skip
            if dim.name not in takes or dim.name in seen:
                why = "twice" if dim.name in seen else f"not an argument of {self.cls.__name__}"
                raise ValueError(f"optimizer {self.name!r}: search space names {dim.name!r} {why}")  # fmt: skip
            seen.add(dim.name)

    @property
    def hyperparameters(self) -> dict[str, Any]:
        """The method's own keyword arguments and their defaults, read from the signature of
        ``cls.__init__`` (e.g. ``{"rho": 0.05, "sigma": 1.0, "lmbda": 0.6, ...}`` for F-SAM);
        empty for the plain baselines, whose settings are the base optimizer's."""
        if not self.sharpness_aware:
            return {}
        try:
            params = inspect.signature(self.cls.__init__).parameters.values()
        except (TypeError, ValueError):
            return {}
        return {
            p.name: p.default
            for p in params
            if p.default is not inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and p.name not in _NOT_HYPERPARAMETERS
        }

    @property
    def implementation_switches(self) -> frozenset[str]:
        """Keyword arguments that choose how the method is computed, not what (the class's
        ``implementation_switches``: mSAM's ``vectorize``, SAF's bank storage). They are in
        :attr:`hyperparameters` (a run records them) but not in tables of its settings."""
        return frozenset(getattr(self.cls, "implementation_switches", ()))


#: Constructor arguments of a sharpness-aware class that are not its method's settings.
_NOT_HYPERPARAMETERS = frozenset(
    {"base_optimizer", "defaults", "model", "foreach", "on_nonfinite", "sync_ascent", "perturb_eps"}
)


def _init_keywords(cls: type) -> set[str]:
    """Keyword arguments of ``cls.__init__`` (what a search space may name)."""
    try:
        params = inspect.signature(cls.__init__).parameters.values()
    except (TypeError, ValueError):
        return set()
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


_REGISTRY: dict[str, OptimizerInfo] = {}


def register(info: OptimizerInfo) -> OptimizerInfo:
    """Add ``info`` to the registry (``ValueError`` if the name is taken)."""
    key = info.name.lower()
    if key in _REGISTRY:
        raise ValueError(f"optimizer name {info.name!r} is already registered")
    _REGISTRY[key] = info
    return info


def unregister(name: str) -> OptimizerInfo:
    """Remove ``name`` from the registry and return its entry (``ValueError`` if unknown)."""
    info = get_optimizer_info(name)
    del _REGISTRY[info.name.lower()]
    return info


@contextlib.contextmanager
def registered(info: OptimizerInfo) -> Iterator[OptimizerInfo]:
    """``info`` registered inside the ``with`` block, removed afterwards (also on an error)::

    with samkit.optim.registered(OptimizerInfo(name="mysam", cls=MySAM, description="...")):
        opt = samkit.create_optimizer("mysam", model.parameters(), lr=0.1)
    """
    register(info)
    try:
        yield info
    finally:
        _REGISTRY.pop(info.name.lower(), None)


def list_optimizers(sharpness_aware: bool | None = None) -> list[str]:
    """Registered names, sorted; ``sharpness_aware=True/False`` filters."""
    return sorted(
        name
        for name, info in _REGISTRY.items()
        if sharpness_aware is None or info.sharpness_aware == sharpness_aware
    )


def get_optimizer_info(name: str) -> OptimizerInfo:
    """The :class:`OptimizerInfo` of ``name`` (``ValueError`` listing the names if unknown)."""
    if not isinstance(name, str):
        raise TypeError(f"optimizer name must be a string, got {type(name).__name__}")
    key = name.lower()
    if key not in _REGISTRY:
        raise ValueError(f"Unknown optimizer {name!r}; available: {', '.join(list_optimizers())}")
    return _REGISTRY[key]


def create_optimizer(
    name: str, params: Iterable[Any], base: Any = "sgd", **kwargs: Any
) -> Optimizer:
    """Build an optimizer by name.

    ``create_optimizer("sam", model.parameters(), base="sgd", lr=0.1, momentum=0.9, rho=0.05)``
    wraps SGD in SAM; ``create_optimizer("sgd", ...)`` and ``"adamw"`` return the plain
    torch optimizers (``base`` is then ignored). Keyword arguments go to the method (its
    hyperparameters and samkit options such as ``model``) and on to the base optimizer.
    What the caller leaves out takes the class's default: ``create_optimizer("asam", ...)``
    is ``samkit.ASAM(...)``.
    """
    info = get_optimizer_info(name)
    merged = dict(kwargs)
    if not info.sharpness_aware:
        for key in ("model", "rho"):
            merged.pop(key, None)
        return info.cls(params, **merged)
    resolve_base_optimizer(base)  # clear error before anything is built
    return info.cls(params, base, **merged)


def _plain(name: str, description: str, *space: SearchDim) -> OptimizerInfo:
    return OptimizerInfo(
        name=name,
        cls=BASE_OPTIMIZERS[name],
        description=description,
        sharpness_aware=False,
        passes=1.0,
        search_space=space,
    )


# ---------------------------------------------------------------------------- search ranges
# Declared once per method, with where each range comes from (docs/recipes.md shows them).


def _rho(low: float = 0.01, high: float = 0.5, source: str = "") -> SearchDim:
    """A radius, log-uniform; by default SAM's grid (Foret et al. 2021 searched rho in
    {0.01, 0.02, 0.05, 0.1, 0.2, 0.5})."""
    return SearchDim("rho", low, high, "log", source=source or _SAM_GRID)


_SAM_GRID = "the range of SAM's grid (Foret et al. 2021: 0.01 to 0.5)"


def is_sharpness_aware(opt: Optimizer) -> bool:
    """Whether ``opt`` is one of samkit's sharpness-aware optimizers."""
    return isinstance(opt, SharpnessAwareOptimizer)


# ---------------------------------------------------------------------------- built-ins
# One entry per method: a new method is one module plus one register(...) call here.
register(
    _plain(
        "sgd",
        "plain SGD (torch.optim.SGD), the one-pass baseline",
        SearchDim(
            "lr", 0.005, 0.5, "log", source="two decades around the recipes' 0.05 (CIFAR: 0.1)"
        ),
    )
)
register(
    _plain(
        "adamw",
        "plain AdamW (torch.optim.AdamW), the one-pass baseline",
        SearchDim(
            "lr",
            3e-4,
            3e-2,
            "log",
            source="two decades around the recipes' 0.003 (MNIST-1D); modular-add's 0.01 inside",
        ),
    )
)
register(
    OptimizerInfo(
        name="sam",
        cls=SAM,
        description="SAM: ascent step of radius rho along the gradient, update from there",
        reference="Foret et al., ICLR 2021",
        search_space=(_rho(),),
    )
)
register(
    OptimizerInfo(
        name="asam",
        cls=ASAM,
        description="ASAM: SAM in a neighbourhood scaled by |w| + eta (scale invariant)",
        reference="Kwon et al., ICML 2021",
        search_space=(
            _rho(
                0.05, 5.0, "a decade either side of the official 0.5 (CIFAR-10) and 1.0 (CIFAR-100)"
            ),
            SearchDim("eta", 1e-3, 0.1, "log", source="a decade either side of the official 0.01"),
        ),
    )
)
register(
    OptimizerInfo(
        name="fsam",
        cls=FriendlySAM,
        description="F-SAM: SAM along g minus an EMA of past gradients (the batch-specific part)",
        passes=2.0,
        reference="Li et al., Friendly Sharpness-Aware Minimization, CVPR 2024",
        search_space=(
            _rho(),
            SearchDim("sigma", 0.25, 1.0, source="up to the paper's 1 (sigma 0 is SAM)"),
            SearchDim(
                "lmbda",
                0.3,
                0.95,
                source="around the official 0.6 (CIFAR-100 recipe), 0.9 (class) and 0.95 (run.sh)",
            ),
        ),
    )
)
register(
    OptimizerInfo(
        name="bsam",
        cls=BilateralSAM,
        description="Bilateral SAM: SAM's max point plus a min point along -g, three passes",
        passes=3.0,
        reference="Deng et al., Bilateral Sharpness-Aware Minimization for Flatter Minima, 2024",
        search_space=(
            _rho(),
            SearchDim(
                "rho_min",
                0.01,
                0.5,
                "log",
                source="the range of rho (the paper's rho_min is its rho, 0.05)",
            ),
        ),
    )
)
register(
    OptimizerInfo(
        name="esam",
        cls=ESAM,
        description="ESAM: SAM perturbing a random beta of the tensors, descending on the "
        "gamma of the batch whose loss rose most",
        # Measured by benchmarks/method_cost.py (BatchClosure counts, forward = 1/3 and
        # backward = 2/3 of a pass): forwards 1 + 1 + gamma, backwards 1 + gamma at gamma 0.5.
        passes=1.83,
        needs_batch_closure=True,
        reference="Du et al., Efficient Sharpness-aware Minimization, ICLR 2022",
        search_space=(
            _rho(),
            SearchDim(
                "beta",
                0.3,
                1.0,
                source="around the paper's 0.5 (WRN) and 0.6 (ResNet-18); 1 perturbs every tensor",
            ),
            SearchDim(
                "gamma",
                0.3,
                1.0,
                source="around the paper's 0.5; 1 keeps every sample (docs/methods/esam.md)",
            ),
        ),
    )
)
register(
    OptimizerInfo(
        name="looksam",
        cls=LookSAM,
        description="LookSAM: SAM every k steps, reusing its orthogonal part in between (1+1/k passes)",
        passes=1.2,  # 1 + 1/k with the class default k=5
        reference="Liu et al., Towards Efficient and Scalable Sharpness-Aware Minimization, CVPR 2022",
        # k sets the cost (1 + 1/k passes): fixed, so every trial costs the same.
        search_space=(
            _rho(),
            SearchDim(
                "alpha",
                0.03,
                1.0,
                "log",
                source="from below the embedded recipes' 0.1 to above the paper's 0.7",
            ),
        ),
    )
)
register(
    OptimizerInfo(
        name="ausam",
        cls=AUSAM,
        description="AUSAM: SAM's two passes on a subset of each batch sampled by each "
        "sample's average loss rise under the perturbation",
        # Measured by benchmarks/method_cost.py: two passes on half of the batch.
        passes=1.0,
        needs_batch_closure=True,
        reference="Deng, Pang, Zhang, Asymptotic Unbiased Sample Sampling to Speed Up SAM, "
        "AAAI 2025",
        # fraction sets the cost: fixed, so every trial costs the same.
        search_space=(
            _rho(),
            SearchDim(
                "max_ratio",
                1.0,
                8.0,
                "log",
                source="around the default 4 (1: uniform sampling, docs/methods/ausam.md)",
            ),
        ),
    )
)
register(
    OptimizerInfo(
        name="saf",
        cls=SAF,
        description="SAF: one pass + KL to each sample's logits from `horizon` epochs ago (bank)",
        passes=1.0,
        needs_batch_closure=True,  # dataset indices
        reference="Du et al., Sharpness-Aware Training for Free, NeurIPS 2022",
        search_space=(
            SearchDim(
                "lmbda",
                0.03,
                1.0,
                "log",
                source="around the official code's 0.16 (argparse) and 0.3 (README); 1 and above collapse (docs/methods/saf.md)",
            ),
        ),
    )
)
register(
    OptimizerInfo(
        name="gsam",
        cls=GSAM,
        description="GSAM: SAM's gradient minus alpha times the clean gradient's orthogonal part",
        passes=2.0,
        reference="Zhuang et al., Surrogate Gap Minimization Improves Sharpness-Aware Training, "
        "ICLR 2022",
        search_space=(
            _rho(),
            SearchDim(
                "alpha",
                0.0,
                0.8,
                source="from 0 (SAM with GSAM's radius schedule) to twice the CIFAR example's 0.4",
            ),
        ),
    )
)
register(
    OptimizerInfo(
        name="mesa",
        cls=MESA,
        description="MESA: one pass + KL to the outputs of an EMA of the weights (+1 forward)",
        passes=4.0 / 3.0,  # forward = 1/3 of a pass: the averaged model's forward
        needs_batch_closure=True,  # the batch's inputs for the averaged model
        reference="Du et al., Sharpness-Aware Training for Free, NeurIPS 2022",
        search_space=(
            SearchDim(
                "lmbda",
                0.03,
                1.0,
                "log",
                source="around the official README's 0.8 and the embedded recipes' 0.3",
            ),
            SearchDim.choice(
                "decay",
                (0.99, 0.995, 0.998, 0.999, 0.9998),
                source="averaging horizons of 100 to 5,000 steps: the runs here take 500 to 2,000 steps, timm's 0.9998 was set for ImageNet's",
            ),
        ),
    )
)
register(
    OptimizerInfo(
        name="msam",
        cls=MicroBatchSAM,
        description="mSAM: SAM on each of M micro-batches with its own perturbation, averaged",
        passes=2.0,
        needs_batch_closure=True,
        reference="Behdin et al., mSAM: Micro-Batch-Averaged Sharpness-Aware Minimization, 2023",
        search_space=(_rho(),),
    )
)
register(
    OptimizerInfo(
        name="ssam",
        cls=SSAM,
        description="Sparse SAM: SAM's perturbation on a Fisher (or dynamic) mask of coordinates",
        passes=2.0,
        needs_batch_closure=True,  # per-sample gradients of the Fisher mask
        reference="Mi et al., Make Sharpness-Aware Minimization Stronger, NeurIPS 2022",
        search_space=(
            _rho(),
            SearchDim("sparsity", 0.5, 0.99, source="the official runs' 0.5 to 0.99"),
        ),
    )
)
