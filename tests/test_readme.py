"""Every Python sample of the README runs, on small data.

The samples leave their inputs (a model, a batch) to the reader; each test
defines them, runs the README's code as written, and checks what it claims.
The multi-device samples run in a subprocess: they set a global mesh and
(multi-host) initialize jax.distributed, which must come before any other
JAX computation.
"""

import pathlib
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

README = pathlib.Path(__file__).parent.parent / 'README.md'


def samples() -> list[str]:
  return re.findall(r'```python\n(.*?)```', README.read_text(), flags=re.S)


def test_the_readme_has_the_samples_these_tests_run():
  found = samples()
  assert len(found) == 7
  assert 'opt = kwng_jax.kwng()' in found[0]
  assert 'jax.distributed.initialize()' in found[5]
  assert 'full_params=params' in found[6]


def mlp_apply(params, images):
  hidden = jax.nn.relu(images @ params['w1'] + params['b1'][None, :])
  return hidden @ params['w2'] + params['b2'][None, :]


def batches(num):
  keys = jax.random.split(jax.random.key(0), num)
  return [(jax.random.normal(k, (32, 8)), jax.random.randint(jax.random.fold_in(k, 1), (32,), 0, 4))
          for k in keys]


@pytest.mark.usefixtures('standard_promotion')
def test_quick_start_trains_on_the_batch_it_is_given():
  k1, k2 = jax.random.split(jax.random.key(1))
  namespace = {'model_apply': mlp_apply,
               'params': {'w1': jax.random.normal(k1, (8, 16)) / 3, 'b1': jnp.zeros(16),
                          'w2': jax.random.normal(k2, (16, 4)) / 4, 'b2': jnp.zeros(4)}}
  exec(samples()[0], namespace)
  train_step, params, opt_state = (namespace[k] for k in ('train_step', 'params', 'opt_state'))

  def loss_on(params, images, labels):
    return optax.softmax_cross_entropy_with_integer_labels(mlp_apply(params, images), labels).mean()

  data = batches(2)
  first_losses = [float(loss_on(params, *batch)) for batch in data]
  for step in range(40):
    images, labels = data[step % 2]
    expected = loss_on(params, images, labels)
    params, opt_state, loss = train_step(params, opt_state, images, labels)
    # The step reports the loss of the batch it was given, not of a stale one.
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
  for batch, first in zip(data, first_losses):
    assert float(loss_on(params, *batch)) < 0.5 * first

  # The custom chain and the optax-free estimator, on the same problem.
  images, labels = data[0]
  outputs_fn = lambda p: mlp_apply(p, images)  # noqa: E731
  loss, grads = jax.value_and_grad(lambda p: loss_on(p, images, labels))(params)
  namespace.update(grads=grads, outputs_fn=outputs_fn, loss=loss)
  exec(samples()[1], namespace)
  assert jax.tree.structure(namespace['updates']) == jax.tree.structure(params)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(namespace['updates']))
  exec(samples()[2], namespace)
  assert namespace['info'].alignment.shape == ()
  assert jax.tree.structure(namespace['direction']) == jax.tree.structure(grads)


@pytest.mark.usefixtures('standard_promotion')
def test_flax_sample_trains_the_ill_conditioned_mlp():
  import kwng_jax
  from kwng_jax.examples import datasets
  namespace = {'kwng_jax': kwng_jax, 'optax': optax}
  exec(samples()[3], namespace)
  split = datasets.load_digits()
  images, labels = jnp.asarray(split.train_images[:128]), jnp.asarray(split.train_labels[:128])
  # 40 steps: kwng()'s momentum starts from zero, so its first steps are short.
  losses = [float(namespace['train_step'](namespace['model'], namespace['optimizer'],
                                          images, labels)) for _ in range(40)]
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0], losses


def run_in_subprocess(script: str) -> str:
  result = subprocess.run(
      [sys.executable, '-c', script], capture_output=True, text=True, timeout=300,
      env={'XLA_FLAGS': '--xla_force_host_platform_device_count=8', 'JAX_PLATFORMS': 'cpu',
           'PATH': '/usr/bin:/bin'})
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


DATA = textwrap.dedent('''
    import numpy as np
    rng = np.random.default_rng(0)
    params = {'w1': rng.normal(size=(4, 8)).astype(np.float32) / 2,
              'b1': np.zeros(8, np.float32),
              'w2': rng.normal(size=(8, 3)).astype(np.float32) / 3}
    x = rng.normal(size=(64, 4)).astype(np.float32)
    y = rng.normal(size=(64, 3)).astype(np.float32)
''')


def test_multi_device_sample_runs_on_eight_devices():
  script = DATA + samples()[4] + textwrap.dedent('''
      losses = [float(loss)]
      for _ in range(10):
        params, opt_state, loss = train_step(params, opt_state, x, y)
        losses.append(float(loss))
      assert jax.device_count() == 8 and len(x.sharding.device_set) == 8
      assert losses[-1] < losses[0], losses
      print('ok', losses[0], losses[-1])
  ''')
  assert run_in_subprocess(script).splitlines()[-1].startswith('ok')


def test_multi_host_sample_runs_as_one_process():
  """jax.distributed with one process: the code path of every host of a cluster."""
  initialize, rest = samples()[5].split('\n', 1)
  script = textwrap.dedent('''
      import functools, socket
      import jax
      with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
      # What the cluster environment provides, for a cluster of one process.
      jax.distributed.initialize = functools.partial(
          jax.distributed.initialize, coordinator_address=f'127.0.0.1:{port}',
          num_processes=1, process_id=0)
  ''') + initialize + '\n' + DATA + samples()[4] + textwrap.dedent('''
      local_x, local_y = x, y
  ''') + rest + textwrap.dedent('''
      assert jax.process_count() == 1 and bool(jnp.isfinite(loss))
      print('ok')
  ''')
  assert run_in_subprocess(script).splitlines()[-1].startswith('ok')


@pytest.mark.usefixtures('standard_promotion')
def test_multi_transform_sample_trains_each_group_with_its_optimizer():
  k1, k2, k3 = jax.random.split(jax.random.key(2), 3)
  params = {'hidden': {'w': jax.random.normal(k1, (8, 16)) / 3, 'b': jnp.zeros(16)},
            'head': {'w': jax.random.normal(k2, (16, 4)) / 4, 'b': jnp.zeros(4)}}
  images = jax.random.normal(k3, (32, 8))
  labels = jnp.arange(32) % 4

  def outputs_fn(p):
    hidden = jax.nn.relu(images @ p['hidden']['w'] + p['hidden']['b'][None, :])
    return hidden @ p['head']['w'] + p['head']['b'][None, :]

  def loss_fn(p):
    return optax.softmax_cross_entropy_with_integer_labels(outputs_fn(p), labels).mean()

  namespace = {'jax': jax, 'optax': optax, 'kwng_jax': __import__('kwng_jax'),
               'params': params, 'loss_fn': loss_fn, 'outputs_fn': outputs_fn}
  initial = float(loss_fn(params))
  # The sample builds the optimizer, then takes one step: take ten.
  setup, step = samples()[6].split('opt_state = opt.init(params)\n')
  exec(setup + 'opt_state = opt.init(params)\n', namespace)
  for _ in range(10):
    exec(step, namespace)
  inner = namespace['opt_state'].inner_states['kwng'].inner_state
  info = optax.tree_utils.tree_get(inner, 'kwng_info')
  assert bool(info.depends_on_params) and not bool(info.fallback)
  assert float(loss_fn(namespace['params'])) < 0.8 * initial
