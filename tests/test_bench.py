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
