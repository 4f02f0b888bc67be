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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/kwng-jax/kwng_jax/blob/main/notebooks/01_quickstart.ipynb)
#
# # KWNG quick start: the Wasserstein natural gradient of a Gaussian
#
# A *natural gradient* preconditions the Euclidean gradient
# $g = \nabla_\theta L$ by the inverse of a metric on the space of models, so
# that a step depends on how the model's *outputs* move rather than on how it
# happens to be parametrized. For models that produce samples
# $X = h_\theta(Z)$ the natural metric is the **Wasserstein information
# matrix** $G_W(\theta)$: for a small change $u$ of the parameters,
# $u^\top G_W u$ is the squared $W_2$ distance the law of $X$ moves,
# $W_2^2(\rho_\theta, \rho_{\theta + t u}) \approx t^2\, u^\top G_W(\theta)\, u$.
# The Wasserstein natural gradient is $G_W(\theta)^{-1} g$.
#
# $G_W$ is a $P \times P$ matrix nobody can form for a neural network.
# **KWNG** (Arbel, Gretton, Li, Montúfar, *Kernelized Wasserstein Natural
# Gradient*, ICLR 2020) estimates $G_W^{-1} g$ from a batch of $N$ samples
# $X_n$ alone, with a kernel $k$ and $M \ll N$ basis functions
# $\partial_{i_m} k(Y_m, \cdot)$ centred on $M$ of the samples:
#
# $$\hat g = \big(\tilde T^\top \tilde T + \epsilon D^{-1}\big)^{-1} g ,
# \qquad \tilde T = Q^{-1/2}\, T \in \mathbb R^{M \times P},$$
#
# where row $m$ of $T$ is a vector–Jacobian product of the sample map
# $\theta \mapsto (X_n)_n$ with the kernel's cross-derivatives
# $W[m, n, :] = \nabla_y \partial_{x_{i_m}} k(Y_m, X_n)$, $Q = \frac1N \sum_n
# W[:, n, :] W[:, n, :]^\top$ is the Gram matrix of the basis gradient fields,
# and $D$ is a diagonal damping. Thanks to the Woodbury identity only an
# $M \times M$ system is solved; the extra cost over a plain gradient step is
# one batched VJP over the $M$ basis functions.
#
# This notebook
#
# 1. checks the estimate against the exact Wasserstein natural gradient of a
#    2-D Gaussian, known in closed form, as the number of samples $N$ grows;
# 2. optimizes the same Gaussian towards a target with gradient descent and
#    with KWNG, in a badly scaled parametrization, and shows what the
#    learning rate of `kwng_jax.kwng` means: the largest distance the samples
#    move in one step.

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
# The defaults run in well under a minute on a laptop CPU, most of it
# compiling. For a real run raise
# `SAMPLE_SIZES` to `(100, 400, 1600, 6400)` and `NUM_REPEATS` to `50`: the
# error curve then gets smooth and reaches a few percent.

# %% tags=["parameters"]
SAMPLE_SIZES = (100, 400, 1600)  # N for the accuracy study; M = sqrt(N).
NUM_REPEATS = 10  # Independent draws of samples and basis per N.
EPSILON = 1e-5  # The damping strength epsilon.
NUM_STEPS = 30  # Optimization steps.
BATCH_SIZE = 200  # N during optimization.
NUM_BASIS = 20  # M during optimization (at least the 5 parameters).
# For kwng_jax.kwng and the exact natural gradient: the largest RMS distance
# the samples move in one step (0.5 is also the step that lands on the
# target). published_kwng takes it as its step length in parameter space.
LEARNING_RATE = 0.5
GD_LEARNING_RATE = 0.2  # For gradient descent (larger ones diverge).
SEED = 0

# %%
import jax

# Float64 for the accuracy study: the error we measure should be the
# estimator's, not float32 roundoff.
jax.config.update('jax_enable_x64', True)

import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import kwng_jax
from kwng_jax import exact

