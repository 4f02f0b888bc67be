r"""One-dimensional families given by their quantile function (e.g. the
log-normal), with the metric by deterministic quadrature.

A quantile function here is ``quantile_fn(theta, u)``: the parameter vector
:math:`\theta` and a level :math:`u \in (0, 1)` give the scalar
:math:`Q_\theta(u)`, so that :math:`X = Q_\theta(U)` with :math:`U` uniform
on (0, 1) samples the family.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kwng_jax.exact.common import _float_dtype


#: The quadrature rules of :func:`quantile_quadrature`.
QUADRATURE_RULES = ('normal', 'legendre')


# ---------------------------------------------------------------------------
# One-dimensional families from quantile functions.
# ---------------------------------------------------------------------------


def quantile_quadrature(
    num_nodes: int = 64, rule: str = 'normal', dtype: Any = None
) -> tuple[jax.Array, jax.Array]:
  r"""Nodes :math:`u_k \in (0, 1)` and weights :math:`w_k` for :math:`\int_0^1`.

  * ``'normal'`` (default): Gauss–Hermite in the normal score. With
    :math:`u = \Phi(z)`,
    :math:`\int_0^1 f(u)\,du = \int f(\Phi(z))\,\varphi(z)\,dz`, integrated
    with the probabilists' Hermite rule
    (:func:`numpy.polynomial.hermite_e.hermegauss`, weights divided by
    :math:`\sqrt{2\pi}`; at most 300 nodes, beyond which NumPy's weights
    overflow). Quantile functions of distributions with unbounded support
    are singular at :math:`u \in \{0, 1\}` (the Gaussian one like
    :math:`\sqrt{-2\log u}`, the log-normal one exponentially in that),
    which ruins Gauss–Legendre's convergence, while :math:`f(\Phi(z))` is
    smooth, so this rule is exact for the Gaussian metric and, in float64,
    accurate to :math:`10^{-11}` or better (relative) for the log-normal metric
    with :math:`s = 1/2`, :math:`10^{-9}` with :math:`s = 1` and
    :math:`10^{-5}` with :math:`s = 2` (from 32 to 256 nodes alike;
    :func:`lognormal_metric`). What limits it is not the number of nodes
    but the upper tail: a level :math:`u = \Phi(z)` cannot resolve
    :math:`1 - u` below the machine epsilon, so :math:`Q(u)` loses accuracy
    for :math:`z \gtrsim 7` and nodes whose :math:`u` rounds to 1 (or to a
    subnormal) in ``dtype`` are dropped (weight 0): :math:`z > 8.2` in
    float64, :math:`z > 5.3` in float32, where :math:`\varphi` weighs less
    than :math:`10^{-14}`, resp. :math:`10^{-6}` — less is lost only if the
    integrand grows slower than that.
  * ``'legendre'``: Gauss–Legendre on :math:`(0, 1)`
    (:func:`numpy.polynomial.legendre.leggauss`), exact for polynomial
    quantiles (bounded support, e.g. uniform) but only algebraically
    convergent on unbounded ones: for the Gaussian metric the relative error
    is :math:`6 \cdot 10^{-4}` with 64 nodes and :math:`2 \cdot 10^{-6}`
    with 1024; for the log-normal with :math:`s = 1` it is 0.1 with 64
    nodes and :math:`6 \cdot 10^{-3}` with 1024. Do not use it for heavy
    tails.

  Args:
    num_nodes: the number of nodes (a Python int).
    rule: one of :data:`QUADRATURE_RULES`.
    dtype: the dtype of the result (default: the default float dtype).

  Returns:
    ``(u, w)``, each of shape ``(num_nodes,)``; the weights sum to 1 (up to
    the dropped nodes).

  Example:
    >>> from kwng_jax import exact
    >>> u, w = exact.quantile_quadrature(32, 'legendre')
    >>> round(float(w.sum()), 5), round(float((w * u).sum()), 5)
    (1.0, 0.5)
  """
  if rule not in QUADRATURE_RULES:
    raise ValueError(
        f'Unknown rule={rule!r}; valid values are {list(QUADRATURE_RULES)}.'
    )
  dtype = jnp.dtype(dtype) if dtype is not None else jnp.asarray(0.0).dtype
  u, w = _quadrature_nodes(num_nodes, rule, dtype)
  return jnp.asarray(u, dtype=dtype), jnp.asarray(w, dtype=dtype)


@functools.lru_cache(maxsize=32)
def _quadrature_nodes(
    num_nodes: int, rule: str, dtype: Any
) -> tuple[np.ndarray, np.ndarray]:
  """NumPy float64 nodes and weights of :func:`quantile_quadrature`."""
  if rule == 'legendre':
    x, w = np.polynomial.legendre.leggauss(num_nodes)
    u, w = 0.5 * (x + 1.0), 0.5 * w
  else:
    if num_nodes > 300:
      raise ValueError(
          f"rule='normal' takes at most 300 nodes, got num_nodes={num_nodes}."
      )
    z, w = np.polynomial.hermite_e.hermegauss(num_nodes)
    u = np.array([0.5 * math.erfc(-zk / math.sqrt(2.0)) for zk in z])
    w = w / math.sqrt(2.0 * math.pi)
  u_cast = u.astype(dtype)
  # Subnormal levels are flushed to zero on some backends: keep normal ones.
  inside = (u_cast >= jnp.finfo(dtype).tiny) & (u_cast < 1.0)
  u = np.where(inside, u, 0.5)
  w = np.where(inside, w, 0.0)
  u.flags.writeable = False
  w.flags.writeable = False
  return u, w


@functools.partial(
    jax.jit, static_argnames=('quantile_fn', 'num_nodes', 'rule')
)
def quantile_metric(
    quantile_fn: Callable[[jax.Array, jax.Array], jax.Array],
    theta: jax.Array,
    num_nodes: int = 64,
    rule: str = 'normal',
) -> jax.Array:
  r"""Wasserstein metric of a one-dimensional family from its quantile function.

  In one dimension :math:`W_2` is the :math:`L^2(0, 1)` distance between
  quantile functions, so

  .. math::
     G_W(\theta) = \int_0^1 \partial_\theta Q_\theta(u)\,
       \partial_\theta Q_\theta(u)^\top du
     \approx \sum_k w_k\, \partial_\theta Q_\theta(u_k)\,
       \partial_\theta Q_\theta(u_k)^\top ,

  with the nodes of :func:`quantile_quadrature` (see there for the
  accuracy) and :math:`\partial_\theta Q` by :func:`jax.grad`.

  Args:
    quantile_fn: ``(theta, u) -> Q_theta(u)``, a scalar for a scalar
      ``u`` in (0, 1), differentiable in ``theta``.
    theta: the flat parameter vector, length :math:`P`.
    num_nodes: the number of quadrature nodes.
    rule: one of :data:`QUADRATURE_RULES`.

  Returns:
    :math:`G_W(\theta)`, shape ``(P, P)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from kwng_jax import exact
    >>> theta = jnp.array([0.0, 2.0])
    >>> g = exact.quantile_metric(exact.gaussian_quantile, theta)
    >>> bool(jnp.allclose(g, jnp.eye(2), atol=1e-4))  # N(mu, s^2): identity
    True

  References:
    Arbel et al., ICLR 2020; Villani, *Topics in Optimal
    Transportation* (2003), §2.2.
  """
  theta = jnp.asarray(theta)
  u, w = quantile_quadrature(num_nodes, rule, _float_dtype(theta))
  theta = theta.astype(u.dtype)
  grads = jax.vmap(jax.grad(quantile_fn), in_axes=(None, 0))(theta, u)
  return (grads * w[:, None]).T @ grads


@functools.partial(
    jax.jit, static_argnames=('quantile_fn', 'num_nodes', 'rule')
)
def quantile_wasserstein_sq(
    quantile_fn: Callable[[jax.Array, jax.Array], jax.Array],
    theta1: jax.Array,
    theta2: jax.Array,
    num_nodes: int = 64,
    rule: str = 'normal',
) -> jax.Array:
  r"""The scalar :math:`W_2^2` between two members of a one-dimensional family.

  .. math::
     W_2^2(\rho_{\theta_1}, \rho_{\theta_2}) = \int_0^1
       (Q_{\theta_1}(u) - Q_{\theta_2}(u))^2 du
     \approx \sum_k w_k (Q_{\theta_1}(u_k) - Q_{\theta_2}(u_k))^2 .

  Args:
    quantile_fn: ``(theta, u) -> Q_theta(u)`` (see :func:`quantile_metric`).
    theta1: the first parameter vector.
    theta2: the second parameter vector.
    num_nodes: the number of quadrature nodes.
    rule: one of :data:`QUADRATURE_RULES`.

  Example:
    >>> import jax.numpy as jnp
    >>> from kwng_jax import exact
    >>> theta1, theta2 = jnp.array([0.0, 1.0]), jnp.array([1.0, 3.0])
    >>> q = exact.gaussian_quantile
    >>> w2 = exact.quantile_wasserstein_sq(q, theta1, theta2)
    >>> round(float(w2), 4)  # (0 - 1)^2 + (1 - 3)^2
    5.0
  """
  theta1, theta2 = jnp.asarray(theta1), jnp.asarray(theta2)
  u, w = quantile_quadrature(num_nodes, rule, _float_dtype(theta1, theta2))
  q = jax.vmap(quantile_fn, in_axes=(None, 0))
  diff = q(theta1.astype(u.dtype), u) - q(theta2.astype(u.dtype), u)
  return jnp.sum(w * jnp.square(diff))


def gaussian_quantile(theta: jax.Array, u: jax.Array) -> jax.Array:
  r"""Quantile function of :math:`\mathcal N(\mu, s^2)`, in :math:`\theta = (\mu, s)`.

  .. math:: Q_\theta(u) = \mu + s\,\Phi^{-1}(u),

  whose Wasserstein metric in :math:`(\mu, s)` is the identity (the
  'diagonal' :func:`gaussian_metric` at :math:`d = 1`).

  Example:
    >>> import jax.numpy as jnp
    >>> from kwng_jax import exact
    >>> float(exact.gaussian_quantile(jnp.array([1.0, 2.0]), 0.5))
    1.0
  """
  theta = jnp.asarray(theta)
  u = jnp.asarray(u).astype(theta.dtype)
  return theta[0] + theta[1] * jax.scipy.special.ndtri(u)


def lognormal_quantile(theta: jax.Array, u: jax.Array) -> jax.Array:
  r"""Quantile function of the log-normal, :math:`\theta = (m, \log s)`.

  .. math:: Q_\theta(u) = \exp(m + s\,\Phi^{-1}(u)), \qquad s = e^{\theta_1},

  i.e. :math:`X = e^{m + sZ}`, :math:`Z \sim \mathcal N(0, 1)`. Its exact
  metric is :func:`lognormal_metric`.

  Example:
    >>> import jax.numpy as jnp
    >>> from kwng_jax import exact
    >>> float(exact.lognormal_quantile(jnp.array([0.0, 0.0]), 0.5))  # median
    1.0
  """
  theta = jnp.asarray(theta)
  u = jnp.asarray(u).astype(theta.dtype)
  return jnp.exp(theta[0] + jnp.exp(theta[1]) * jax.scipy.special.ndtri(u))


@jax.jit
def lognormal_metric(theta: jax.Array) -> jax.Array:
  r"""Closed-form Wasserstein metric of the log-normal.

  With :math:`Q = e^{m + sz}`, :math:`\partial_m Q = Q` and
  :math:`\partial_{\log s} Q = s z Q`; Gaussian moments
  (:math:`\mathbb E[z^k e^{2sz}]`) give

  .. math::
     G_W(\theta) = e^{2m + 2s^2}
       \begin{pmatrix} 1 & 2s^2 \\ 2s^2 & s^2 (1 + 4s^2) \end{pmatrix}.

  It is the limit of ``quantile_metric(lognormal_quantile, theta)``.

  Args:
    theta: ``(m, log s)``, shape ``(2,)``.

  Returns:
    :math:`G_W(\theta)`, shape ``(2, 2)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from kwng_jax import exact
    >>> exact.lognormal_metric(jnp.array([0.0, -1e3]))  # s -> 0: a point mass
    Array([[1., 0.],
           [0., 0.]], dtype=float32)
  """
  theta = jnp.asarray(theta)
  s2 = jnp.exp(2.0 * theta[1])
  scale = jnp.exp(2.0 * theta[0] + 2.0 * s2)
  off = 2.0 * s2
  return scale * jnp.stack([
      jnp.stack([jnp.ones_like(s2), off]),
      jnp.stack([off, s2 * (1.0 + 4.0 * s2)]),
  ])
