"""Tests for jaxcert.checkpoint (orbax-backed training-state checkpoints)."""

import glob
import logging
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxcert import checkpoint as ckpt_lib
from jaxcert.checkpoint import Checkpointer, CheckpointError, restore_latest


class _Net(nnx.Module):

  def __init__(self, rngs):
    self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.dense = nnx.Linear(4, 3, rngs=rngs)


def _model(seed=0):
  return _Net(nnx.Rngs(seed))


def make_state(seed=0, *, batch_stats=True, opt="inject"):
  """A realistic training state: nnx params, optax state, step, rng key data."""
  model = _model(seed)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  # Make every leaf distinct from a freshly-initialised one.
  params = jax.tree.map(lambda x: x + 0.25 * (seed + 1), params)
  bs = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)) if batch_stats else {}
  if opt == "inject":
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)
  elif opt == "chain":
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.inject_hyperparams(optax.adam)(learning_rate=optax.linear_schedule(
                         1e-3, 1e-4, 100)))
  else:
    tx = optax.adam(1e-3)
  opt_state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = tx.update(grads, opt_state, params)  # non-trivial mu/nu/count
  return {
      "params": params,
      "batch_stats": bs,
      "opt_state": opt_state,
      "step": jnp.int32(17 + seed),
      "rng": jax.random.key_data(jax.random.key(seed)),
  }


def assert_same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  chex.assert_trees_all_equal(a, b)
  chex.assert_trees_all_equal_dtypes(a, b)
  chex.assert_trees_all_equal_shapes(a, b)


def _zeros_like(state):
  return jax.tree.map(jnp.zeros_like, state)


def _ckdir(workdir):
  return os.path.join(str(workdir), "checkpoints")


def _steps_on_disk(workdir):
  return sorted(int(n) for n in os.listdir(_ckdir(workdir)) if n.isdigit())


@pytest.mark.parametrize("opt", ["inject", "chain", "adam"])
def test_round_trip_realistic_state(tmp_path, opt):
  state = make_state(1, opt=opt)
  with Checkpointer(str(tmp_path)) as ck:
    assert ck.latest_step() is None
    assert ck.save(5, state)
    assert ck.latest_step() == 5
    restored = ck.restore(_zeros_like(state))
  assert_same(restored, state)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(restored))
  # opt_state keeps its NamedTuple types (not orbax's dicts/lists).
  assert type(restored["opt_state"]) is type(state["opt_state"])
  # A fresh Checkpointer (new process after restart) reads it back too.
  with Checkpointer(str(tmp_path)) as ck:
    assert_same(ck.restore(_zeros_like(state), 5), state)


def test_restore_into_abstract_and_numpy_targets(tmp_path):
  state = make_state(2)
  with Checkpointer(str(tmp_path)) as ck:
    ck.save(1, state)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    assert_same(ck.restore(abstract), state)
    as_numpy = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), state)
    as_numpy["step"] = np.int32(0)  # numpy scalar leaf
    restored = ck.restore(as_numpy)
  assert isinstance(restored["step"], jax.Array)
  assert_same(restored, state)


def test_empty_dicts_round_trip_and_are_lenient(tmp_path):
  state = make_state(0, batch_stats=False)
  state["extra"] = {"nested_empty": {}, "tup": ()}
  assert state["batch_stats"] == {}
  with Checkpointer(str(tmp_path)) as ck:
    ck.save(3, state)
    assert_same(ck.restore(_zeros_like(state)), state)
    # A target without the empty containers has the same leaves: accepted,
    # and the result has the target's structure.
    slim = {k: v for k, v in _zeros_like(state).items() if k not in ("batch_stats", "extra")}
    restored = ck.restore(slim)
    assert jax.tree.structure(restored) == jax.tree.structure(slim)
    chex.assert_trees_all_equal(restored["params"], state["params"])
  # ... and the other way round: stored without, target with empty containers.
  with Checkpointer(str(tmp_path / "b")) as ck:
    ck.save(1, {k: v for k, v in state.items() if k not in ("batch_stats", "extra")})
    assert_same(ck.restore(_zeros_like(state)), state)


