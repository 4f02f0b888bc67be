"""Training Flax models with KWNG (needs ``pip install "kwng_jax[flax]"``)."""

from kwng_jax.flax_utils._helpers import KWNGTrainState
from kwng_jax.flax_utils._helpers import nnx_outputs_fn
from kwng_jax.flax_utils._helpers import nnx_value_grad_and_outputs_fn
from kwng_jax.flax_utils._helpers import replay_outputs_fn
from kwng_jax.flax_utils._helpers import value_grad_and_outputs_fn

__all__ = [
    'KWNGTrainState',
    'nnx_outputs_fn',
    'nnx_value_grad_and_outputs_fn',
    'replay_outputs_fn',
    'value_grad_and_outputs_fn',
]