print('devices:', jax.devices())
print('kwng_jax', kwng_jax.__version__, '| jax', jax.__version__)
root_key = jax.random.key(SEED)
np.random.seed(SEED)

# %% [markdown]
# ## A model whose Wasserstein metric is known exactly
#
# The model draws $X = \mu + A Z$ with $Z \sim \mathcal N(0, I_2)$, so
# $X \sim \mathcal N(\mu, \Sigma)$ with $\Sigma = A A^\top$. We use the
# Cholesky parametrization, $\theta = (\mu_1, \mu_2, A_{11}, A_{21}, A_{22})$
# with $A$ lower triangular: $P = 5$ parameters. For a tangent
# $u = (\delta\mu, \delta A)$ the covariance moves by
# $\delta\Sigma = \delta A\, A^\top + A\, \delta A^\top$; with $S$ the
# symmetric solution of the Lyapunov equation $S\Sigma + \Sigma S =
# \delta\Sigma$,
#
# $$u^\top G_W u = \|\delta\mu\|^2 + \operatorname{tr}(S \Sigma S).$$
#
# `kwng_jax.exact.gaussian_metric` evaluates this. The *naive* metric
# $\mathbb E[J^\top J]$ (with $J = \partial X / \partial \theta$), which moves
# every sample independently, is the identity in this parametrization, so the
# "naive natural gradient" is just $g$. It differs from $G_W$ because
# $\partial X / \partial A_{21}$ is not a gradient field: part of that motion
# is a rotation that does not change the law. A correlated Gaussian makes the
# difference large.
#
# The loss is the squared Wasserstein distance to a target Gaussian,
# $L(\theta) = W_2^2(\mathcal N(\mu, \Sigma), \mathcal N(\mu^*, \Sigma^*))$,
# in closed form (`exact.gaussian_wasserstein_sq`).

# %%
theta = exact.gaussian_pack(jnp.array([0.5, -0.3]), jnp.array([[1.0, 0.0], [2.0, 0.3]]))
target = exact.gaussian_pack(jnp.array([2.0, 1.0]), jnp.array([[0.5, 0.0], [-0.3, 1.5]]))


def loss_fn(theta):
  return exact.gaussian_wasserstein_sq(theta, target)


grads = jax.grad(loss_fn)(theta)
metric = exact.gaussian_metric(theta)
exact_direction = exact.wasserstein_natural_gradient(metric, grads, EPSILON)


def relative_error(estimate):
  return float(jnp.linalg.norm(estimate - exact_direction) / jnp.linalg.norm(exact_direction))


print('eigenvalues of G_W:', np.round(np.linalg.eigvalsh(metric), 3))
print('naive metric E[J^T J]:\n', np.round(exact.gaussian_naive_metric(theta), 3))
print(f'relative error of the plain gradient as a natural gradient: {relative_error(grads):.2f}')

# %% [markdown]
# ## One KWNG estimate
#
# `kwng_jax.natural_gradient` is the optax-free entry point. It needs the
# gradient, a function `outputs_fn(params) -> samples` of shape `(N, d)`, and
# a key for the random basis. We use `damping='identity'` ($D = I$), so that
# the estimate targets $(G_W + \epsilon I)^{-1} g$, which is what
# `exact.wasserstein_natural_gradient` returns.
#
# The second return value holds diagnostics (device scalars): the kernel
# `bandwidth` chosen from the samples, the `effective_rank` of $Q$ kept by the
# whitening (at most $M$), the `alignment` $\langle g, \hat g \rangle$ (positive
# for a descent direction), `fallback` (whether an optimizer would fall back
# to $g$) and `finite_inputs`. Notebook 04 reads them in detail.


# %%
def kwng_estimate(theta, grads, key, num_samples, num_basis):
  noise_key, basis_key = jax.random.split(key)
  z = jax.random.normal(noise_key, (num_samples, 2), dtype=theta.dtype)

  def outputs_fn(theta):  # The N samples, differentiable in theta.
    return exact.gaussian_sample(theta, z)

  return kwng_jax.natural_gradient(
      grads, outputs_fn, theta, key=basis_key, num_basis=num_basis,
      epsilon=EPSILON, damping='identity')