def test_typed_prng_key_round_trip(tmp_path):
  state = {"w": jnp.arange(3.0), "key": jax.random.key(7)}
  with Checkpointer(str(tmp_path)) as ck:
    ck.save(1, state)
    restored = ck.restore({"w": jnp.zeros(3), "key": jax.random.key(0)})
  assert jnp.issubdtype(restored["key"].dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(jax.random.key_data(restored["key"]),
                                jax.random.key_data(state["key"]))


def test_specific_step_and_max_to_keep(tmp_path):
  states = {s: make_state(s) for s in range(5)}
  with Checkpointer(str(tmp_path), max_to_keep=2) as ck:
    for s in range(5):
      assert ck.save(s * 10, states[s])
    assert ck.latest_step() == 40
    assert ck.all_steps() == [30, 40]
    assert _steps_on_disk(tmp_path) == [30, 40]
    assert_same(ck.restore(_zeros_like(states[3]), step=30), states[3])
    assert_same(ck.restore(_zeros_like(states[4])), states[4])
    with pytest.raises(CheckpointError, match=r"no checkpoint for step 10") as ei:
      ck.restore(_zeros_like(states[1]), step=10)
    assert _ckdir(tmp_path) in str(ei.value) and "[30, 40]" in str(ei.value)


def test_save_interval_and_force(tmp_path):
  state = make_state(0)
  with Checkpointer(str(tmp_path), save_interval_steps=5) as ck:
    assert ck.save(0, state)
    assert not ck.save(3, state)
    assert ck.save(5, state)
    assert not ck.save(5, state)  # not newer than the latest
    assert ck.save(7, state, force=True)
    assert ck.all_steps() == [0, 5, 7]
    with pytest.raises(CheckpointError, match="already exists"):
      ck.save(7, state, force=True)


def test_save_survives_donation(tmp_path):
  state = make_state(3)
  expected = jax.tree.map(np.array, state)

  bump_donating = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)
  with Checkpointer(str(tmp_path)) as ck:
    ck.save(1, state)
    new = bump_donating(state)  # state's buffers may now be reused
    jax.block_until_ready(new)
    restored = ck.restore(_zeros_like(new), 1)
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, restored), expected)


def test_restore_latest(tmp_path):
  state = make_state(4)
  with Checkpointer(str(tmp_path)) as ck:
    ck.save(2, make_state(0))
    ck.save(9, state)
  step, restored = restore_latest(str(tmp_path), _zeros_like(state))
  assert step == 9
  assert_same(restored, state)


def test_missing_workdir(tmp_path):
  missing = str(tmp_path / "nope")
  with pytest.raises(CheckpointError) as ei:
    restore_latest(missing, make_state())
  assert missing in str(ei.value)
  assert f"--workdir={missing}" in str(ei.value)
  assert not os.path.exists(missing)  # nothing created


def test_empty_workdir(tmp_path):
  with pytest.raises(CheckpointError, match="no checkpoints") as ei:
    restore_latest(str(tmp_path), make_state())
  assert str(tmp_path) in str(ei.value)
  os.makedirs(_ckdir(tmp_path))
  with pytest.raises(CheckpointError, match="no checkpoints") as ei:
    restore_latest(str(tmp_path), make_state())
  assert str(tmp_path) in str(ei.value)
  with Checkpointer(str(tmp_path)) as ck, pytest.raises(CheckpointError, match="no checkpoints"):
    ck.restore(make_state())


# After a failed read, orbax/tensorstore sometimes completes a future on the already
# closed asyncio loop of the restore ("Event loop is closed"); harmless, not ours.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("how", ["truncate", "delete"])
def test_corrupt_checkpoint(tmp_path, how):
  state = make_state(0)
  with Checkpointer(str(tmp_path)) as ck:
    ck.save(1, state)
    ck.save(2, state)
  step_dir = os.path.join(_ckdir(tmp_path), "2")
  data = [f for f in glob.glob(os.path.join(step_dir, "**", "d", "*"), recursive=True)
          if os.path.isfile(f)]
  assert data, "expected orbax data files"
  for f in data:
    if how == "truncate":
      with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)
    else:
      os.remove(f)
  with pytest.raises(CheckpointError) as ei:
    restore_latest(str(tmp_path), _zeros_like(state))
  msg = str(ei.value)
  assert step_dir in msg and "step 2" in msg and "corrupt" in msg
  assert ei.value.__cause__ is not None  # orbax's error is chained, not lost
  # The earlier step is intact.
  with Checkpointer(str(tmp_path)) as ck:
    assert_same(ck.restore(_zeros_like(state), 1), state)


