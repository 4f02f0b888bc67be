# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/kwng-jax/kwng_jax/blob/main/notebooks/04_kernels_and_diagnostics.ipynb)
#
# # Kernels, bandwidths, diagnostics and damping
#
# KWNG estimates the Wasserstein natural gradient $G_W^{-1} g$ by projecting
# the motion of the samples onto $M$ gradient fields
# $\nabla_x \partial_{x_{i_m}} k(Y_m, x)$ built from a kernel $k$. This
# notebook is about the choices that projection involves and how to tell,
# while training, whether they are right:
#
# 1. **kernels and bandwidths**: how the kernel and its bandwidth change the
#    accuracy of the estimate, measured against the exact metric of a Gaussian
#    model (as in notebook 01), and how to plug in your own kernel;
# 2. **diagnostics**: what `state.kwng_info` reports at every step and how to
#    read it;
# 3. **adaptive damping**: how $\epsilon$ evolves under the
#    Levenberg–Marquardt rules of `kwng_jax.kwng` and of the paper's
#    optimizer `kwng_jax.published_kwng`, and what it does;
# 4. **ridgeless against ridge**: the estimator of the paper's experiments and
#    the one its theory covers.

# %%
# Colab only: install kwng_jax. Colab's own jax is used as it is (nothing is
# pinned or upgraded).
import sys

if 'google.colab' in sys.modules:
  import subprocess
  subprocess.run(
      [sys.executable, '-m', 'pip', 'install', '--quiet',
       'kwng_jax[examples,flax] @ git+https://github.com/kwng-jax/kwng_jax'],
      check=True,
  )

# %% [markdown]
# ## Parameters
#
# The defaults run in under a minute on a laptop CPU. For smoother
# curves raise `NUM_REPEATS` to `20`, `NUM_SAMPLES` to `1600` (with
# `NUM_BASIS = 40`) and `NUM_STEPS` to `500`.

# %% tags=["parameters"]
NUM_SAMPLES = 400  # N for the accuracy studies.
NUM_BASIS = 20  # M for the accuracy studies.
NUM_REPEATS = 4  # Independent draws per point.
LOG_BANDWIDTHS = (-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0)  # log10 multipliers.
RIDGES = (1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1)  # lambda for the ridge estimator.
NUM_STEPS = 100  # Training steps for the diagnostics.
BATCH_SIZE = 128
HIDDEN = 32  # Width of the classifier's hidden layer.
LEARNING_RATE = 1.0  # kwng_jax.kwng: the largest RMS distance the logits move per step.
PUBLISHED_LEARNING_RATE = 1.0  # kwng_jax.published_kwng: the step length in parameter space.
INITIAL_EPSILONS = (1e-5, 1e-1, 1e3)  # Starting points for adaptive damping.
SEED = 0

# %%
import jax

# Float64 for the accuracy studies, so that the errors measured are the
# estimator's and not float32 roundoff.
jax.config.update('jax_enable_x64', True)

import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
import optax.tree_utils as otu

import kwng_jax
from kwng_jax.examples import datasets
from kwng_jax import exact
from kwng_jax import kernels

print('devices:', jax.devices())
root_key = jax.random.key(SEED)
np.random.seed(SEED)

# %% [markdown]
# ## 1. Kernels and bandwidths
#
# We reuse the correlated 2-D Gaussian of notebook 01, whose Wasserstein
# information matrix `exact.gaussian_metric` gives in closed form, and
# measure the relative error of KWNG against
# $(G_W + \epsilon I)^{-1} g$ (with `damping='identity'`, so that this is the
# quantity KWNG estimates).
#
# Built-in kernels (`kwng_jax.kernels.KERNELS`), with $r^2 = \|x - y\|^2$ and
# bandwidth $\sigma$ in squared-distance units:
#
# * `'gaussian'` (the published one): $k = \exp(-r^2 / 2\sigma)$;
# * `'rational_quadratic'` (the paper's ablation):
#   $k = (1 + r^2 / 2\alpha\sigma)^{-\alpha}$ with $\alpha = 1$;
# * `'inverse_multiquadric'`: $k = (1 + r^2/\sigma)^{-1/2}$.
#
# Any scalar function `k(x, y)` or `k(x, y, bandwidth)` works too: the
# estimator takes the derivatives it needs from it with JAX autodiff. Below,
# a Cauchy kernel $k = 1 / (1 + r^2/\sigma)$ written in one line.
#
# The bandwidth comes from a rule applied to the samples at every step:
# `bandwidth='mean_distance'` (published: the mean squared distance between
# the basis points and the samples), `'median'`, or a fixed number. The rule
# is then multiplied by $10^{\ell}$ with `log_bandwidth=`$\ell$. We sweep
# $\ell$.

