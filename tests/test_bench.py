"""The benchmark runs on CPU and reports every figure it promises (no timing assertions)."""
import json

from pgbatch.bench import flops_per_image
from pgbatch.cli import main
from pgbatch.model import configs


def test_flops_model_matches_reference_estimate():
  # The estimate for PaliGemma 1 3B-224 with 20 new tokens: about 1.35 TFLOP per image.
  flops = flops_per_image(configs.get("pg1-3b-224"), prompt_len=4, new_tokens=20)
  assert 1.30e12 < flops < 1.40e12


def test_bench_prints_json_per_batch(capsys):
  assert main(["bench", "--variant", "tiny-pg1", "--batch", "1,2", "--new-tokens", "3", "--repeats", "1",
               "--dtype", "float32"]) == 0
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [r["batch"] for r in rows] == [1, 2]
  for r in rows:
    assert r["images_per_s"] > 0 and r["prefill_seconds"] > 0 and 0 < r["mfu"] < 1
    assert r["peak_memory_bytes"] > 0 and r["compile_seconds"] >= 0 and r["device"]


def test_steady_rate_counts_from_the_first_commit():
  from pgbatch.bench import steady_rate
  entries = [{"committed_at": "2026-12-01T10:00:10+00:00", "rows": 100},
             {"committed_at": "2026-12-01T10:00:00+00:00", "rows": 100},   # the first commit: not counted
             {"committed_at": "2026-12-01T10:00:20+00:00", "rows": 50}]
  assert steady_rate(entries) == 150 / 20
  assert steady_rate(entries[:1]) is None


def test_bench_pipeline_prints_pipeline_and_engine_rates(tmp_path, capsys, monkeypatch):
  # 40 images at batch 36 in 2 shards: batch buckets 32 and 36, and at least one partial batch (40 = 36 + 4 or
  # 20 + 20). Every bucket is compiled in the actor's warm-up: no XLA compile after it (counted, not timed).
  assert main(["bench", "--pipeline", "--variant", "tiny-pg1", "--images", "40", "--batch", "36",
               "--new-tokens", "4", "--repeats", "1", "--workdir", str(tmp_path)]) == 0
  (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
  assert row["status"] == {"ok": 40, "error": 0, "filtered": 0} and row["images"] == 40
  assert row["compiles_mid_job"] == 0
  assert row["compiles_warm_up"] >= 4   # SigLIP + prefill/decode for each of the 2 buckets
  assert row["pipeline_images_per_s"] > 0 and row["engine_images_per_s"] > 0
  assert row["pipeline_over_engine"] == round(row["pipeline_images_per_s"] / row["engine_images_per_s"], 3)
  assert row["pipeline_steady_images_per_s"] > 0  # 2 shards, so two commits
