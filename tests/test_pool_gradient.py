"""``dcil_jax.pool_gradient``: max-pool gradients whose index arrays XLA:CPU creates late.

The rewrite must change nothing but *when* memory is used: the same forward values and
gradients as ``jax.grad`` (ties after a ReLU included: the first maximum of a window gets the
gradient), and, in the compiled program, no index array without operands (which XLA:CPU's
scheduler puts at the start of the step). What it is for: a sequential DCIL step of a model
with a max-pool at the memory of dense training on CPU.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_same, lifted, tree_allclose

import dcil_jax
from dcil_jax.pool_gradient import late_pool_indices


class PoolCNN(nn.Module):
  """ResNet-ImageNet's stem in small (conv, BN, ReLU, 3x3/2 max-pool with padding), then two
  convs: the pool's input is the largest activation, as in ResNet-50."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(16, (3, 3), use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for width in (16, 32):
      x = nn.relu(nn.Conv(width, (3, 3))(x))
    return nn.Dense(5)(jnp.mean(x, axis=(1, 2)))


def stem_pool(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


POOLS = {
  "stem_3x3_s2_pad1": stem_pool,
  "vgg_2x2_s2": lambda x: nn.max_pool(x, (2, 2), strides=(2, 2)),
  "same_3x3_s1": lambda x: nn.max_pool(x, (3, 3), padding="SAME"),
  "in_a_nested_jit": jax.jit(stem_pool),
}


def objective(pool):
  """A scalar of a pooled ReLU (many ties: whole windows of zeros) and a pytree aux."""

  def fn(x, w):
    y = pool(jax.nn.relu(x * w))
    return jnp.sum(jnp.sin(y) * jnp.arange(y.shape[-1])), {"pooled": y}

  return fn


@pytest.fixture(scope="module")
def inputs():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 9, 3))
  return x.at[0, :4].set(0.0), jnp.float32(1.5)  # a block of exact ties


@pytest.mark.parametrize("name", POOLS)
def test_values_and_gradients_are_jax_grads(inputs, name):
  fn = objective(POOLS[name])
  want = jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))(*inputs)
  got = jax.jit(jax.value_and_grad(late_pool_indices(fn), argnums=(0, 1), has_aux=True))(*inputs)
  (value, aux), grads = got
  assert float(value) == float(want[0][0])
  np.testing.assert_array_equal(aux["pooled"], want[0][1]["pooled"])
  tree_allclose(grads, want[1], rtol=1e-6, atol=0)
  assert float(jnp.sum(grads[0] != 0)) > 0


def test_keyword_arguments_are_passed_through(inputs):
  """A keyword argument reaches ``fn`` (as a constant) and the gradient is still ``jax.grad``'s."""

  def fn(x, *, w):
    return objective(stem_pool)(x, w)[0]

  x, w = inputs
  want = jax.grad(fn)(x, w=w)
  tree_allclose(jax.grad(late_pool_indices(fn))(x, w=w), want, rtol=1e-6, atol=0)
  assert float(late_pool_indices(fn)(x, w=2 * w)) == float(fn(x, w=2 * w))


def test_a_dilated_pool_keeps_jax_gradient(inputs):
  """Pools with a base dilation are left to JAX (no rewrite, same gradient)."""

  def pool(x):
    return jax.lax.reduce_window(
      x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "VALID", base_dilation=(1, 2, 2, 1)
    )

  fn = objective(pool)
  want = jax.jit(jax.grad(fn, argnums=(0, 1), has_aux=True))(*inputs)
  tree_allclose(
    jax.jit(jax.grad(late_pool_indices(fn), argnums=(0, 1), has_aux=True))(*inputs), want
  )


def operand_free_index_arrays(fn, x) -> int:
  """How many int32 arrays of the padded pool input's shape the compiled gradient creates from
  nothing (an ``iota`` or a fusion without operands) in its entry computation."""
  text = jax.jit(jax.grad(fn)).lower(x).compile().as_text()
  entry = text[text.index("ENTRY") :]
  shape = ",".join(str(d + 2) if i in (1, 2) else str(d) for i, d in enumerate(x.shape))
  return len(re.findall(rf"= s32\[{shape}\]\{{[0-9,]*\}} (?:fusion|iota)\(\)", entry))


@pytest.mark.parametrize("name", ["stem_3x3_s2_pad1", "in_a_nested_jit"])
def test_the_index_arrays_have_operands(name):
  """XLA:CPU expands JAX's pool gradient with index arrays made from nothing, which its scheduler
  creates at the start of the step; the rewritten gradient has none."""
  if jax.default_backend() != "cpu":
    pytest.skip("XLA:CPU's expansion of select-and-scatter")
  x = jnp.ones((2, 8, 8, 4))

  def fn(x):
    return jnp.sum(POOLS[name](x) ** 2)

  assert operand_free_index_arrays(fn, x) >= 1  # the check can see them
  assert operand_free_index_arrays(late_pool_indices(fn), x) == 0


def test_sequential_dcil_with_a_max_pool_equals_unrolled():
  model, x = PoolCNN(), jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 3))
  variables = model.init(jax.random.PRNGKey(0), x[:1])
  dual, masks, stats = lifted(model, variables, x)
  batch = {"image": x, "label": jnp.arange(4) % 5}

  def run(strategy):
    def fn(p):
      return dcil_jax.dcil_loss(model, p, masks, batch, stats, kd_weight=1.0, strategy=strategy)

    return jax.jit(jax.value_and_grad(fn, has_aux=True))(dual)

  assert_same(run("sequential_unrolled"), run("unrolled"))


def step_temp_bytes(method: str, strategy: str | None = None) -> int:
  model, x = PoolCNN(), jnp.zeros((32, 32, 32, 3))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x[:1])
  tx = optax.sgd(0.1)
  if method == "dcil":
    mask = dcil_jax.masked_update(dcil_jax.constant_sparsity(0.5), update_every=4)
    tx, method = optax.chain(tx, mask), dcil_jax.DCIL(strategy=strategy)
  state = dcil_jax.TrainState.create(model, variables, tx, method=method, example_input=x[:1])
  batch = {"image": x, "label": jnp.zeros((32,), jnp.int32)}
  return dcil_jax.train_step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes


def test_a_sequential_step_with_a_max_pool_needs_the_memory_of_dense():
  """On CPU, the form ``"sequential"`` runs there (with JAX's pool gradient this model needed
  1.5x dense: the dense path's index arrays lived through the sparse path's peak)."""
  dense = step_temp_bytes("dense")
  sequential = step_temp_bytes("dcil", "sequential_unrolled")
  assert sequential < 1.1 * dense, (sequential, dense)