# The sizes are static: one compilation per (N, M).
kwng_estimate = jax.jit(kwng_estimate, static_argnames=('num_samples', 'num_basis'))

direction, info = kwng_estimate(theta, grads, root_key, num_samples=1600, num_basis=40)
print('exact WNG:', np.round(exact_direction, 3))
print('KWNG     :', np.round(direction, 3))
print(f'relative error {relative_error(direction):.3f}')
print(info)

# %% [markdown]
# ## Accuracy as $N$ grows
#
# With $M = \sqrt N$ basis functions the estimate converges to the exact
# Wasserstein natural gradient. Each point below is the median over
# `NUM_REPEATS` independent draws of the samples and of the basis; the band
# spans the 25th to 75th percentiles. The dashed line is the naive natural
# gradient, here $g$ itself: KWNG is not just a cheaper way to compute
# $\mathbb E[J^\top J]^{-1} g$; it projects the sample motions onto gradient
# fields, which is what makes it the *Wasserstein* metric.

# %%
errors = np.zeros((len(SAMPLE_SIZES), NUM_REPEATS))
for i, num_samples in enumerate(SAMPLE_SIZES):
  num_basis = int(round(np.sqrt(num_samples)))
  for r in range(NUM_REPEATS):
    key = jax.random.fold_in(root_key, 1000 * i + r)
    direction, _ = kwng_estimate(theta, grads, key, num_samples=num_samples, num_basis=num_basis)
    errors[i, r] = relative_error(direction)
  print(f'N = {num_samples:5d}, M = {num_basis:3d}: median relative error {np.median(errors[i]):.3f}')

fig, ax = plt.subplots(figsize=(5.5, 4))
ax.plot(SAMPLE_SIZES, np.median(errors, axis=1), 'o-', label='KWNG, $M = \\sqrt{N}$')
ax.fill_between(SAMPLE_SIZES, *np.percentile(errors, [25, 75], axis=1), alpha=0.3)
ax.axhline(relative_error(grads), color='k', linestyle='--',
           label='naive metric $\\mathbb{E}[J^\\top J]$ ($= g$ here)')
ax.set(xscale='log', yscale='log', xlabel='number of samples $N$',
       ylabel='relative error vs exact $G_W^{-1} g$',
       title='KWNG converges to the Wasserstein natural gradient')
ax.legend()
plt.show()

