"""Accelerator placement on a real multi-node Ray cluster (`ray.cluster_utils.Cluster`): a head with CPUs only and
two worker "nodes" that declare `{"TPU": 4}` and `{"GPU": 1}`. The same tiny job runs with `accelerator: tpu`
and then `gpu`; the annotate actors must land only on the node with that resource (JAX runs on CPU there:
there is no real TPU or GPU on this machine), the CPU stages never on the accelerator nodes' accelerators, and
the output must be complete. Then actor robustness: an actor hit by a fatal device error is replaced and the
job completes; actors that cannot be placed fail the job within `wait_for_actors_s` instead of hanging it."""
from __future__ import annotations

import os
import sys
import time

import pyarrow.parquet as pq
import pytest

from pgbatch import config, demo, pipeline, placement
from tests import pipeline_helpers as H


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
  H.token_auth()
  # The nodes' workers inherit this: the gpu run reuses what the tpu run compiled.
  os.environ["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "pgbatch-jax-cache")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  import ray
  from ray import cloudpickle
  from ray.cluster_utils import Cluster
  cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
  c = Cluster(initialize_head=True, head_node_args=dict(num_cpus=2, include_dashboard=False,
                                                        object_store_memory=256 << 20))
  nodes = {"tpu": c.add_node(num_cpus=1, resources={"TPU": 4}, object_store_memory=256 << 20),
           "gpu": c.add_node(num_cpus=1, num_gpus=1, object_store_memory=256 << 20)}
  c.wait_for_nodes()
  ray.init(address=c.address, logging_level="WARNING")
  try:
    yield {"head": c.head_node.node_id, **{k: n.node_id for k, n in nodes.items()}}
  finally:
    ray.shutdown()
    c.shutdown()
    for k in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
      os.environ.pop(k, None)


@pytest.fixture(scope="module")
def job_parts(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("cluster")
  ckpt, tok = H.tiny_model(tmp / "model")
  rows = demo.samples()
  demo.write_shards(tmp / "shards", [rows[0], rows[1], rows[-1]], shards=1, prefix="c")
  return tmp, ckpt, tok


def annotate_actor_nodes() -> set[str]:
  """Node ids that hosted a Ray Data annotate actor (alive or dead) so far."""
  from ray._private.state import state
  return {a["Address"]["NodeID"] for a in state.actor_table(None).values()
          if "Annotator" in a.get("ActorClassName", "") and a.get("Address", {}).get("NodeID")}


@pytest.mark.parametrize("accelerator,chips", [("tpu", 4), ("gpu", 1)])
def test_annotate_actors_only_on_accelerator_nodes(cluster, job_parts, accelerator, chips):
  tmp, ckpt, tok = job_parts
  before = annotate_actor_nodes()
  out = tmp / f"out-{accelerator}"
  spec = config.from_dict(H.job(
      f"cluster-{accelerator}", str(tmp / "shards" / "*.tar"), str(out) + "/", ckpt, tok, fast_safety=True,
      tasks=[{"name": "caption_en", "kind": "caption", "lang": "en", "max_new_tokens": 4}],
      resources={"accelerator": accelerator, "actors": 1, "chips_per_actor": chips, "batch_size": 4,
                 "wait_for_actors_s": 120}), environ={})
  summary = pipeline.run(spec, progress=False)
  assert summary.success, summary.failure
  assert (summary.images, summary.ok, summary.error) == (3, 2, 1)
  placed = annotate_actor_nodes() - before
  assert placed == {cluster[accelerator]}, f"annotate actors ran on {placed}, expected the {accelerator} node"
  (f,) = out.glob("*.parquet")
  table = pq.read_table(str(f))
  assert sorted(table.column("status").to_pylist()) == ["error", "ok", "ok"]
  texts = [c["text"] for c, s in zip(table.column("caption_en").to_pylist(), table.column("status").to_pylist())
           if s == "ok"]
  assert all(isinstance(t, str) for t in texts)


# --- actor robustness ---------------------------------------------------------------------------------------


class CrashOnce:
  """An annotate-like actor whose first batch hits a TPU failure: the first process to see it exits."""

  def __init__(self, marker: str):
    self.marker = marker

  def __call__(self, batch):
    try:
      if not os.path.exists(self.marker):
        with open(self.marker, "w") as f:
          f.write(str(os.getpid()))
        raise RuntimeError("UNAVAILABLE: TPU halted")
      batch["pid"] = [os.getpid()] * len(batch["id"])
      return batch
    except Exception as e:
      placement.exit_if_fatal(e)
      raise


def test_fatal_error_actor_is_replaced(cluster, tmp_path):
  import ray.data
  res = {"accelerator": "tpu", "chips_per_actor": 4, "actors": 1, "no_progress_timeout_s": 120,
         "wait_for_actors_s": 60}
  placement.configure_data_context(ray.data.DataContext.get_current(), res)
  marker = str(tmp_path / "crashed")
  rows = ray.data.range(16, override_num_blocks=4).map_batches(
      CrashOnce, fn_constructor_args=(marker,), batch_size=4, **placement.annotate_ray_args(res)).take_all()
  assert sorted(r["id"] for r in rows) == list(range(16))  # every row, the crashed batch retried
  crashed_pid = int(open(marker).read())
  assert crashed_pid not in {r["pid"] for r in rows}        # ... by a new actor process


def test_unplaceable_actors_fail_instead_of_hanging(cluster, tmp_path):
  import ray.data
  from ray.exceptions import GetTimeoutError
  res = {"accelerator": "tpu", "chips_per_actor": 8, "wait_for_actors_s": 3}   # the TPU node has 4 chips
  placement.configure_data_context(ray.data.DataContext.get_current(), res)
  t0 = time.monotonic()
  with pytest.raises(GetTimeoutError, match="starting actors"):
    ray.data.range(4).map_batches(CrashOnce, fn_constructor_args=(str(tmp_path / "m"),), batch_size=4,
                                  **placement.annotate_ray_args(res)).take_all()
  assert time.monotonic() - t0 < 60
