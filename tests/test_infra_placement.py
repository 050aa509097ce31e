"""Unit tests of `pgbatch.placement`: resources → Ray args, mesh shapes, fatal errors, init retries.
(On a real Ray cluster: tests/test_infra_cluster.py.)"""
import pytest

from pgbatch import placement


def test_cpu_default_args():
  args = placement.annotate_ray_args(None)
  assert args["compute"].min_size == args["compute"].max_size == 1
  assert "num_gpus" not in args and "resources" not in args
  assert args["runtime_env"]["env_vars"]["JAX_PLATFORMS"] == "cpu"
  assert "max_restarts" not in args  # Ray Data's defaults (-1); test_fatal_error_actor_is_replaced checks them


def test_gpu_args_from_dict():
  args = placement.annotate_ray_args({"accelerator": "gpu", "actors": 3, "chips_per_actor": 2,
                                      "memory_fraction": 0.6})
  assert args["num_gpus"] == 2 and args["compute"].max_size == 3
  env = args["runtime_env"]["env_vars"]
  assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.60"
  assert "JAX_PLATFORMS" not in env  # JAX picks the GPU


def test_tpu_args_from_object():
  class Res:  # any object with attributes works (the JobSpec's pydantic model)
    accelerator, actors, chips_per_actor, batch_size = "TPU", 2, 8, 32
  args = placement.annotate_ray_args(Res())
  assert args["resources"] == {"TPU": 8} and "num_gpus" not in args
  assert args["runtime_env"]["env_vars"] == {"PGBATCH_ACCELERATOR": "tpu"}


def test_concurrent_batches_overlap_on_accelerators_only():
  cpu = placement.annotate_ray_args(None)["compute"]
  assert not cpu.enable_true_multi_threading  # Ray Data's single-threaded default
  for acc in ("gpu", "tpu"):
    pool = placement.annotate_ray_args({"accelerator": acc})["compute"]
    assert pool.max_concurrent_calls_per_actor == 2 and pool.enable_true_multi_threading
  pool = placement.annotate_ray_args({"accelerator": "gpu", "concurrent_batches": 1})["compute"]
  assert not pool.enable_true_multi_threading
  with pytest.raises(ValueError, match="concurrent_batches"):
    placement.annotate_ray_args({"accelerator": "gpu", "concurrent_batches": 0})
  from pgbatch import config  # the job spec field, checked at load
  assert placement.concurrent_batches(config.ResourcesSpec(accelerator="tpu", concurrent_batches=3)) == 3
  with pytest.raises(ValueError, match="concurrent_batches"):
    config.ResourcesSpec(accelerator="tpu", concurrent_batches=0)


def test_map_batches_accepts_args():
  import inspect
  import ray.data
  params = inspect.signature(ray.data.Dataset.map_batches).parameters
  for key in ("cpu", "gpu", "tpu"):
    for name in placement.annotate_ray_args({"accelerator": key}):
      assert name in params and name != "ray_remote_args"  # named parameters only (**ray_remote_args is deprecated)


@pytest.mark.parametrize("bad", [{"accelerator": "fpga"}, {"actors": 0}, {"chips_per_actor": 0}])
def test_bad_resources(bad):
  with pytest.raises(ValueError):
    placement.annotate_ray_args(bad)


def test_cpu_stage_env():
  assert placement.cpu_stage_env() == {"env_vars": {"JAX_PLATFORMS": "cpu"}}


def test_configure_data_context_bounds_waits():
  from ray.data import DataContext
  ctx = placement.configure_data_context(DataContext(), {"actors": 4, "no_progress_timeout_s": 60})
  assert ctx.actor_init_retry_on_errors and ctx.actor_init_max_retries == 3
  assert ctx.max_consecutive_actor_init_deaths == 8
  assert ctx.execution_no_progress_timeout_s == 60 and ctx.wait_for_min_actors_s > 0


@pytest.mark.parametrize("n,variant,kind,expect", [
    (8, "pg2-28b-224", "tpu", (1, 8)),
    (4, "pg2-28b-896", "gpu", (1, 4)),
    (8, "pg2-3b-224", "tpu", (8, 1)),       # 6 GB bf16 fits half a v5e chip
    (8, "pg2-10b-448", "tpu", (2, 4)),      # 20 GB bf16: 4-way model sharding on 16 GB chips
    (8, "pg2-10b-448", "gpu", (8, 1)),      # fits one H100
    (1, "pg2-10b-448", "tpu", (1, 1)),      # nothing to shard over
    (8, "tiny-pg2", "cpu", (8, 1)),
    (6, "pg1-3b-224", "tpu", (6, 1)),
])
def test_mesh_shape(n, variant, kind, expect):
  data, model = placement.mesh_shape(n, variant, accelerator_kind=kind)
  assert (data, model) == expect and data * model == n