# %% [markdown]
# ## Optimization: KWNG against gradient descent
#
# Now we minimize $L$ from the same start. To show what a natural gradient
# buys, we optimize in *badly scaled* coordinates: the model sees
# $s \odot \vartheta$ with fixed scales $s = (1, 0.1, 1, 0.1, 0.3)$, a mere
# change of units. Gradient descent is not invariant to it: the effective
# step of coordinate $j$ is multiplied by $s_j^2$, so the learning rate that is
# stable for the large coordinates crawls on the small ones. A natural
# gradient is invariant to such a reparametrization (exactly for the exact
# metric, up to sampling error for KWNG): the steps it takes in the space of
# distributions are the same in any coordinates.
#
# **The recommended optimizer**, `kwng_jax.kwng(learning_rate, num_basis=...)`,
# is an Optax chain: `scale_by_kwng` (the estimate $\hat g$, with a fallback
# to $g$ if $\hat g$ is not a descent direction) →
# `scale_by_displacement` → a running average of the steps (momentum 0.9,
# for the noise of minibatches) → the learning rate, with $\epsilon$ adapted
# from the loss at every step. Its update needs `outputs_fn=` (fresh samples each
# step) and `value=` (the loss, for the adaptation of $\epsilon$).
# `scale_by_displacement` measures how far a step would move the samples,
# the root mean square over the batch of $\|J_n u\|$ (one `jax.jvp` of
# `outputs_fn`; to first order an upper bound on the $W_2$ distance the law
# moves), and shortens steps that move them by more than 1. So **the
# learning rate is the largest RMS distance the samples move in one step**,
# in the units of the samples, whatever the parametrization; closer to the
# target, where $\hat g$ moves them less, the step is simply
# $\mathrm{lr}\,\hat g$. The default learning rate is 1.
#
# Here the loss is $W_2^2$, whose gradient with respect to a sample is twice
# its displacement to the optimal transport target: a natural-gradient step
# with learning rate $1/2$ moves every sample straight onto the target, to
# first order (with 1 they would overshoot to the other side). So we use
# a learning rate of 0.5: far from the target the samples move by $0.5$ per
# step, and once they are within $0.5$ of it a step lands on it.
#
# Four optimizers:
#
# * gradient descent, `optax.sgd`;
# * KWNG, `kwng_jax.kwng(LEARNING_RATE, num_basis=NUM_BASIS, momentum=None)`:
#   without its momentum, so that each step follows the rule above and can
#   be compared step by step with the exact natural gradient;
# * the optimizer of the paper's experiments,
#   `kwng_jax.published_kwng(LEARNING_RATE, num_basis=NUM_BASIS)`: the same
#   estimate, but the direction is clipped to Euclidean norm 1 *in parameter
#   space* (`max_norm=1`) before the learning rate, and $\epsilon$ is adapted
#   by the published rule. A length in parameter space is exactly what a
#   change of units distorts;
# * the exact Wasserstein natural gradient
#   $G_\vartheta^{-1} g$, with $G_\vartheta = \operatorname{diag}(s)\,
#   G_W(s \odot \vartheta)\, \operatorname{diag}(s)$, as a reference. It
#   gets the same step rule as `kwng_jax.kwng`: `kwng_jax.scale_by_displacement`
#   is an ordinary Optax transformation, chained after a stateless one that
#   returns the exact direction.


# %%
scales = jnp.array([1.0, 0.1, 1.0, 0.1, 0.3])
start = theta / scales


def scaled_loss(vartheta):
  return loss_fn(vartheta * scales)


def exact_natural_gradient(grads, vartheta):
  metric = exact.gaussian_metric(vartheta * scales) * scales[:, None] * scales[None, :]
  return exact.wasserstein_natural_gradient(metric, grads, EPSILON)


def make_step(optimizer):
  """One jitted step: fresh samples, loss, gradient, optimizer update."""

  @jax.jit
  def step(vartheta, opt_state, key):
    z = jax.random.normal(key, (BATCH_SIZE, 2), dtype=vartheta.dtype)

    def outputs_fn(vartheta):
      return exact.gaussian_sample(vartheta * scales, z)

    loss, grads = jax.value_and_grad(scaled_loss)(vartheta)
    updates, opt_state = optimizer.update(
        grads, opt_state, vartheta, outputs_fn=outputs_fn, value=loss)
    return optax.apply_updates(vartheta, updates), opt_state, loss

  return step


optimizers = {
    'gradient descent': optax.sgd(GD_LEARNING_RATE),
    f'KWNG (M = {NUM_BASIS})': kwng_jax.kwng(LEARNING_RATE, num_basis=NUM_BASIS, momentum=None),
    f'published KWNG (M = {NUM_BASIS})': kwng_jax.published_kwng(
        LEARNING_RATE, num_basis=NUM_BASIS),
    'exact Wasserstein NG': optax.chain(
        optax.stateless(exact_natural_gradient),
        kwng_jax.scale_by_displacement(1.0),
        optax.scale_by_learning_rate(LEARNING_RATE),
    ),
}
histories = {}
for name, optimizer in optimizers.items():
  step = make_step(optimizer)
  vartheta = start
  opt_state = optimizer.init(vartheta)
  losses, path = [], [vartheta * scales]
  for t in range(NUM_STEPS):
    vartheta, opt_state, loss = step(vartheta, opt_state, jax.random.fold_in(root_key, t))
    losses.append(float(loss))
    path.append(vartheta * scales)
  losses.append(float(scaled_loss(vartheta)))
  histories[name] = {'loss': np.array(losses), 'path': np.stack(path)}
  print(f'{name:26s} final W2^2 = {losses[-1]:.2e}')

