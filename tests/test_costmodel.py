"""`pgbatch bench --cost`: the real programs compiled from abstract shapes (tiny variants, host CPU)."""
import json

import pytest

from pgbatch import costmodel
from pgbatch.cli import main
from pgbatch.model import configs


@pytest.fixture(scope="module")
def reports():
  import contextlib
  import io
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    assert main(["bench", "--cost", "--variant", "tiny-pg1,tiny-pg2", "--batch", "4", "--new-tokens", "6"]) == 0
  return [json.loads(line) for line in buf.getvalue().splitlines()]


def test_cost_report_has_every_promised_key(reports):
  assert [(r["variant"], r["batch"], r["target"]) for r in reports] == [("tiny-pg1", 4, "cpu"), ("tiny-pg2", 4, "cpu")]
  for r in reports:
    assert set(r["phases"]) == {"siglip", "prefill", "decode_step"}
    for phase in r["phases"].values():
      assert phase["flops"] > 0 and phase["bytes"] > 0
    # prefill over 16 image + 8 prompt positions costs more than one decode step
    assert r["phases"]["prefill"]["flops"] > r["phases"]["decode_step"]["flops"]
    assert r["per_device_bytes"] >= r["weight_bytes_per_device"] > 0
    assert isinstance(r["fits"], bool) and r["fits"]
    assert r["phase_bytes_scaled"] == 0.5  # cpu: phases compiled in float32, bytes scaled to bfloat16
    assert set(r["predicted_img_s"]) == {"h100", "h200", "v5e"} and all(v > 0 for v in r["predicted_img_s"].values())


def test_decode_loop_never_copies_the_cache(reports):
  # The cache used to go through the layer loop as xs -> ys: 3 whole-cache copies per step in this program.
  assert [r["decode_cache_copies"] for r in reports] == [0, 0]


def test_depth_extrapolation_matches_the_unrolled_program():
  # cost_analysis counts a rolled loop once: phases come from depth 1 and 2, extrapolated to the real depth.
  import jax
  import numpy as np
  from jax.sharding import Mesh
  cfg = configs.get("tiny-pg2").with_depth(3, unroll=False)
  mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
  got = costmodel.phase_costs(cfg, 2, 4, 3, "float32", mesh)
  unrolled = costmodel.programs(cfg.with_depth(3, unroll=True), 2, 4, 3, "float32", mesh)
  for name in ("prefill", "decode_step", "encode"):
    want = costmodel._cost(unrolled[name]().compile())
    assert got[name]["flops"] == pytest.approx(want["flops"], rel=0.02), name
  rolled = costmodel._cost(costmodel.programs(cfg, 2, 4, 3, "float32", mesh)["prefill"]().compile())
  assert rolled["flops"] < 0.95 * got["prefill"]["flops"]  # the rolled loop counts one layer of three


def test_roofline_is_bound_by_the_slower_of_compute_and_memory():
  phases = {"siglip": {"flops": 1e12, "bytes": 0.0}, "prefill": {"flops": 0.0, "bytes": 3.35e12},
            "decode_step": {"flops": 0.0, "bytes": 3.35e11}}
  # H100: 1e12 / 989e12 + 1 s + 19 * 0.1 s for 64 images
  assert costmodel.roofline(phases, 64, 20)["h100"] == round(64 / (1e12 / 989e12 + 1 + 1.9), 1)
