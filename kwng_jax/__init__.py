"""kwng_jax: the Kernelized Wasserstein Natural Gradient for JAX and Optax.

The optimizers and transformations are the names below. The numerics are
public, documented submodules: :mod:`kwng_jax.factors` (basis selection and
the W, Q, T factors), :mod:`kwng_jax.probes` (the metric diagonal),
:mod:`kwng_jax.kernels`, :mod:`kwng_jax.solve`, and
the exact Wasserstein references :mod:`kwng_jax.exact`. The Flax helpers
(:mod:`kwng_jax.flax_utils`, needs flax) and the examples
(:mod:`kwng_jax.examples`: datasets, models, the demo) are subpackages that
``import kwng_jax`` does not import.
"""

import importlib as _importlib
import warnings as _warnings

from kwng_jax import exact
from kwng_jax import factors
from kwng_jax import kernels
from kwng_jax import probes
from kwng_jax import solve
from kwng_jax._src.adaptive_epsilon import adaptive_damping
from kwng_jax._src.adaptive_epsilon import AdaptiveDampingState
from kwng_jax._src.clipping import clip_by_global_norm
from kwng_jax._src.alias import kwng
from kwng_jax._src.alias import published_kwng
from kwng_jax._src.displacement import sample_displacement
from kwng_jax._src.displacement import scale_by_displacement
from kwng_jax._src.displacement import ScaleByDisplacementState
from kwng_jax._src.estimator import apply_preconditioner
from kwng_jax._src.estimator import build_preconditioner
from kwng_jax._src.estimator import natural_gradient
from kwng_jax._src.from_vjp import preconditioner_from_vjp
from kwng_jax._src.outputs import batch_outputs_fn
from kwng_jax._src.outputs import BatchOutputsFn
from kwng_jax._src.preconditioner import KWNGInfo
from kwng_jax._src.preconditioner import Preconditioner
from kwng_jax._src.stacking import value_grad_and_update
from kwng_jax._src.transform import scale_by_kwng
from kwng_jax._src.transform import ScaleByKWNGState

__version__ = '0.12.0'

__all__ = [
    'AdaptiveDampingState',
    'BatchOutputsFn',
    'KWNGInfo',
    'Preconditioner',
    'ScaleByDisplacementState',
    'ScaleByKWNGState',
    'adaptive_damping',
    'apply_preconditioner',
    'batch_outputs_fn',
    'build_preconditioner',
    'clip_by_global_norm',
    'exact',
    'factors',
    'kernels',
    'probes',
    'kwng',
    'natural_gradient',
    'preconditioner_from_vjp',
    'published_kwng',
    'sample_displacement',
    'scale_by_displacement',
    'scale_by_kwng',
    'solve',
    'value_grad_and_update',
]

#: Modules that moved in 0.3.0: old attribute -> new module.
_MOVED = {
    'datasets': 'kwng_jax.examples.datasets',
    'models': 'kwng_jax.examples.models',
    'cifar': 'kwng_jax.examples.cifar',
    'demo': 'kwng_jax.examples.demo',
    'alias': 'kwng_jax._src.alias',
    'transform': 'kwng_jax._src.transform',
    'estimator': 'kwng_jax._src.estimator',
    'displacement': 'kwng_jax._src.displacement',
    'damping': 'kwng_jax._src.adaptive_epsilon',
    'sharding': 'kwng_jax._src.sharding',
}


def __getattr__(name):
  # The deprecation path of the modules moved in 0.3.0: still reachable as
  # attributes, with a warning that names the new place.
  if name in _MOVED:
    _warnings.warn(
        f'kwng_jax.{name} moved to {_MOVED[name]} in kwng_jax 0.3.0; '
        + ('import it from there.' if 'examples' in _MOVED[name] else
           'use the names exported by kwng_jax (it is private now).'),
        DeprecationWarning,
        stacklevel=2,
    )
    return _importlib.import_module(_MOVED[name])
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
