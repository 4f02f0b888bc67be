r"""What the families share: the natural-gradient solve, location families, and
the naive metric :math:`\mathbb E[J^\top J]` (which is not :math:`G_W`)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

PyTree = Any


def _float_dtype(*arrays: Any) -> jnp.dtype:
  """The widest floating dtype among ``arrays``, at least the default float."""
  dtypes = [jnp.asarray(a).dtype for a in arrays]
  dtypes = [d for d in dtypes if jnp.issubdtype(d, jnp.floating)]
  return jnp.result_type(jnp.asarray(0.0).dtype, *dtypes)



# ---------------------------------------------------------------------------
# Location families and the natural-gradient solve.
# ---------------------------------------------------------------------------


def location_metric(dim: int, dtype: Any = None) -> jax.Array:
  r"""Wasserstein metric of a location family, the identity.

  For :math:`X = \mu + Z` with :math:`\mu \in \mathbb R^d` every tangent
  :math:`\partial X / \partial \mu_j = e_j` is a constant, hence a gradient
  field, and transporting by :math:`\delta\mu` costs
  :math:`\|\delta\mu\|^2`:

  .. math:: G_W(\mu) = I_d.

  Here the naive metric :math:`\mathbb E[J^\top J]` coincides with
  :math:`G_W`.

  Args:
    dim: the dimension :math:`d` of :math:`\mu`.
    dtype: the dtype of the result (default: the default float dtype).

  Returns:
    The :math:`d \times d` identity.

  Example:
    >>> from kwng_jax import exact
    >>> exact.location_metric(2)
    Array([[1., 0.],
           [0., 1.]], dtype=float32)

  References:
    Arbel et al., ICLR 2020.
  """
  return jnp.eye(dim, dtype=dtype)


@functools.partial(jax.jit, static_argnames=('rcond',))
def wasserstein_natural_gradient(
    metric: jax.Array,
    grads: PyTree,
    epsilon: float = 0.0,
    rcond: float | None = None,
) -> PyTree:
  r"""The (damped) natural gradient :math:`(G + \epsilon I)^{+} g`.

  .. math:: \hat g = (G + \epsilon I)^{+} g,

  with :math:`{}^{+}` the Moore–Penrose pseudo-inverse (computed from the
  eigendecomposition of the symmetric matrix), so a singular metric — such
  as the 'full' Gaussian one, see :func:`gaussian_metric` — gives the
  minimum-norm solution when :math:`\epsilon = 0`. This is the target KWNG
  estimates, :math:`(G_W + \epsilon I)^{-1} g`.

  Args:
    metric: the symmetric positive semi-definite :math:`P \times P` matrix
      :math:`G`.
    grads: :math:`g`, a vector of length :math:`P`, or a pytree with
      :math:`P` entries in all (flattened with
      :func:`jax.flatten_util.ravel_pytree`, in that order).
    epsilon: the damping :math:`\epsilon \ge 0`.
    rcond: eigenvalues at most ``rcond`` times the largest are treated as
      zero (default: :func:`jax.numpy.linalg.pinv`'s, :math:`10 P` times the
      machine epsilon).

  Returns:
    :math:`\hat g`, with the structure of ``grads``.

  Example:
    >>> import jax.numpy as jnp
    >>> from kwng_jax import exact
    >>> metric = jnp.array([[2.0, 0.0], [0.0, 0.0]])  # singular
    >>> exact.wasserstein_natural_gradient(metric, jnp.array([1.0, 1.0]))
    Array([0.5, 0. ], dtype=float32)

  References:
    Arbel et al., ICLR 2020, eq. (3).
  """
  flat, unravel = ravel_pytree(grads)
  dtype = _float_dtype(metric, flat)
  metric = jnp.asarray(metric).astype(dtype)
  metric = 0.5 * (metric + metric.T)
  damped = metric + jnp.asarray(epsilon, dtype=dtype) * jnp.eye(
      metric.shape[0], dtype=dtype
  )
  solution = jnp.linalg.pinv(damped, rtol=rcond, hermitian=True) @ flat.astype(
      dtype
  )
  return unravel(solution)



@functools.partial(jax.jit, static_argnames=('sample_fn',))
def naive_metric(
    sample_fn: Callable[[PyTree], jax.Array], theta: PyTree
) -> jax.Array:
  r"""The naive metric :math:`\frac1N \sum_n J_n^\top J_n` of a sample function.

  With :math:`J_n = \partial X_n / \partial\theta \in \mathbb R^{d \times P}`
  (by :func:`jax.jacfwd`),

  .. math:: \hat G = \frac1N \sum_{n=1}^N J_n^\top J_n ,

  the Monte Carlo estimate of :math:`\mathbb E[J^\top J]`: the metric that
  moves every sample independently. It is NOT the Wasserstein metric
  except when every :math:`\partial X/\partial\theta_p` is a gradient field
  (location, diagonal scale) — the point KWNG's kernel projection corrects.

  Args:
    sample_fn: ``theta -> samples`` of shape ``(N, ...)``, flattened to
      ``(N, d)``.
    theta: the parameters, a vector or a pytree (flattened with
      :func:`jax.flatten_util.ravel_pytree`; rows and columns of the result
      follow that order).

  Returns:
    :math:`\hat G`, shape ``(P, P)``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from kwng_jax import exact
    >>> z = jax.random.normal(jax.random.key(0), (1000, 2))
    >>> g = exact.naive_metric(lambda mu: mu[None, :] + z, jnp.zeros(2))
    >>> g  # location family: the identity
    Array([[1., 0.],
           [0., 1.]], dtype=float32)
  """
  flat, unravel = ravel_pytree(theta)

  def flat_samples(v):
    samples = sample_fn(unravel(v))
    return samples.reshape(samples.shape[0], -1)

  jac = jax.jacfwd(flat_samples)(flat)
  num_samples = jac.shape[0]
  return jnp.einsum('ndp,ndq->pq', jac, jac) / num_samples