# %%
theta = exact.gaussian_pack(jnp.array([0.5, -0.3]), jnp.array([[1.0, 0.0], [2.0, 0.3]]))
target = exact.gaussian_pack(jnp.array([2.0, 1.0]), jnp.array([[0.5, 0.0], [-0.3, 1.5]]))
grads = jax.grad(lambda t: exact.gaussian_wasserstein_sq(t, target))(theta)
EPSILON = 1e-5
exact_direction = exact.wasserstein_natural_gradient(exact.gaussian_metric(theta), grads, EPSILON)


def cauchy(x, y, bandwidth):
  return 1.0 / (1.0 + jnp.sum(jnp.square(x - y)) / bandwidth)


def make_estimator(kernel, ridge_estimator=False):
  """A jitted (key, log_bandwidth, ridge) -> (relative error, norm ratio, info)."""

  @jax.jit
  def estimate(key, log_bandwidth, ridge):
    noise_key, basis_key = jax.random.split(key)
    z = jax.random.normal(noise_key, (NUM_SAMPLES, 2), dtype=jnp.float64)
    direction, info = kwng_jax.natural_gradient(
        grads, lambda t: exact.gaussian_sample(t, z), theta, key=basis_key,
        num_basis=NUM_BASIS, epsilon=EPSILON, damping='identity', kernel=kernel,
        log_bandwidth=log_bandwidth, ridge=ridge if ridge_estimator else 0.0)
    error = jnp.linalg.norm(direction - exact_direction) / jnp.linalg.norm(exact_direction)
    norm_ratio = jnp.linalg.norm(direction) / jnp.linalg.norm(exact_direction)
    return error, norm_ratio, info

  return estimate


def sweep(estimate, log_bandwidths, ridges):
  """Medians over NUM_REPEATS draws: relative error, norm ratio, effective rank."""
  medians = []
  for log_bandwidth, ridge in zip(log_bandwidths, ridges):
    results = [estimate(jax.random.fold_in(root_key, r), log_bandwidth, ridge)
               for r in range(NUM_REPEATS)]
    medians.append(np.median([[float(error), float(ratio), int(info.effective_rank)]
                              for error, ratio, info in results], axis=0))
  errors, norm_ratios, ranks = np.array(medians).T
  return errors, norm_ratios, ranks


kernel_choices = {'gaussian': 'gaussian', 'rational quadratic': 'rational_quadratic',
                  'Cauchy (user kernel)': cauchy}
no_ridge = [0.0] * len(LOG_BANDWIDTHS)
estimators = {name: make_estimator(kernel) for name, kernel in kernel_choices.items()}
kernel_results = {name: sweep(estimate, LOG_BANDWIDTHS, no_ridge)
                  for name, estimate in estimators.items()}

# Where the median rule would put the bandwidth, relative to the published rule.
z = jax.random.normal(root_key, (NUM_SAMPLES, 2), dtype=jnp.float64)
samples = exact.gaussian_sample(theta, z)
basis = samples[:NUM_BASIS]
median_offset = float(jnp.log10(kernels.median_bandwidth(basis, samples)
                                / kernels.mean_distance_bandwidth(basis, samples)))
print(f"'median' = 10^{median_offset:.2f} x 'mean_distance' on these samples")

