r"""Training Flax models with KWNG: NNX optimizers, Linen train states, fused steps.

KWNG's update needs, besides the gradient, ``outputs_fn``: a function
``params -> samples`` (a classifier's logits on the batch) that it
differentiates once with ``jax.vjp``. This module builds that function for
Flax models and threads it through Flax's training APIs:

* NNX: ``nnx.Optimizer(model, kwng_jax.kwng(...), wrt=nnx.Param)`` works as
  is, since ``Optimizer.update(model, grads, **kwargs)`` forwards its keyword
  arguments to the Optax update; :func:`nnx_outputs_fn` builds
  ``outputs_fn`` in one line. It runs the model on a copy of its state, so
  BatchNorm statistics (and RNG counters) are never updated twice.
* Linen: ``TrainState.apply_gradients`` forwards nothing to ``tx.update``;
  :class:`KWNGTrainState` does.
* One forward pass instead of two: :func:`value_grad_and_vjp` and
  :func:`nnx_value_grad_and_vjp` compute the loss, its gradient and the
  pair ``(samples, vjp_fn)`` from a single ``jax.vjp``; the update takes it
  as ``samples_and_vjp=`` instead of ``outputs_fn=``. Under ``jax.jit``, XLA
  usually merges the two identical forward passes anyway (common
  subexpression elimination; ``benchmarks/fused_forward.py`` measures it);
  the fused form guarantees it, and also holds eagerly and for stochastic
  forward passes.

Needs Flax (``pip install "kwng_jax[flax]"``); ``import kwng_jax`` does not
import this package.
"""

# Deprecated since 0.3.0 (they warn); kept out of __all__.
from kwng_jax.flax_utils._deprecated import (
    nnx_value_grad_and_outputs_fn as nnx_value_grad_and_outputs_fn,
)
from kwng_jax.flax_utils._deprecated import replay_outputs_fn as replay_outputs_fn
from kwng_jax.flax_utils._deprecated import (
    value_grad_and_outputs_fn as value_grad_and_outputs_fn,
)
from kwng_jax.flax_utils._helpers import KWNGTrainState
from kwng_jax.flax_utils._helpers import nnx_outputs_fn
from kwng_jax.flax_utils._helpers import nnx_value_grad_and_vjp
from kwng_jax.flax_utils._helpers import value_grad_and_vjp

__all__ = [
    'KWNGTrainState',
    'nnx_outputs_fn',
    'nnx_value_grad_and_vjp',
    'value_grad_and_vjp',
]