# %% [markdown]
# Left: the loss $W_2^2$ to the target over the steps (log scale; values
# below $10^{-12}$ are float64 roundoff and are clipped). KWNG follows the
# exact natural gradient: the samples first move by the learning rate at
# every step, in a straight line towards the target, then land on it. The
# published chain's clipping to norm 1 in parameter space lets the step
# shrink with the small scales, so in these coordinates it lags (undo the
# scaling, `scales = jnp.ones(5)`, and it keeps up; KWNG and the exact
# natural gradient do not change). Gradient descent stalls on the badly
# scaled coordinates. The other panels show each run in the plane: the
# $2\sigma$ ellipse of the model's law at a few steps (light to dark) against
# the target's (dashed black). The natural gradients move mean and
# covariance towards the target together; gradient descent fixes the
# well-scaled coordinates first and then barely moves the others.


# %%
def ellipse(theta_point, num_points=100):
  mu, a = exact.gaussian_unpack(theta_point)
  angles = np.linspace(0.0, 2.0 * np.pi, num_points)
  circle = 2.0 * np.stack([np.cos(angles), np.sin(angles)])
  return np.asarray(mu)[:, None] + np.asarray(a) @ circle


snapshots = sorted({0, 1, 2, 4, NUM_STEPS // 2, NUM_STEPS})
fig, axes = plt.subplot_mosaic([['loss', 'p0', 'p1'], ['loss', 'p2', 'p3']], figsize=(14, 8))
ax_loss, plane_axes = axes['loss'], [axes[f'p{i}'] for i in range(4)]
for (name, history), color, ax in zip(histories.items(), ['C0', 'C1', 'C2', 'C3'], plane_axes):
  ax_loss.plot(np.maximum(history['loss'], 1e-12), color=color, label=name)
  for t, shade in zip(snapshots, np.linspace(0.25, 1.0, len(snapshots))):
    ax.plot(*ellipse(history['path'][t]), color=plt.cm.viridis(1.0 - shade), label=f'step {t}')
  ax.plot(*ellipse(target), 'k--', linewidth=2, label='target')
  ax.set(aspect='equal', xlabel='$x_1$', ylabel='$x_2$', title=name)
plane_axes[0].legend(fontsize=8, loc='upper left')
ax_loss.set(yscale='log', xlabel='step', ylabel='$W_2^2$ to the target', title='Loss')
ax_loss.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Takeaways
#
# * `kwng_jax.natural_gradient(grads, outputs_fn, params, key=...)` estimates
#   the Wasserstein natural gradient from samples only; with enough samples
#   and basis functions it matches the exact one, which the naive metric
#   $\mathbb E[J^\top J]$ does not.
# * `kwng_jax.kwng(learning_rate, num_basis=...)` is the recommended Optax
#   optimizer built on it; `update` takes `outputs_fn=` and `value=`. Its
#   learning rate is the largest RMS distance the samples move in one step
#   (default 1), measured by `kwng_jax.scale_by_displacement`, which works
#   after any direction.
# * `kwng_jax.published_kwng(learning_rate, ...)` is the optimizer of the
#   paper's experiments (clipping to norm 1 in parameter space), kept for
#   parity with them.
# * With $M \ge P$ KWNG behaves like an exact natural gradient: invariant to the
#   units of the parameters. For neural networks $M \ll P$; notebook 02 shows
#   it on an ill-conditioned classifier, notebook 03 on a generative model
#   without a likelihood, and notebook 04 how to choose the kernel and read
#   the diagnostics.