# %% [markdown]
# Left: the relative error of the estimate; right: the effective rank of the
# Gram matrix $Q$ of the basis gradient fields (how many of the $M$ directions
# the whitening keeps).
#
# * **Too small a bandwidth** (left): each basis function sees only its own
#   neighbourhood, the $M$ of them cannot represent the smooth velocity fields
#   that move a Gaussian, the metric is underestimated and $\hat g$ overshoots
#   (errors above 1).
# * **Large bandwidths**: the basis functions become almost polynomial; their
#   gradient fields become collinear and the effective rank drops below $M$.
#   For this Gaussian model that costs nothing, because its Wasserstein
#   velocity fields are affine and polynomial basis functions are exactly
#   right. For a neural network's outputs it is not so: there, a bandwidth
#   well below the published rule can help (notebook 03 uses
#   `log_bandwidth=-1`).
# * The kernels behave alike once the bandwidth is right; heavier tails
#   (Cauchy, rational quadratic) need a larger multiplier.

# %%
fig, (ax_error, ax_rank) = plt.subplots(1, 2, figsize=(11, 4))
for name, (errors, _, ranks) in kernel_results.items():
  ax_error.plot(LOG_BANDWIDTHS, errors, 'o-', label=name)
  ax_rank.plot(LOG_BANDWIDTHS, ranks, 'o-', label=name)
for ax in (ax_error, ax_rank):
  ax.axvline(0.0, color='gray', linestyle=':', label="'mean_distance' (published)")
  ax.axvline(median_offset, color='gray', linestyle='--', label="'median'")
  ax.set_xlabel('log_bandwidth (log10 multiplier of the rule)')
ax_error.set(yscale='log', ylabel='relative error vs exact', title=f'Accuracy (N = {NUM_SAMPLES}, M = {NUM_BASIS})')
ax_rank.set(ylabel='effective rank', ylim=(0, NUM_BASIS + 1), title='Effective rank of Q')
ax_error.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2. Reading the diagnostics while training
#
# `kwng_jax.scale_by_kwng` stores the diagnostics of its last update in its
# state, `ScaleByKWNGState.kwng_info`, a `KWNGInfo` of device scalars (reading
# them costs no extra computation). Inside any chain, including
# `kwng_jax.kwng`, fetch them by name with `optax.tree_utils.tree_get`:
#
# | field | meaning | what to look for |
# |---|---|---|
# | `bandwidth` | the kernel bandwidth $\sigma$ chosen from the samples | it follows the spread of the outputs; if it collapses or explodes, fix it with `bandwidth=` a number |
# | `effective_rank` | eigenvalues of $Q$ kept by the whitening, at most $M$ | well below $M$: the basis is redundant (bandwidth too large, or samples nearly identical) |
# | `alignment` | $\langle g, \hat g\rangle$ | positive: $\hat g$ is a descent direction. Its size scales like $1/\epsilon$ |
# | `fallback` | $\hat g$ was not finite or $\langle g, \hat g\rangle \le 0$, so $g$ was used | rare; frequent fallbacks mean the estimate is unusable (raise $\epsilon$ or `ridge`) |
# | `finite_inputs` | $g$ and the samples were finite | False: the update was zero, so the parameters never turn NaN |
#
# The damping strength $\epsilon$ of the next step is state as well, the
# field `kwng_epsilon`. The recommended optimizer `kwng_jax.kwng` chains
# `kwng_jax.scale_by_displacement` after `scale_by_kwng`; its state holds
# `displacement`, the RMS distance $\Delta(\hat g)$ the direction would move
# the samples (one `jax.jvp` of `outputs_fn`), and `displacement_scale`,
# $\min(1, 1/\Delta(\hat g))$, the factor that caps it before the learning
# rate. The samples then move by at most the learning rate.
#
# We train a small MLP on scikit-learn's bundled 8×8 digits with the paper's
# **ill-conditioned head**: the ten logits are multiplied by
# $10^{-6}, \dots, 10^{1}$ (condition number $10^7$). The samples KWNG sees are
# the logits of the batch, $N = $ `BATCH_SIZE`, $d = 10$.

