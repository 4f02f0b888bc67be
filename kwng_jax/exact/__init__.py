r"""Exact Wasserstein information matrices, the references KWNG is tested on.

KWNG estimates the Wasserstein natural gradient :math:`G_W(\theta)^{-1} g`
from samples. This module gives :math:`G_W` in closed form (or by
deterministic quadrature) for location, Gaussian and one-dimensional families, so that estimates
can be measured against the truth:

* location families :math:`X = \mu + Z`: :math:`G_W = I`
  (:func:`location_metric`);
* Gaussians :math:`X = \mu + A Z`, :math:`\Sigma = A A^\top`, in four
  parametrizations (:func:`gaussian_metric`, solved through the Lyapunov
  equation of the Bures metric);
* one-dimensional families given by their quantile function
  (:func:`quantile_metric`), e.g. the log-normal;
* the naive metric :math:`\mathbb E[J^\top J]` of the sample map, which is
  NOT :math:`G_W` in general (:func:`naive_metric`);
* the closed-form :math:`W_2^2` between Gaussians, a differentiable loss
  (:func:`bures_wasserstein_sq`).

The families live in :mod:`kwng_jax.exact.common` (the solve, location
families, the naive metric), :mod:`kwng_jax.exact.gaussian`,
:mod:`kwng_jax.exact.bures` and :mod:`kwng_jax.exact.quantile`; every name
is also importable from :mod:`kwng_jax.exact`.

Everything is pure JAX (quadrature nodes are NumPy constants built at trace
time), respects ``jax_numpy_dtype_promotion='strict'`` and
``jax_numpy_rank_promotion='raise'``, and works in float32 or, with x64
enabled, float64. The metrics here are meant as references: use float64 for
exactness checks.

The metric is defined by
:math:`u^\top G_W(\theta) u = \lim_{t \to 0} W_2^2(\rho_\theta,
\rho_{\theta + t u}) / t^2`, which is how the tests check it.

References:
  Arbel, Gretton, Li, Montúfar, *Kernelized Wasserstein Natural Gradient*,
  ICLR 2020 (arXiv 1910.09652), §2 and Appendix.

  Li, Montúfar, *Natural gradient via optimal transport*, Information
  Geometry 1 (2018); Li, Zhao, *Wasserstein information matrix* (2019).

  Takatsu, *Wasserstein geometry of Gaussian measures*, Osaka J. Math. 48
  (2011); Bhatia, Jain, Lim, *On the Bures–Wasserstein distance between
  positive definite matrices*, Expo. Math. 37 (2019).
"""

from kwng_jax.exact.bures import bures_wasserstein_sq
from kwng_jax.exact.bures import gaussian_wasserstein_sq
from kwng_jax.exact.bures import psd_sqrtm
from kwng_jax.exact.common import location_metric
from kwng_jax.exact.common import naive_metric
from kwng_jax.exact.common import wasserstein_natural_gradient
from kwng_jax.exact.gaussian import PARAMETRIZATIONS
from kwng_jax.exact.gaussian import gaussian_dim
from kwng_jax.exact.gaussian import gaussian_metric
from kwng_jax.exact.gaussian import gaussian_naive_metric
from kwng_jax.exact.gaussian import gaussian_num_params
from kwng_jax.exact.gaussian import gaussian_pack
from kwng_jax.exact.gaussian import gaussian_sample
from kwng_jax.exact.gaussian import gaussian_tangents
from kwng_jax.exact.gaussian import gaussian_unpack
from kwng_jax.exact.gaussian import lyapunov_solve
from kwng_jax.exact.quantile import QUADRATURE_RULES
from kwng_jax.exact.quantile import gaussian_quantile
from kwng_jax.exact.quantile import lognormal_metric
from kwng_jax.exact.quantile import lognormal_quantile
from kwng_jax.exact.quantile import quantile_metric
from kwng_jax.exact.quantile import quantile_quadrature
from kwng_jax.exact.quantile import quantile_wasserstein_sq

__all__ = [
    'bures_wasserstein_sq',
    'gaussian_dim',
    'gaussian_metric',
    'gaussian_naive_metric',
    'gaussian_num_params',
    'gaussian_pack',
    'gaussian_quantile',
    'gaussian_sample',
    'gaussian_tangents',
    'gaussian_unpack',
    'gaussian_wasserstein_sq',
    'location_metric',
    'lognormal_metric',
    'lognormal_quantile',
    'lyapunov_solve',
    'naive_metric',
    'PARAMETRIZATIONS',
    'psd_sqrtm',
    'QUADRATURE_RULES',
    'quantile_metric',
    'quantile_quadrature',
    'quantile_wasserstein_sq',
    'wasserstein_natural_gradient',
]