def test_structure_mismatch(tmp_path):
  state = make_state(0)
  with Checkpointer(str(tmp_path)) as ck:
    ck.save(1, state)
    step_dir = os.path.join(_ckdir(tmp_path), "1")

    extra = _zeros_like(state)
    extra["params"]["head"] = {"kernel": jnp.zeros((3, 2))}
    with pytest.raises(CheckpointError, match="does not match the target structure") as ei:
      ck.restore(extra)
    assert step_dir in str(ei.value) and "params/head/kernel" in str(ei.value)

    fewer = _zeros_like(state)
    del fewer["rng"]
    with pytest.raises(CheckpointError, match="does not match the target structure") as ei:
      ck.restore(fewer)
    assert "rng" in str(ei.value)

    other_opt = _zeros_like(make_state(0, opt="chain"))
    with pytest.raises(CheckpointError, match="does not match the target structure"):
      ck.restore(other_opt)

    shape = _zeros_like(state)
    shape["params"]["dense"]["kernel"] = jnp.zeros((5, 3))
    with pytest.raises(CheckpointError, match="shape") as ei:
      ck.restore(shape)
    assert "params/dense/kernel" in str(ei.value)

  with pytest.raises(CheckpointError, match="does not match") as ei:
    restore_latest(str(tmp_path), extra)
  assert step_dir in str(ei.value)


# Orbax >= 0.11 names it "<step>.orbax-checkpoint-tmp", older ones add "-<timestamp>".
@pytest.mark.parametrize("suffix", [".orbax-checkpoint-tmp", ".orbax-checkpoint-tmp-1234567"])
def test_leftover_tmp_dir_is_ignored(tmp_path, suffix):
  state = make_state(0)
  with Checkpointer(str(tmp_path)) as ck:
    ck.save(1, state)
  # An interrupted save of step 2: orbax's not-yet-renamed tmp directory.
  tmp_dir = os.path.join(_ckdir(tmp_path), "2" + suffix)
  os.makedirs(os.path.join(tmp_dir, "default"))
  with open(os.path.join(tmp_dir, "default", "partial"), "wb") as f:
    f.write(b"\0" * 10)
  # Read-only access (certify) ignores it and leaves it alone.
  step, restored = restore_latest(str(tmp_path), _zeros_like(state))
  assert step == 1
  assert_same(restored, state)
  assert os.path.isdir(tmp_dir)
  # A writer ignores it too, and a later save of that step works.
  with Checkpointer(str(tmp_path)) as ck:
    assert ck.latest_step() == 1
    assert ck.save(2, make_state(5))
    assert ck.all_steps() == [1, 2]
    assert_same(ck.restore(_zeros_like(state)), make_state(5))
  assert sorted(os.listdir(_ckdir(tmp_path))) == ["1", "2"]  # the writer removed the leftover


def test_closed_checkpointer(tmp_path):
  ck = Checkpointer(str(tmp_path))
  ck.close()
  ck.close()  # idempotent
  with pytest.raises(CheckpointError, match="closed"):
    ck.save(1, make_state())


def test_orbax_info_logging_is_filtered(tmp_path, caplog):
  with caplog.at_level(logging.INFO, logger="absl"):
    with Checkpointer(str(tmp_path)) as ck:
      ck.save(1, make_state())
      ck.restore(_zeros_like(make_state()))
  orbax_info = [r for r in caplog.records
                if r.levelno < logging.WARNING and f"{os.sep}orbax{os.sep}" in r.pathname]
  assert not orbax_info
  # Orbax warnings and errors, and other libraries' INFO, still pass the filter.
  filt = ckpt_lib._DropOrbaxInfo()
  orbax_file = os.path.join("site-packages", "orbax", "checkpoint", "x.py")
  def rec(level, path, msg="something"):
    return logging.LogRecord("absl", level, path, 1, msg, None, None)
  assert filt.filter(rec(logging.WARNING, orbax_file))
  assert filt.filter(rec(logging.ERROR, orbax_file))
  assert filt.filter(rec(logging.INFO, os.path.join("jaxcert", "training.py")))
  assert not filt.filter(rec(logging.INFO, orbax_file))