# %%
split = datasets.load_digits(seed=SEED)
train_x = jnp.asarray(split.train_images.reshape(len(split.train_images), -1))
train_y = jnp.asarray(split.train_labels)
logit_scales = jnp.asarray(datasets.ill_conditioned_scales())


def init_mlp(key):
  k1, k2 = jax.random.split(key)
  return {'w1': jax.random.normal(k1, (64, HIDDEN), jnp.float32) / 8.0,
          'b1': jnp.zeros(HIDDEN, jnp.float32),
          'w2': jax.random.normal(k2, (HIDDEN, 10), jnp.float32) / HIDDEN**0.5,
          'b2': jnp.zeros(10, jnp.float32)}


def logits_fn(params, images):
  hidden = jnp.tanh(images @ params['w1'] + params['b1'])
  return (hidden @ params['w2'] + params['b2']) * logit_scales


def make_train_step(optimizer):
  @jax.jit
  def train_step(params, opt_state, images, labels):
    def outputs_fn(p):  # The samples: the logits of the batch.
      return logits_fn(p, images)

    def loss_fn(p):
      return optax.softmax_cross_entropy_with_integer_labels(outputs_fn(p), labels).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(
        grads, opt_state, params, outputs_fn=outputs_fn, value=loss)
    return optax.apply_updates(params, updates), opt_state, loss

  return train_step


INFO_FIELDS = ('bandwidth', 'effective_rank', 'alignment', 'fallback', 'finite_inputs')
DISPLACEMENT_FIELDS = ('displacement', 'displacement_scale')  # Only in kwng_jax.kwng.


def train(train_step, params, opt_state, num_steps, seed=SEED):
  """Runs num_steps minibatch steps; records the loss and the diagnostics."""
  rng = np.random.default_rng(seed)
  log = {key: [] for key in ('loss', 'epsilon', *INFO_FIELDS, *DISPLACEMENT_FIELDS)}
  for _ in range(num_steps):
    batch = rng.choice(len(train_y), BATCH_SIZE, replace=False)
    params, opt_state, loss = train_step(params, opt_state, train_x[batch], train_y[batch])
    info = otu.tree_get(opt_state, 'kwng_info')
    log['loss'].append(float(loss))
    log['epsilon'].append(float(otu.tree_get(opt_state, 'kwng_epsilon')))
    for key in INFO_FIELDS:
      log[key].append(float(getattr(info, key)))
    for key in DISPLACEMENT_FIELDS:
      value = otu.tree_get(opt_state, key)  # None in a chain without the cap.
      log[key].append(np.nan if value is None else float(value))
  return params, opt_state, {key: np.array(values) for key, values in log.items()}


# float32 for the network, as usual (x64 is on, so be explicit).
params0 = init_mlp(root_key)
adaptive_kwng = kwng_jax.kwng(LEARNING_RATE, num_basis=5)  # The recommended optimizer.
adaptive_step = make_train_step(adaptive_kwng)
params, opt_state, diagnostics = train(adaptive_step, params0, adaptive_kwng.init(params0), NUM_STEPS)
print(f"final minibatch loss {diagnostics['loss'][-1]:.3f}, "
      f"fallbacks {int(diagnostics['fallback'].sum())} of {NUM_STEPS} steps, "
      f"epsilon from {diagnostics['epsilon'].min():.1e} to {diagnostics['epsilon'].max():.1e}, "
      f"displacement from {diagnostics['displacement'].min():.1e} "
      f"to {diagnostics['displacement'].max():.1e}")
print('last step:', otu.tree_get(opt_state, 'kwng_info'))

# %%
fig, axes = plt.subplots(2, 4, figsize=(16, 6.5), sharex=True)
panels = [('loss', 'minibatch loss', 'log'), ('epsilon', 'kwng_epsilon', 'log'),
          ('bandwidth', 'bandwidth $\\sigma$', 'log'), ('effective_rank', 'effective rank (M = 5)', 'linear'),
          ('alignment', '$\\langle g, \\hat g\\rangle$', 'log'), ('fallback', 'fallback (1 = used g)', 'linear'),
          ('displacement', 'displacement $\\Delta(\\hat g)$', 'log'),
          ('displacement_scale', 'displacement_scale', 'log')]
