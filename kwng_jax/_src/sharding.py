r"""What KWNG needs to run under ``jax.jit`` with sharded arrays.

KWNG scales past one device through JAX's own machinery: shard the batch
(and, FSDP-style, the parameters) with ``jax.sharding.NamedSharding`` over a
mesh and ``jax.jit`` the training step; ``jax.distributed.initialize()``
extends the same program to several hosts. Nothing here moves data by hand.

Under a mesh in ``AxisType.Auto`` mode (the compiler picks shardings) the
estimator needs nothing special. Under ``AxisType.Explicit`` (the default of
``jax.make_mesh`` from JAX 0.10 on) shardings are part of the array types, and
an operation whose output sharding is ambiguous raises
``jax.sharding.ShardingTypeError``: a contraction over a sharded axis (the
Gram Q sums over the batch, :math:`\tilde T D \tilde T^\top` over the
parameters), the gather of the basis points out of a sharded batch. The
helpers below give those operations a replicated output sharding, and do
nothing when no explicit mesh is set, so the same code runs on one device.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from kwng_jax._src import sharding
  >>> sharding.explicit_axes()  # no mesh set
  ()
  >>> x = jnp.ones((4, 3))
  >>> jnp.einsum('nr,nr->r', x, x, out_sharding=sharding.replicated()).shape
  (3,)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import PartitionSpec

from kwng_jax import solve

PyTree = Any


def explicit_axes() -> tuple[str, ...]:
  """Names of the ``Explicit`` axes of the mesh set at trace time, if any."""
  mesh = jax.sharding.get_abstract_mesh()
  return tuple(
      name
      for name, axis_type in zip(mesh.axis_names, mesh.axis_types)
      if axis_type == AxisType.Explicit
  )


def replicated() -> PartitionSpec | None:
  """``out_sharding`` for a small result reduced over a sharded axis.

  ``PartitionSpec()`` (replicated on every device) under an explicit mesh;
  None otherwise, which leaves the choice to the compiler.
  """
  return PartitionSpec() if explicit_axes() else None


def spec_of(x: jax.Array) -> PartitionSpec:
  """The partition spec of ``x`` in its type; all ``None`` when not explicit."""
  if not explicit_axes():
    return PartitionSpec(*(None,) * x.ndim)
  return jax.typeof(x).sharding.spec


def like(tree: PyTree, reference: PyTree) -> PyTree:
  """Reshards ``tree`` to the shardings of ``reference`` (same structure)."""
  if not explicit_axes():
    return tree
  return jax.tree.map(
      lambda x, r: jax.sharding.reshard(x, spec_of(r)), tree, reference
  )


def in_auto_mode(fn: Callable[..., Any], out_sharding: Any) -> Callable[..., Any]:
  """Runs ``fn`` with the explicit mesh axes in Auto mode.

  For code written without sharding annotations (a solve whose contractions
  run over sharded parameter axes): inside, the compiler chooses the
  collectives; ``out_sharding`` (a pytree of ``PartitionSpec`` matching the
  output) gives the result its explicit type back. Without an explicit mesh
  ``fn`` is returned as is.
  """
  axes = explicit_axes()
  if not axes:
    return fn
  return jax.sharding.auto_axes(fn, axes=axes, out_sharding=out_sharding)


def tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
  """:math:`\\langle a, b\\rangle` over all leaves, as a float32 scalar.

  Sums of elementwise products, accumulated in the leaves' precision (at
  least float32). Unlike ``optax.tree_utils.tree_vdot`` (``jnp.vdot``
  reshapes each leaf), it works on leaves sharded over an explicit mesh.

  Example:
    >>> import jax.numpy as jnp
    >>> from kwng_jax._src import sharding
    >>> float(sharding.tree_vdot({'a': jnp.ones(3)}, {'a': jnp.arange(3.0)}))
    3.0
  """
  dtype = solve.at_least_float32(*(x.dtype for x in jax.tree.leaves((a, b))))
  products = jax.tree.map(
      lambda x, y: jnp.sum(x.astype(dtype) * y.astype(dtype)), a, b
  )
  return sum(jax.tree.leaves(products), jnp.zeros((), dtype)).astype(jnp.float32)
