"""Block-wise Hessian measures: λ₁, trace and spectral density of diagonal blocks ``H_BB``
(one module's or parameter group's parameters), for several blocks in one call.

The block ``H_BB`` is the Hessian of the loss with respect to the block's parameters, the
others held fixed: its eigenvalues are those of the layer-wise (block-diagonal) Hessian used
to study, for example, transformer Hessians layer by layer. Every measure of
:mod:`samkit.sharpness.hessian` takes ``params=`` for one block; :func:`block_table` runs
them for many.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._utils import LossFn, check_choice, check_module, select_params, unwrap
from .hessian import SpectralDensity, hessian_trace, spectral_density, top_eigenvalues

__all__ = ["BlockRow", "BlockTable", "block_table", "default_blocks"]

_BLOCK_MEASURES = ("lambda_max", "trace", "density")


@dataclass
class BlockRow:
    """One block's measures (``None`` where not requested)."""

    name: str
    num_params: int
    lambda_max: float | None = None
    lambda_max_converged: bool | None = None
    trace: float | None = None
    trace_std_error: float | None = None
    density: SpectralDensity | None = None
    num_hvp: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "num_params": int(self.num_params),
            "lambda_max": self.lambda_max,
            "lambda_max_converged": self.lambda_max_converged,
            "trace": self.trace,
            "trace_std_error": self.trace_std_error,
            "density": None if self.density is None else self.density.to_dict(),
            "num_hvp": int(self.num_hvp),
        }


@dataclass
class BlockTable:
    """The rows of :func:`block_table`, in the order of the blocks."""

    rows: list[BlockRow]

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [r.to_dict() for r in self.rows]}

    def format(self) -> str:
        """A markdown table: block, parameters, λ₁, trace ± standard error, HVPs."""
        lines = ["| block | parameters | λ₁ | trace | HVPs |", "|---|---|---|---|---|"]
        for r in self.rows:
            lam = "—" if r.lambda_max is None else f"{r.lambda_max:.6g}"
            if r.trace is None:
                tr = "—"
            elif r.trace_std_error is None or math.isnan(r.trace_std_error):
                tr = f"{r.trace:.6g}"
            else:
                tr = f"{r.trace:.6g} ± {r.trace_std_error:.2g}"
            lines.append(f"| {r.name} | {r.num_params:,} | {lam} | {tr} | {r.num_hvp} |")
        return "\n".join(lines)


def default_blocks(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """One block per module that owns parameters requiring grad (its own, not its
    children's), named by the module's name (``"(root)"`` for the model itself)."""
    model = unwrap(check_module(model))
    out: dict[str, list[torch.Tensor]] = {}
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if own:
            out[name or "(root)"] = own
    if not out:
        raise ValueError("model has no parameter with requires_grad=True: nothing to measure")
    return out


def _blocks(model: nn.Module, blocks: Any) -> list[tuple[str, Any]]:
    if blocks is None:
        return list(default_blocks(model).items())
    if isinstance(blocks, Mapping):
        return [(str(k), v) for k, v in blocks.items()]
    if isinstance(blocks, (str, nn.Module, torch.Tensor)) or not isinstance(blocks, Sequence):
        raise TypeError(
            "blocks must be None (one per module with parameters), a list of blocks (module "
            "or parameter names, submodules, lists of parameters) or a dict {name: block}, "
            f"got {type(blocks).__name__}"
        )
    if not blocks:
        raise ValueError("blocks is empty: give at least one block")
    named = {id(m): n for n, m in unwrap(model).named_modules()}
    out = []
    for i, spec in enumerate(blocks):
        if isinstance(spec, str):
            name = spec or "(root)"
        elif isinstance(spec, nn.Module):
            name = named.get(id(spec), f"block {i}") or "(root)"
        else:
            name = f"block {i}"
        out.append((name, spec))
    return out


def block_table(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    blocks: Any = None,
    *,
    measures: Sequence[str] = ("lambda_max", "trace"),
    lanczos_iter: int = 100,
    tol: float = 1e-3,
    max_vectors: int | None = None,
    trace_samples: int = 30,
    trace_method: str | None = None,
    density_runs: int = 1,
    density_iter: int = 50,
    seed: int = 0,
    train_mode: bool = False,
    reuse_graph: bool | None = None,
    distributed: Any = None,
) -> BlockTable:
    """λ₁, trace and spectral density of each block's Hessian ``H_BB``, in one call.

    ``blocks``: ``None`` — one block per module owning parameters that require grad (e.g. each
    ``Linear``/``Conv`` layer, named by its module name; see :func:`default_blocks`); a list —
    each item a ``params=`` selection (a module or parameter name, a submodule, a list of
    parameters, an optimizer parameter group), named by the name or module name; a dict
    ``{name: selection}``. ``measures``: any of ``"lambda_max"`` (Lanczos,
    :func:`~samkit.sharpness.top_eigenvalues` with ``lanczos_iter``, ``tol``, ``max_vectors``),
    ``"trace"`` (:func:`~samkit.sharpness.hessian_trace` with ``trace_samples`` HVPs and
    ``trace_method``), ``"density"`` (:func:`~samkit.sharpness.spectral_density` with
    ``density_runs`` × ``density_iter``). Each block is measured separately (its HVPs are
    products with ``H_BB``), with the same ``seed``. ``distributed``: see
    :func:`~samkit.sharpness.top_eigenvalues`.

    Returns a :class:`BlockTable` (``rows``, ``to_dict()``, ``format()`` as markdown).
    """
    if isinstance(measures, str):
        raise TypeError("measures must be a sequence of names, not a str")
    chosen = [check_choice("measure", m, _BLOCK_MEASURES) for m in measures]
    if not chosen:
        raise ValueError(f"measures is empty: choose from {list(_BLOCK_MEASURES)}")
    rows = []
    for name, spec in _blocks(model, blocks):
        _, params = select_params(unwrap(check_module(model)), spec)
        row = BlockRow(name, sum(p.numel() for p in params))
        common = dict(
            seed=seed, train_mode=train_mode, reuse_graph=reuse_graph, params=spec,
            distributed=distributed,
        )  # fmt: skip
        if "lambda_max" in chosen:
            eig = top_eigenvalues(
                model, loss_fn, data, 1, max_iter=lanczos_iter, tol=tol,
                max_vectors=max_vectors, **common,
            )  # fmt: skip
            row.lambda_max, row.lambda_max_converged = eig.eigenvalues[0], eig.converged
            row.num_hvp += eig.num_hvp
        if "trace" in chosen:
            tr = hessian_trace(model, loss_fn, data, trace_samples, method=trace_method, **common)
            row.trace = tr.trace
            row.trace_std_error = None if math.isnan(tr.std_error) else tr.std_error
            row.num_hvp += tr.num_samples
        if "density" in chosen:
            row.density = spectral_density(
                model, loss_fn, data, density_runs, density_iter, **common
            )
            row.num_hvp += row.density.num_hvp
        rows.append(row)
    return BlockTable(rows)
