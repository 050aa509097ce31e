"""transformers vs pgbatch on the same variant, batch sizes and token count, in one invocation.

    python bench/hf_compare.py --variant pg1-3b-224 --batch 1,64,256 --new-tokens 20

Both run random weights in the published shapes, bf16, greedy with exactly --new-tokens new tokens,
images already decoded (model only). Prints one JSON line per batch size with both rates and the ratio.
On the GPU machine run it after `source .devbundle/bootstrap.sh` is not needed (no Ray involved).
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import PaliGemmaConfig as HFConfig
from transformers import PaliGemmaForConditionalGeneration

from pgbatch import bench
from pgbatch.model import configs


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
  prompt = [2, 6000, 7000, 108]
  ids = torch.tensor([[257152] * cfg.num_image_tokens + prompt] * batch, device=device)
  pixels = torch.rand(batch, 3, cfg.image_size, cfg.image_size, device=device, dtype=torch.bfloat16) * 2 - 1

  def run():
    with torch.inference_mode():
      model.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                     max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    if device.type == "cuda":
      torch.cuda.synchronize()

  run()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    run()
    best = min(best, time.perf_counter() - t)
  return batch / best


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--variant", default="tiny-pg1")
  ap.add_argument("--batch", default="1,8")
  ap.add_argument("--new-tokens", type=int, default=20)
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args()
  cfg = configs.get(args.variant)
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  with torch.device(device):
    hf = PaliGemmaForConditionalGeneration(hf_config(cfg)).to(torch.bfloat16).eval()
  ours = bench.random_model(cfg, "bfloat16")
  peak = bench.matmul_peak()
  for batch in (int(b) for b in args.batch.split(",")):
    mine = bench.bench_engine(ours, batch, args.new_tokens, [2, 6000, 7000, 108], args.repeats, peak)
    theirs = hf_rate(hf, cfg, batch, args.new_tokens, device, args.repeats)
    print(json.dumps(dict(variant=cfg.name, batch=batch, new_tokens=args.new_tokens,
                          pgbatch_images_per_s=mine["images_per_s"], transformers_images_per_s=round(theirs, 2),
                          ratio=round(mine["images_per_s"] / theirs, 2), mfu=mine["mfu"],
                          device=mine["device"], torch_device=str(device))), flush=True)


if __name__ == "__main__":
  main()
