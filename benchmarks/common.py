"""Helpers shared by the training benchmarks: timing, JSON, device, progress.

Timing follows one rule: compile time is measured on its own
(``jit(...).lower(...).compile()``), and steady-state step times are read
only after ``jax.block_until_ready``, so that neither asynchronous dispatch
nor compilation leaks into a step time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
import io
import json
import math
import os
import pathlib
import platform
import re
import time
from typing import Any

import jax
import numpy as np


def compile_timed(function: Callable[..., Any], *args: Any) -> tuple[Callable[..., Any], float]:
  """Compiles ``jax.jit(function)`` for ``args``; returns it and the seconds taken.

  Args:
    function: a function of arrays (jitted or not).
    *args: example arguments, fixing shapes and dtypes.

  Returns:
    ``(compiled, seconds)``: the compiled executable (call it with arguments
    shaped like ``args``) and the wall-clock time of lowering plus compiling.
  """
  jitted = function if hasattr(function, 'lower') else jax.jit(function)
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start


def step_times(
    step: Callable[[Any], Any], state: Any, *, num_steps: int, warmup: int = 3
) -> tuple[list[float], Any]:
  """Wall-clock seconds of ``num_steps`` calls ``state = step(state)``.

  Each call is timed on its own and ends with ``jax.block_until_ready``;
  ``warmup`` untimed calls come first (allocation, caches).

  Args:
    step: a compiled step ``state -> state``.
    state: the initial state (a pytree of arrays).
    num_steps: the number of timed steps.
    warmup: the number of untimed steps before them.

  Returns:
    ``(seconds, state)``: the per-step times and the final state.
  """
  for _ in range(warmup):
    state = jax.block_until_ready(step(state))
  seconds = []
  for _ in range(num_steps):
    start = time.perf_counter()
    state = jax.block_until_ready(step(state))
    seconds.append(time.perf_counter() - start)
  return seconds, state


def device_description() -> dict[str, Any]:
  """What the numbers were measured on: JAX's default device and the host."""
  device = jax.devices()[0]
  return {
      'platform': device.platform,
      'device_kind': device.device_kind,
      'device_count': jax.device_count(),
      'jax_version': jax.__version__,
      'host_cpu_count': os.cpu_count(),
      'host_machine': platform.machine(),
      'python_version': platform.python_version(),
  }


def spread(values: Iterable[float]) -> dict[str, float | None]:
  """Mean, sample standard deviation, min and max of ``values``.

  A NaN among the values (a diverged run) makes them all NaN, written as
  null in the JSON; an empty list gives None everywhere.
  """
  values = np.asarray([float(v) for v in values])
  if values.size == 0:
    return {'mean': None, 'std': None, 'min': None, 'max': None}
  return {
      'mean': float(np.mean(values)),
      'std': float(np.std(values, ddof=1)) if values.size > 1 else 0.0,
      'min': float(np.min(values)),
      'max': float(np.max(values)),
  }


def to_json_value(value: Any, digits: int = 6) -> Any:
  """Plain JSON data: arrays to lists, floats rounded, NaN and Inf to None."""
  if isinstance(value, dict):
    return {str(k): to_json_value(v, digits) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_json_value(v, digits) for v in value]
  if isinstance(value, (np.ndarray, jax.Array)):
    return to_json_value(np.asarray(value).tolist(), digits)
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, (int, np.integer)):
    return int(value)
  if isinstance(value, (float, np.floating)):
    value = float(value)
    if not math.isfinite(value):
      return None
    return float(f'{value:.{digits}g}')
  if isinstance(value, pathlib.Path):
    return str(value)
  return value


# A list of numbers (and nulls) only, spread over lines by json.dumps(indent=1):
# it opens with a raw newline, which no JSON string holds.
_NUMBER_LIST = re.compile(r'\[\n(?:[-+0-9.eE,\s]|null)*\]')


def write_json(path: pathlib.Path, payload: dict[str, Any], digits: int = 6) -> None:
  """Writes ``payload`` as strict JSON: floats to ``digits`` significant
  digits, non-finite numbers as null, each list of numbers on one line."""
  path.parent.mkdir(parents=True, exist_ok=True)
  text = json.dumps(to_json_value(payload, digits), indent=1, allow_nan=False)
  text = _NUMBER_LIST.sub(lambda m: re.sub(r'\s+', '', m.group(0)).replace(',', ', '), text)
  path.write_text(text + '\n')


def progress(total: int, description: str):
  """A tqdm progress bar (on stderr) of ``total`` units."""
  from tqdm.auto import tqdm

  return tqdm(total=total, desc=description, dynamic_ncols=True)


def pyplot():
  """matplotlib's pyplot with the non-interactive Agg backend."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  return plt


def save_png(fig: Any, path: pathlib.Path, *, dpi: int, **kwargs: Any) -> None:
  """Saves a matplotlib figure as a 256-colour PNG, a third of the RGBA size.

  Args:
    fig: the figure.
    path: where to write it (its folder is created if need be).
    dpi: resolution.
    **kwargs: more arguments of ``fig.savefig`` (e.g. ``bbox_inches``).
  """
  from PIL import Image  # matplotlib's own dependency

  path.parent.mkdir(parents=True, exist_ok=True)
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=dpi, **kwargs)
  buffer.seek(0)
  Image.open(buffer).convert('RGB').quantize(256).save(path, optimize=True)