for ax, (key, label, scale) in zip(axes.flat, panels):
  ax.plot(diagnostics[key], '.-' if key == 'fallback' else '-', markersize=3)
  ax.set(title=label, yscale=scale)
axes[1, 2].axhline(1.0, color='gray', linestyle=':')  # Above: the step was capped.
for ax in axes[1]:
  ax.set_xlabel('step')
plt.tight_layout()
plt.show()

# %% [markdown]
# What the panels say:
#
# * `effective_rank` stays at $M$: the five basis gradient fields are
#   linearly independent, the whitening drops nothing.
# * `bandwidth` follows the spread of the logits: it grows as the network
#   learns to separate the classes (it is in squared-logit units).
# * `alignment` is positive at every step, and large: the part of $g$ the
#   kernel estimate does not cover is scaled by $1/\epsilon$, with
#   $\epsilon$ between about $3 \times 10^{-7}$ and $10^{-5}$ here.
# * `displacement` shows what that means on the samples: the direction
#   $\hat g$ itself would move the logits by $10^6$ to a few $10^8$ (RMS), far
#   above the cap of 1 (dotted). `displacement_scale` shortens every step
#   accordingly, so each capped step moves the logits by exactly the
#   learning rate, and the update, a running average of such steps
#   (momentum 0.9), by at most about as much; that cap is what keeps the
#   step size sane (in
#   `kwng_jax.published_kwng`, the clipping to norm 1 in parameter space
#   plays that role). A run whose `displacement` stays below 1 takes
#   uncapped steps, $\mathrm{lr}\,\hat g$.
# * `kwng_epsilon` moves by at most a factor 0.85 per step; section 3 looks
#   at it.
# * `fallback` stays at 0: the estimate was a descent direction throughout.
#
# ### The safety net
#
# A batch with a NaN produces a NaN gradient. KWNG then returns a zero
# update and says so in `finite_inputs`, so the parameters stay finite:

# %%
nan_images = train_x[:BATCH_SIZE].at[0, 0].set(jnp.nan)
new_params, nan_state, nan_loss = adaptive_step(params, opt_state, nan_images, train_y[:BATCH_SIZE])
print('loss:', float(nan_loss))
print('finite_inputs:', bool(otu.tree_get(nan_state, 'kwng_info').finite_inputs))
print('parameters unchanged:', all(bool(jnp.array_equal(a, b)) for a, b in
                                   zip(jax.tree.leaves(params), jax.tree.leaves(new_params))))

# %% [markdown]
# ## 3. Adaptive damping
#
# The estimate is $\hat g = (\tilde T^\top \tilde T + \epsilon D^{-1})^{-1} g$.
# The damping $\epsilon$ trades the kernel estimate of $G_W$ (rank at most
# $M$) against the diagonal metric $\epsilon D^{-1}$: when $\epsilon$ is large
# compared with the eigenvalues of $\tilde T D \tilde T^\top$, $\hat g \approx
# D g / \epsilon$, a diagonally preconditioned gradient; when it is small, the
# components of $g$ along the $M$ directions the estimate measures are shrunk
# relative to the rest, by their estimated metric.
#
# `kwng_jax.adaptive_damping` adapts $\epsilon$ the Levenberg–Marquardt way.
# It compares the actual decrease of the loss with the decrease the previous
# update $u_{t-1}$ predicted to first order,
#
# $$\rho_t = c\,\frac{L_{t-1} - L_t}{-\langle g_{t-1}, u_{t-1}\rangle},$$
#
# keeps the largest $\rho$ of a window of steps, and at the end of the
# window divides $\epsilon$ by 0.85 if it is below 0.25 (the model
# over-promised: trust it less) or multiplies it by 0.85 if it is above 0.75,
# within $[10^{-10}, 10^5]$. That is why the update needs `value=loss`.
# Using the chain's actual update $u$ keeps the prediction right whatever
# comes after `scale_by_kwng` (the cap on the displacement, clipping,
# momentum, a schedule).
#
# * `kwng_jax.kwng` adapts at every step (`window=1`) against the
#   first-order prediction ($c = 1$);
# * `kwng_jax.published_kwng` uses the published rule: a window of 5 steps
#   and $c = 2$ (so that an exact Newton step on a quadratic scores 1). With
#   its update $u = -\mathrm{lr}\,\hat g$ (when the clipping does not act)
#   the ratio is $2 (L_{t-1} - L_t) / (\mathrm{lr}\,\langle g_{t-1},
#   \hat g_{t-1}\rangle)$.
#
# Which $\epsilon$ is small or large depends on the eigenvalues of
# $\tilde T D \tilde T^\top$. `kwng_jax.build_preconditioner` returns that
# $M \times M$ matrix (`gram`), so we can look at them at the initial
# parameters:

