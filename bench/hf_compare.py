"""transformers vs pgbatch on the same variant, batch sizes and token count.

    python bench/hf_compare.py --variant pg1-3b-224 --batch 1,64,256 --new-tokens 20

Both run random weights in the published shapes, bf16, greedy with exactly --new-tokens new tokens, images
already decoded (model only). Fair by construction: each side runs in its own process (JAX's memory
pre-allocation never starves torch), one after the other; the prompt is exactly one prompt bucket long (8 tokens),
so neither side pads it; transformers is held to the token count with `eos_token_id=None` (no EOS can stop it),
not with `min_new_tokens` (a logits processor that costs it a full-vocabulary pass per step), and pgbatch ignores
EOS the same way. Prints one JSON line per batch size with both rates and the ratio.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
from transformers import PaliGemmaConfig as HFConfig
from transformers import PaliGemmaForConditionalGeneration

from pgbatch import bench
from pgbatch.model import configs

PROMPT = [2, 6000, 7000, 8000, 9000, 10000, 11000, 108]  # BOS, 6 words, "\n": exactly the 8-token prompt bucket


def hf_config(cfg: configs.PaliGemmaConfig) -> HFConfig:
  t, v = cfg.text, cfg.vision
  text = dict(hidden_size=t.width, num_hidden_layers=t.depth, intermediate_size=t.mlp_dim,
              num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads, head_dim=t.head_dim,
              vocab_size=257216, model_type="gemma2" if t.post_norms else "gemma")
  if t.post_norms:
    text.update(query_pre_attn_scalar=round(t.query_scale ** -2), attn_logit_softcapping=t.attn_logits_softcap,
                final_logit_softcapping=None, sliding_window=4096)
  vision = dict(hidden_size=v.width, num_hidden_layers=v.depth, intermediate_size=v.mlp_dim,
                num_attention_heads=v.num_heads, patch_size=v.patch_size, image_size=cfg.image_size,
                projection_dim=t.width)
  return HFConfig(text_config=text, vision_config=vision, projection_dim=t.width, image_token_index=257152,
                  vocab_size=257216)


def hf_rate(model, cfg, batch: int, new_tokens: int, device, repeats: int) -> float:
  ids = torch.tensor([[257152] * cfg.num_image_tokens + PROMPT] * batch, device=device)
  pixels = torch.rand(batch, 3, cfg.image_size, cfg.image_size, device=device, dtype=torch.bfloat16) * 2 - 1

  def run():
    with torch.inference_mode():
      model.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                     max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0, do_sample=False)
    if device.type == "cuda":
      torch.cuda.synchronize()

  run()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    run()
    best = min(best, time.perf_counter() - t)
  return batch / best


def side_rates(side: str, variant: str, batches: list[int], new_tokens: int, repeats: int) -> dict:
  """images/s per batch size for one side, in this process."""
  cfg = configs.get(variant)
  if side == "pgbatch":
    ours = bench.random_model(cfg, "bfloat16")
    peak = bench.matmul_peak()
    rows = {b: bench.bench_engine(ours, b, new_tokens, PROMPT, repeats, peak) for b in batches}
    return {b: dict(images_per_s=r["images_per_s"], mfu=r["mfu"], device=r["device"]) for b, r in rows.items()}
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  with torch.device(device):
    hf = PaliGemmaForConditionalGeneration(hf_config(cfg)).to(torch.bfloat16).eval()
  return {b: dict(images_per_s=round(hf_rate(hf, cfg, b, new_tokens, device, repeats), 2), device=str(device))
          for b in batches}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--variant", default="tiny-pg1")
  ap.add_argument("--batch", default="1,8")
  ap.add_argument("--new-tokens", type=int, default=20)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--side", choices=("pgbatch", "transformers"), help=argparse.SUPPRESS)  # one side, this process
  args = ap.parse_args()
  batches = [int(b) for b in args.batch.split(",")]
  if args.side:
    print(json.dumps(side_rates(args.side, args.variant, batches, args.new_tokens, args.repeats)))
    return
  rates = {}
  for side in ("pgbatch", "transformers"):
    cmd = [sys.executable, __file__, "--side", side, "--variant", args.variant, "--batch", args.batch,
           "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    rates[side] = {int(b): r for b, r in json.loads(out.strip().splitlines()[-1]).items()}
  for b in batches:
    mine, theirs = rates["pgbatch"][b], rates["transformers"][b]
    print(json.dumps(dict(variant=args.variant, batch=b, new_tokens=args.new_tokens, prompt_tokens=len(PROMPT),
                          pgbatch_images_per_s=mine["images_per_s"],
                          transformers_images_per_s=theirs["images_per_s"],
                          ratio=round(mine["images_per_s"] / theirs["images_per_s"], 2), mfu=mine["mfu"],
                          device=mine["device"], torch_device=theirs["device"])), flush=True)


if __name__ == "__main__":
  main()