def test_mesh_shape_respects_heads_and_memory():
  # 10B on 8 devices with 4 GB each: needs model >= 5 → 8 (divides 16 heads).
  assert placement.mesh_shape(8, "pg2-10b-224", device_memory_bytes=4 << 30) == (1, 8)
  with pytest.raises(ValueError):
    placement.mesh_shape(0, "tiny-pg1")


class XlaRuntimeError(RuntimeError):
  """Same name as jaxlib's, which is what the check keys on."""


@pytest.mark.parametrize("exc,fatal", [
    (RuntimeError("CUDA_ERROR_ILLEGAL_ADDRESS: an illegal memory access"), True),
    (XlaRuntimeError("DATA_LOSS: TPU chip 3 reported an uncorrectable error"), True),
    (XlaRuntimeError("UNAVAILABLE: TPU halted"), True),
    (XlaRuntimeError("INVALID_ARGUMENT: shapes do not match"), False),
    (XlaRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 2GiB"), False),
    (RuntimeError("Unable to initialize backend 'tpu': ABORTED: device busy"), True),
    (ValueError("bad image"), False),
    (KeyError("UNAVAILABLE"), False),
])
def test_is_fatal_device_error(exc, fatal):
  assert placement.is_fatal_device_error(exc) is fatal


def test_fatal_error_found_in_cause_chain():
  try:
    try:
      raise XlaRuntimeError("DATA_LOSS: HBM parity")
    except XlaRuntimeError as inner:
      raise ValueError("batch failed") from inner
  except ValueError as outer:
    assert placement.is_fatal_device_error(outer)


def test_exit_if_fatal_calls_exit_only_for_fatal():
  codes = []
  placement.exit_if_fatal(ValueError("x"), exit_fn=codes.append)
  placement.exit_if_fatal(RuntimeError("GPU has fallen off the bus"), exit_fn=codes.append)
  assert codes == [1]


def test_init_with_retry_retries_then_succeeds():
  calls, sleeps = [], []
  def make():
    calls.append(1)
    if len(calls) < 3:
      raise OSError("checkpoint read timed out")
    return "engine"
  assert placement.init_with_retry(make, retries=3, backoff_s=1, sleep=sleeps.append) == "engine"
  assert len(calls) == 3 and sleeps == [1, 2]


def test_init_with_retry_gives_up():
  def make():
    raise OSError("still down")
  with pytest.raises(OSError, match="still down"):
    placement.init_with_retry(make, retries=2, backoff_s=0, sleep=lambda s: None)


def test_tpu_slice_helpers():
  assert placement.tpu_slice_supported()  # Ray 2.60 ships ray.util.tpu slice placement groups
  assert placement.tpu_chips_per_host(None) == 8
  assert placement.tpu_chips_per_host("2x4", "v5litepod") == 8
  assert placement.tpu_chips_per_host("4x4", "v5litepod") == 4  # 4 hosts x 4 chips


@pytest.mark.parametrize("res,chips", [
    ({"accelerator": "tpu", "topology": "2x4"}, 8),                          # one v5e host, all its chips
    ({"accelerator": "tpu", "topology": "4x4", "chips_per_actor": 4}, 4),    # each host of a 4-host slice
    ({"accelerator": "tpu", "chips_per_actor": 8}, 8),
    ({"accelerator": "gpu", "topology": "2x4", "chips_per_actor": 2}, 2),    # topology is a TPU notion
])
def test_tpu_chips_from_topology(res, chips):
  assert placement.chips_per_actor(res) == chips
  args = placement.annotate_ray_args(res)
  assert args.get("resources", {}).get("TPU", args.get("num_gpus")) == chips


def test_tpu_chips_conflicting_with_topology():
  with pytest.raises(ValueError, match="topology 2x4 has 8 chips"):
    placement.annotate_ray_args({"accelerator": "tpu", "topology": "2x4", "chips_per_actor": 4})
