"""kwng_jax: the Kernelized Wasserstein Natural Gradient for JAX and Optax."""

from kwng_jax import datasets
from kwng_jax import displacement
from kwng_jax import exact
from kwng_jax import factors
from kwng_jax import kernels
from kwng_jax import sharding
from kwng_jax import solve
from kwng_jax.alias import kwng
from kwng_jax.alias import published_kwng
from kwng_jax.damping import adaptive_damping
from kwng_jax.damping import AdaptiveDampingState
from kwng_jax.displacement import sample_displacement
from kwng_jax.displacement import scale_by_displacement
from kwng_jax.displacement import ScaleByDisplacementState
from kwng_jax.estimator import apply_preconditioner
from kwng_jax.estimator import build_preconditioner
from kwng_jax.estimator import KWNGInfo
from kwng_jax.estimator import natural_gradient
from kwng_jax.estimator import Preconditioner
from kwng_jax.transform import scale_by_kwng
from kwng_jax.transform import ScaleByKWNGState

__version__ = '0.3.0'
