"""The curvature operators by name: the one table every front door resolves names through.

Each operator has one canonical name, the ``name`` its instances carry (what the seed
API reports as ``operator_used``), a short name (what the command line and the
validation reports use) and aliases:

* ``hessian``: :class:`~curvops.linops.curvature.HessianOperator`;
* ``ggn`` (alias ``fisher``): :class:`~curvops.linops.curvature.GGNOperator`, the exact
  Fisher for the supported losses;
* ``empirical_fisher`` (short ``ef``):
  :class:`~curvops.linops.curvature.EmpiricalFisherOperator`;
* ``fisher_mc``: :class:`~curvops.linops.curvature.FisherOperator` with ``mode="mc"``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch import nn

from . import curvature
from .curvature import CurvatureOperator

__all__ = [
    "OPERATORS",
    "SHORT_NAMES",
    "OperatorSpec",
    "make_operator",
    "operator_names",
    "operator_spec",
]


@dataclass(frozen=True)
class OperatorSpec:
    """One named curvature operator.

    Attributes:
        name: The canonical name (the operator's own ``name``).
        short: The name the command line and the validation use.
        cls: The operator class.
        kwargs: Keyword arguments the name fixes (``{"mode": "mc"}`` for ``fisher_mc``).
        aliases: Other names accepted for it.
    """

    name: str
    short: str
    cls: type[CurvatureOperator]
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """Every name that selects this operator: canonical, short, aliases."""
        return tuple(dict.fromkeys((self.name, self.short, *self.aliases)))

    def build(
        self,
        model: nn.Module,
        loss_fn: Any,
        data: Any,
        params: Sequence[nn.Parameter | str] | None = None,
        **kwargs: Any,
    ) -> CurvatureOperator:
        """The operator on ``model``, ``loss_fn`` and ``data``; ``kwargs`` go to its class.

        Raises:
            TypeError: For a keyword the name already fixes (``mode`` of ``fisher_mc``).
        """
        return self.cls(model, loss_fn, data, params, **self.kwargs, **kwargs)


def _spec(
    name: str,
    short: str,
    cls: type[CurvatureOperator],
    aliases: tuple[str, ...] = (),
    **kwargs: Any,
) -> OperatorSpec:
    return OperatorSpec(name, short, cls, MappingProxyType(kwargs), aliases)


#: Canonical name -> operator, in the order the command line and reports list them.
OPERATORS: Mapping[str, OperatorSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            _spec("hessian", "hessian", curvature.HessianOperator),
            _spec("ggn", "ggn", curvature.GGNOperator, aliases=("fisher",)),
            _spec("empirical_fisher", "ef", curvature.EmpiricalFisherOperator),
            _spec("fisher_mc", "fisher_mc", curvature.FisherOperator, mode="mc"),
        )
    }
)

#: The short names, in :data:`OPERATORS` order (the command line's choices).
SHORT_NAMES: tuple[str, ...] = tuple(spec.short for spec in OPERATORS.values())

_BY_NAME: dict[str, OperatorSpec] = {
    name: spec for spec in OPERATORS.values() for name in spec.names
}


def operator_names() -> tuple[str, ...]:
    """Every accepted name: canonical names, short names and aliases."""
    return tuple(_BY_NAME)


def operator_spec(name: str, *, argument: str = "operator") -> OperatorSpec:
    """The operator a name (canonical, short or alias) selects.

    Args:
        name: The name.
        argument: What the name was passed as, for the message (``"operator_type"``).

    Raises:
        ValueError: For a name no operator has; the message lists the accepted ones.
    """
    spec = _BY_NAME.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(
            f"unknown {argument} {name!r}; choose from {', '.join(operator_names())}"
        )
    return spec


def make_operator(
    name: str,
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    params: Sequence[nn.Parameter | str] | None = None,
    **kwargs: Any,
) -> CurvatureOperator:
    """The curvature operator ``name`` selects (see :data:`OPERATORS`), built.

    Args:
        name: A canonical name, short name or alias.
        model: The network.
        loss_fn: The loss or objective.
        data: The data.
        params: The parameter selection.
        **kwargs: Further keyword arguments of the operator class.

    Raises:
        ValueError: For an unknown name (before anything is built).
    """
    return operator_spec(name).build(model, loss_fn, data, params, **kwargs)
