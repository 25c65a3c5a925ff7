r"""What every operator built from a model, a loss and data sets up first.

The curvature operators (:mod:`curvops.linops.curvature`) and the Gram operator
(:mod:`curvops.linops.gram`) are both about the total loss
:math:`L(\theta) = c \sum_n \ell_n(\theta)` of a model over a data set. Both take
``model, loss_fn, data, params`` and make the same checks before any product:
:class:`EmpiricalRisk` holds them, so they are made once and the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from .checks import check_finite_parameters, check_materialized, check_no_train_mode_batchnorm
from .data import DataFingerprint, DataSource, survey_data
from .objective import Count, Objective, as_objective
from .params import ParameterSpace, model_dtype, select_parameters

__all__ = ["EmpiricalRisk"]


class EmpiricalRisk:
    """A model's loss over a data set, checked (a mixin of the operators built from one).

    Attributes:
        model: The network.
        objective: The objective (loss, normalisation, sample unit).
        params: The selected parameters, in flat order.
        space: Their flat parameter space.
        data: The data, as a replayable source.
        total: Examples and loss terms over the whole data (after :meth:`_survey`).
        normalizer: The factor ``c`` of the total loss (after :meth:`_survey`).
    """

    model: nn.Module
    objective: Objective
    params: list[Tensor]
    space: ParameterSpace
    data: DataSource
    total: Count
    normalizer: float

    def _set_up_risk(
        self,
        model: nn.Module,
        loss_fn: Any,
        data: Any,
        params: Sequence[nn.Parameter | str] | None,
    ) -> None:
        """Check the model, select the parameters, wrap the loss and the data.

        No pass over the data and no forward pass yet.

        Raises:
            TypeError: For a model that is not an ``nn.Module``, an unsupported loss or a
                parameter of a non-floating dtype.
            ValueError: For a model on the meta device, NaN/Inf parameters, BatchNorm in
                train mode, an empty selection, or data that cannot be replayed.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_materialized(model)
        self.model = model
        self.objective = as_objective(loss_fn)
        names, tensors = select_parameters(model, params)
        self.params = tensors
        self.space = ParameterSpace.from_parameters(names, tensors)
        check_finite_parameters(names, tensors)
        check_no_train_mode_batchnorm(model)
        self.data = DataSource(data)

    def _survey(self, fingerprint: DataFingerprint | None = None) -> None:
        """One pass over the data without forward passes: count it, refuse bad batches.

        Sets :attr:`total` and :attr:`normalizer` (see
        :func:`~curvops.linops.data.survey_data`).

        Args:
            fingerprint: Summarises the pass too, if given.
        """
        self.total = survey_data(self.data, self.objective, model_dtype(self.model), fingerprint)
        self.normalizer = self.objective.normalizer(self.total)