# %%
images0, labels0 = train_x[:BATCH_SIZE], train_y[:BATCH_SIZE]
preconditioner = kwng_jax.build_preconditioner(  # the damping of kwng_jax.kwng.
    lambda p: logits_fn(p, images0), params0, key=root_key, num_basis=5,
    damping='metric_diagonal')
print('eigenvalues of T D T^T:', np.linalg.eigvalsh(np.asarray(preconditioner.gram)))

# %% [markdown]
# Below, both optimizers started from several $\epsilon_0$ on both sides of
# them: we set the state field with `optax.tree_utils.tree_set`, which also
# lets one steer $\epsilon$ by hand (or keep it fixed, with
# `kwng_jax.kwng(..., adaptive=False)`, likewise for `published_kwng`). For
# each optimizer the update function is the same, so its step is compiled
# once.

# %%
published = kwng_jax.published_kwng(PUBLISHED_LEARNING_RATE, num_basis=5)
damping_optimizers = {
    'kwng': (adaptive_kwng, adaptive_step),
    'published_kwng': (published, make_train_step(published)),
}
damping_runs = {}
for name, (optimizer, step) in damping_optimizers.items():
  for epsilon0 in INITIAL_EPSILONS:
    state0 = otu.tree_set(optimizer.init(params0), kwng_epsilon=jnp.asarray(epsilon0, jnp.float32))
    _, _, damping_runs[name, epsilon0] = train(step, params0, state0, NUM_STEPS)


def moving_average(values, width=10):  # Minibatch losses are noisy.
  return np.convolve(values, np.ones(width) / width, mode='valid')


fig, (ax_eps, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5))
for (name, epsilon0), log in damping_runs.items():
  style = dict(color=f'C{INITIAL_EPSILONS.index(epsilon0)}',
               linestyle='-' if name == 'kwng' else '--',
               label=f'{name}, $\\epsilon_0$ = {epsilon0:g}')
  ax_eps.plot(log['epsilon'], **style)
  ax_loss.plot(moving_average(log['loss']), **style)
  print(f"{name:15s} epsilon0 = {epsilon0:7g}: final epsilon {log['epsilon'][-1]:8.1e} "
        f"(shrunk {epsilon0 / log['epsilon'][-1]:.3g}x), "
        f"mean loss of the last 10 steps {log['loss'][-10:].mean():.3f}")
ax_eps.set(yscale='log', xlabel='step', ylabel='kwng_epsilon', title='Adaptive $\\epsilon$ over training')
ax_loss.set(yscale='log', xlabel='step', ylabel='minibatch loss (moving average)',
            title='Loss for each starting $\\epsilon_0$')
ax_eps.legend(fontsize=7)
plt.tight_layout()
plt.show()

