r"""How exact an operator's products are, measured from a Lanczos run's own products.

No operator is exact to its dtype: a float64 model with float32 normalisation layers, a
bf16 model, autocast, TF32 or non-deterministic reductions all return :math:`\tilde A v =
Av + f(v)` with an error :math:`f` far above the dtype's epsilon. Lanczos reads that error
off two products it already has. With :math:`u_j = \tilde A v_j`,

.. math::

    d_j = v_{j-1}^\top u_j - v_j^\top u_{j-1}
        = v_{j-1}^\top f(v_j) - v_j^\top f(v_{j-1})

(the exact parts cancel by symmetry): two dot products per iteration, no extra product.
:math:`d_j` is exactly the rounding term of Simon's :math:`\omega`-recurrence (the
projection of one step's error onto another Lanczos vector), and copies of a converged
eigenvalue in :math:`T_m` drift apart by multiples of it, so it is the right measure for
every threshold of the process. It is blind to a symmetric *linear* perturbation (which is
then simply the operator), and a non-symmetric operator shows
:math:`|d_j| \sim \|A\|` at once.
"""

from __future__ import annotations

from ._as_operator import NonSymmetricOperatorError

__all__ = ["AccuracyMonitor"]


class AccuracyMonitor:
    r"""The process precision :math:`\varepsilon_A` of a Lanczos run, updated as it goes.

    :math:`\varepsilon_A = \max(\varepsilon_{\text{basis}}, \varepsilon_{\text{op}},
    \nu)` with :math:`\nu = \max_j |d_j| / \|T_j\|`: never below what the dtypes (or a
    user's ``operator_eps``) say, raised to what the products deliver.

    Args:
        eps_floor: The dtype-based precision (basis epsilon, operator epsilon or
            ``operator_eps``): :math:`\varepsilon_A` never goes below it.
    """

    #: A relative defect this large is not rounding: the operator is not symmetric.
    SYMMETRY_LIMIT = 0.05

    def __init__(self, eps_floor: float) -> None:
        self.eps_floor = eps_floor
        self.defect = 0.0  # running max of |d_j| / ||T_j||

    @property
    def eps_a(self) -> float:
        """The process precision every threshold uses."""
        return max(self.eps_floor, self.defect)

    def state_dict(self) -> dict[str, float]:
        """The measured defect (the floor follows from the settings), for a checkpoint."""
        return {"defect": float(self.defect)}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.defect = float(state["defect"])

    def observe(self, t: float, s: float, tnorm: float, iteration: int) -> float:
        """Record one defect :math:`d_j = t - s`; return the ratio by which
        :math:`\\varepsilon_A` grew (1.0 when it did not).

        Raises:
            NonSymmetricOperatorError: the relative defect exceeds the symmetry limit.
        """
        if tnorm <= 0.0:
            return 1.0
        rel = abs(t - s) / tnorm
        if rel > self.SYMMETRY_LIMIT:
            raise NonSymmetricOperatorError(
                f"the operator is not symmetric: at iteration {iteration}, "
                f"|v_(j-1)^T A v_j - v_j^T A v_(j-1)| = {abs(t - s):.3g} = {rel:.3g} ||T|| "
                f"(limit {self.SYMMETRY_LIMIT:g} ||T||); Lanczos needs a symmetric operator"
            )
        before = self.eps_a
        self.defect = max(self.defect, rel)
        return self.eps_a / before