# %% [markdown]
# Solid lines: `kwng_jax.kwng`; dashed: `kwng_jax.published_kwng`.
#
# * $\epsilon$ changes by at most a factor $0.85$ per step under the rule of
#   `kwng_jax.kwng` (a decade in 14 steps) and per window of 5 steps under
#   the published one (a decade in 71). Neither rule drives $\epsilon$
#   towards what trains fastest: they test whether the first-order model of
#   the loss can be trusted. Here both rules shrink $\epsilon$ over the
#   100 steps, by the factors printed above: on this run about 26 for both
#   and from every start, which for the published rule means a shrink at
#   each of its 20 windows. Both compare the losses of two *different*
#   minibatches, so $\rho$ is noisy, and the published rule keeps the
#   largest $\rho$ of its window, which biases it upwards.
# * A start far above the eigenvalues of $\tilde T D \tilde T^\top$
#   ($\epsilon_0 = 10^3$) makes KWNG the diagonally preconditioned gradient
#   $D g$, and `kwng_jax.kwng` trains more slowly from there: the default
#   $\epsilon_0 = 10^{-5}$, below them, is the better start. Once
#   $\epsilon$ is well below them, shrinking it further changes little: the
#   part of $g$ outside the $M$ measured directions, scaled by
#   $1/\epsilon$, dominates $\hat g$, and the cap on the displacement (or
#   the published clipping) removes the $1/\epsilon$.
# * From the two lower starts `kwng_jax.kwng` ends far below the published
#   chain on this problem: its steps are measured on the logits, which the
#   ill-conditioned head does not distort, while a step of length 1 in
#   parameter space is distorted by it. From $\epsilon_0 = 10^3$ both are
#   still close to a damped gradient step after 100 steps, and end close
#   to each other (`kwng_jax.kwng` a little below).
#
# ## 4. Ridgeless against ridge
#
# The paper's experiments use the **ridgeless** estimator ($\lambda = 0$): it
# whitens $T$ by $Q^{-1/2}$, dropping eigenvalues of $Q$ below a relative
# threshold (`rcond`). Its consistency theory covers the **ridge** estimator,
# which regularizes $Q$ with the RKHS Gram matrix $K$ of the basis functions:
#
# $$\hat g = \big(T^\top (Q + \lambda K)^{-1} T + \epsilon D^{-1}\big)^{-1} g .$$
#
# `ridge=`$\lambda$ selects it (with the same `kwng`, `scale_by_kwng` and
# `natural_gradient`). A positive $\lambda$ shrinks the metric estimate, so it
# lengthens $\hat g$; it should go to 0 as $N$ grows. Below, the error of
# both against the exact natural gradient at the published bandwidth (left),
# and the length of the estimate relative to the exact one (right).

# %%
ridge_errors, ridge_ratios, _ = sweep(make_estimator('gaussian', ridge_estimator=True),
                                     [0.0] * len(RIDGES), RIDGES)
ridgeless_error, ridgeless_ratio, _ = sweep(estimators['gaussian'], [0.0], [0.0])

fig, (ax_error, ax_norm) = plt.subplots(1, 2, figsize=(11, 4))
ax_error.plot(RIDGES, ridge_errors, 'o-', label='ridge')
ax_error.axhline(ridgeless_error[0], color='k', linestyle='--', label='ridgeless ($\\lambda = 0$)')
ax_error.set(xscale='log', yscale='log', xlabel='ridge $\\lambda$', ylabel='relative error vs exact',
             title=f'Accuracy (N = {NUM_SAMPLES}, M = {NUM_BASIS})')
ax_error.legend()
ax_norm.plot(RIDGES, ridge_ratios, 'o-', label='ridge')
ax_norm.axhline(ridgeless_ratio[0], color='k', linestyle='--', label='ridgeless')
ax_norm.axhline(1.0, color='gray', linestyle=':')
ax_norm.set(xscale='log', yscale='log', xlabel='ridge $\\lambda$',
            ylabel='$\\|\\hat g\\| / \\|G_W^{-1} g\\|$', title='Length of the estimate')
ax_norm.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# For small $\lambda$ the ridge estimator agrees with the ridgeless one; as
# $\lambda$ grows the bias takes over and the estimate overshoots. In practice: use the ridgeless default,
# and reach for a small `ridge` when the diagnostics show the whitening
# struggling (a collapsing `effective_rank`, frequent `fallback`), since
# $Q + \lambda K$ is better conditioned than $Q$. $K$ and $Q$ scale
# differently with the bandwidth ($Q$ carries one more pair of derivatives),
# so a good $\lambda$ depends on it: sweep it as above on your own model.
