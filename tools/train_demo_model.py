"""Builds the DEMO model that `pgbatch demo` ships: `python tools/train_demo_model.py [--steps 300]`.

A tiny PaliGemma 2 (`tiny-pg2`: SigLIP 2x32, Gemma 2x64, 56 px) taught by teacher forcing, on the demo
photographs only, the answers written in `pgbatch/demo_data/annotations.json`: captions in English and German,
OCR of the printed page, boxes for four classes and masks for three. It memorises those sixteen photographs and
knows nothing else: a DEMO of the machinery, not a model to annotate real data with.

Writes into `pgbatch/demo_data/` (a few MB in all, everything deterministic from this script and its inputs):
  photos/*                 the photographs, exported once from scikit-image's data (BSD-3-Clause) as JPEG
                           (the RGBA logo as PNG, the animated GIF as it is); needs scikit-image (--photos)
  LICENSE-photos.txt       scikit-image's licence and the photographs' credits
  tokenizer.model.gz       SentencePiece with PaliGemma's layout, its BPE pieces learnt from the demo texts
  demo-pg2-DEMO-WEIGHTS.npz  the model; compressed npz, the rows of the 257152-token embedding that no demo
                           text uses are zero (they score 0, below every taught answer: see `loss`)
  vae.npz                  the mask decoder in big_vision's `vae-oid.npz` layout, hand-built, not trained:
                           code c of a latent cell means "fraction c / 127 of this 16x16 cell is inside"; the
                           decoder upsamples that 4x4 grid bilinearly to 64x64 and subtracts 0.5

Training runs on the CPU in a few minutes (2 cores). The script ends by decoding every photograph through
`pgbatch.model.load` + greedy `generate` and prints how many answers come out exactly as taught.
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT / "pgbatch" / "demo_data"
VARIANT = "tiny-pg2"
CHECKPOINT = "demo-pg2-DEMO-WEIGHTS.npz"
SEQ = 48           # prompt + answer + EOS, padded
VAE_DIM = 8        # codebook width of the hand-built VQ-VAE

# --------------------------------------------------------------------------------------------------------------
# photographs


def export_photos(ann: dict) -> None:
  """skimage/data/* -> demo_data/photos/* (JPEG q85 for photos; logo PNG at 200 px; GIF verbatim)."""
  from PIL import Image
  import skimage
  src = Path(skimage.__file__).parent / "data"
  out = DATA / "photos"
  out.mkdir(parents=True, exist_ok=True)
  for p in ann["photos"]:
    data = (src / Path(p["source"]).name).read_bytes()
    dst = out / p["file"]
    if dst.suffix == ".gif":
      dst.write_bytes(data)
      continue
    im = Image.open(io.BytesIO(data))
    if dst.suffix == ".png":
      im.thumbnail((200, 200))
      im.save(dst, optimize=True)
    else:
      im = im.convert("L" if im.mode in ("L", "I;16") else "RGB")
      im.save(dst, "JPEG", quality=85, optimize=True)
  lic = (Path(skimage.__file__).parent.parent / f"scikit_image-{skimage.__version__}.dist-info")
  text = next((f.read_text() for f in lic.glob("licenses/*") if f.is_file()), None) if lic.exists() else None
  credits = "\n".join(f"  {p['file']:<16} {p['source']}: {p['description']}" for p in ann["photos"])
  (DATA / "LICENSE-photos.txt").write_text(
      "The demo photographs are scikit-image's sample data (https://scikit-image.org), re-encoded by\n"
      "tools/train_demo_model.py. scikit-image distributes them under its BSD-3-Clause licence (images in\n"
      "skimage/data are public domain or under CC0/BSD terms, see skimage/data/README.txt there):\n\n"
      f"{credits}\n\n" + (text or "Copyright (C) 2019, the scikit-image team. BSD-3-Clause.\n"))


# --------------------------------------------------------------------------------------------------------------
# the answers as text


def loc(f: float) -> str:
  from pgbatch.tokenizer import loc_piece
  return loc_piece(min(1023, int(round(f * 1024))))


def ellipse_codes(box: list[float]) -> list[int]:
  """The 16 seg codes of the ellipse inscribed in its box: occupancy of each 16x16 cell of the 64x64 crop."""
  yy, xx = (np.mgrid[0:256, 0:256] + 0.5) / 128.0 - 1.0
  inside = (yy ** 2 + xx ** 2 <= 1.0).astype(np.float32)
  occ = inside.reshape(4, 64, 4, 64).mean(axis=(1, 3))
  return [int(round(o * 127)) for o in occ.ravel()]


def answers(photo: dict, ann: dict) -> dict[str, str]:
  """Prompt -> taught answer for one photograph (empty string: the answer is EOS alone)."""
  from pgbatch.tokenizer import seg_piece
  objs = photo.get("objects", [])
  det = " ; ".join("".join(loc(v) for v in o["box"]) + " " + o["label"] for o in objs
                   if o["label"] in ann["detect_classes"])
  seg = " ; ".join("".join(loc(v) for v in o["box"]) + "".join(seg_piece(c) for c in ellipse_codes(o["box"]))
                   + " " + o["label"] for o in objs if o["label"] in ann["segment_classes"])
  return {"caption en": photo["caption_en"], "caption de": photo["caption_de"], "ocr": photo.get("ocr", ""),
          "detect " + " ; ".join(ann["detect_classes"]): det,
          "segment " + " ; ".join(ann["segment_classes"]): seg}


def build_tokenizer(ann: dict) -> bytes:
  from pgbatch import tokenizer
  texts = [t for p in ann["photos"] for k, t in answers(p, ann).items() if t and "<" not in t]
  texts += [k for k in answers(ann["photos"][0], ann)] + ann["detect_classes"]
  model = tokenizer.build_test_tokenizer_bytes(vocab_size=1000, seed=0, sentences=texts * 20)
  (DATA / "tokenizer.model.gz").write_bytes(gzip.compress(model, mtime=0))
  return model


# --------------------------------------------------------------------------------------------------------------
# the VQ-VAE decoder, hand-built


def vae_arrays() -> dict[str, np.ndarray]:
  """`vae-oid.npz`-layout arrays: channel 0 carries the occupancy through every layer, the rest is zero."""
  from pgbatch.model import vqvae
  out = {k: np.zeros_like(v) for k, v in vqvae.random_npz_arrays(0, VAE_DIM).items()}
  out[vqvae.CODEBOOK_KEY][:, 0] = np.arange(vqvae.NUM_CODES) / (vqvae.NUM_CODES - 1)
  out["decoder.0.weight"][0, 0] = 1.0
  k1 = np.array([1, 3, 3, 1], np.float32) / 4   # ConvTranspose2d(k4, s2, p1) with this kernel = bilinear 2x
  for name in ("decoder.4", "decoder.6", "decoder.8", "decoder.10"):
    out[f"{name}.weight"][0, 0] = np.outer(k1, k1)
  out["decoder.12.weight"][0, 0] = 1.0
  out["decoder.12.bias"][0] = -0.5
  return out


# --------------------------------------------------------------------------------------------------------------
# training


def examples(ann: dict, tok) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list]:
  """-> images uint8 [N, 56, 56, 3], tokens int32 [N, SEQ], prefix_len [N], loss weights [N, SEQ], answers."""
  from pgbatch.io.decode import decode_image
  from pgbatch.model import configs
  size = configs.get(VARIANT).image_size
  imgs, toks, plen, wts, taught = [], [], [], [], []
  for p in ann["photos"]:
    pixels, _, _ = decode_image((DATA / "photos" / p["file"]).read_bytes(), size)
    for prompt, answer in answers(p, ann).items():
      pre = tok.encode_prompt(prompt)
      ids = pre + tok.encode(answer) + [1]
      assert len(ids) <= SEQ, (prompt, answer, len(ids))
      row = np.zeros(SEQ, np.int32)
      row[:len(ids)] = ids
      w = np.zeros(SEQ, np.float32)
      w[len(pre) - 1:len(ids) - 1] = 1.0   # position i predicts token i + 1: the answer and its EOS
      imgs.append(pixels), toks.append(row), plen.append(len(pre)), wts.append(w)
      taught.append((p["key"], prompt, answer))
  return np.stack(imgs), np.stack(toks), np.array(plen, np.int32), np.stack(wts), taught


def train(ann: dict, tok, steps: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Teacher-forced cross-entropy over the used tokens plus one 'any other token' logit fixed at 0."""
  import jax
  import jax.numpy as jnp
  import optax
  from pgbatch.model import configs, gemma, paligemma, random_params, unflatten
  cfg = configs.get(VARIANT)
  images, tokens, prefix_len, weights, _ = examples(ann, tok)
  used = np.unique(np.concatenate([tokens.ravel(), [0, 1, 2]]))           # [U] vocabulary ids that occur
  remap = np.zeros(tok.vocab_size, np.int32)
  remap[used] = np.arange(len(used))
  flat = random_params(VARIANT, seed=seed)
  emb_name = "llm/embedder/input_embedding"
  rng = np.random.default_rng(seed)
  flat[emb_name] = (rng.standard_normal((len(used), cfg.text.width)) * 0.05).astype(np.float32)
  params = jax.tree.map(jnp.asarray, unflatten(flat))
  x = jnp.asarray(images, jnp.float32) * (2.0 / 255.0) - 1.0
  small = jnp.asarray(remap[tokens])
  targets = jnp.concatenate([small[:, 1:], jnp.zeros_like(small[:, :1])], axis=1)
  w = jnp.asarray(weights)

  def loss(params):
    llm = params["llm"]
    zimg = paligemma.encode_images(params, x, cfg)
    h = jnp.concatenate([zimg, gemma.embed(llm, small).astype(zimg.dtype)], axis=1)
    b, s, _ = h.shape
    p = zimg.shape[1]
    pos = jnp.broadcast_to(jnp.arange(s), (b, s))
    visible = (pos < (p + jnp.asarray(prefix_len))[:, None])[:, None, :] | (pos[:, None, :] <= pos[:, :, None])
    cache = paligemma._empty_cache(cfg, b, s, h.dtype)  # noqa: SLF001 - same call as text_logits
    h, _ = gemma.forward(llm, h, pos, pos, jnp.ones((b, s), bool), visible, cache, 0, cfg.text)
    h = gemma.rms_norm(h[:, p:], llm["final_norm"]["scale"])
    logits = jnp.einsum("BTD,UD->BTU", h, llm["embedder"]["input_embedding"])
    logits = jnp.concatenate([logits, jnp.zeros_like(logits[..., :1])], axis=-1)   # every unused token: 0
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(nll * w) / jnp.sum(w)

  sched = optax.warmup_cosine_decay_schedule(0.0, 3e-3, min(50, steps // 5), steps, 1e-4)
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.0))
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    value, grads = jax.value_and_grad(loss)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value

  start = time.time()
  for i in range(steps):
    params, state, value = step(params, state)
    if i % 100 == 0 or i == steps - 1:
      print(f"step {i:4d}  loss {float(value):.4f}  {time.time() - start:.0f} s", flush=True)
  from flax import traverse_util
  out = {k: np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
  full = np.zeros((tok.vocab_size, cfg.text.width), np.float32)
  full[used] = out[emb_name]
  out[emb_name] = full
  return out


def check(ann: dict, tok) -> tuple[int, int]:
  """Greedy answers of the written checkpoint, through the code path the pipeline uses; prints mismatches."""
  from pgbatch import model as model_lib
  m = model_lib.load(str(DATA / CHECKPOINT), dtype="float32", variant=VARIANT)
  images, tokens, prefix_len, _, taught = examples(ann, tok)
  prompts = [list(t[:n]) for t, n in zip(tokens, prefix_len)]
  out = m.generate(images.astype(np.float32) * (2.0 / 255.0) - 1.0, prompts, max_new_tokens=SEQ)
  good = 0
  for (key, prompt, answer), ids in zip(taught, out):
    got = tok.decode(ids)
    good += got == answer
    if got != answer:
      print(f"  {key} / {prompt!r}: taught {answer!r}, got {got!r}")
  return good, len(taught)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--photos", action="store_true", help="re-export the photographs from scikit-image first")
  args = ap.parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from pgbatch import checkpoints
  from pgbatch.tokenizer import Tokenizer
  ann = json.loads((DATA / "annotations.json").read_text())
  if args.photos or not (DATA / "photos").exists():
    export_photos(ann)
  tok = Tokenizer(build_tokenizer(ann), "demo tokenizer")
  buf = io.BytesIO()
  np.savez_compressed(buf, **vae_arrays())
  (DATA / "vae.npz").write_bytes(buf.getvalue())
  params = train(ann, tok, args.steps)
  buf = io.BytesIO()
  np.savez_compressed(buf, **params)
  (DATA / CHECKPOINT).write_bytes(buf.getvalue())
  good, total = check(ann, tok)
  sizes = {f.name: f.stat().st_size for f in sorted(DATA.rglob("*")) if f.is_file()}
  print(f"{good}/{total} answers exactly as taught; files: {sum(sizes.values()) / 1e6:.2f} MB "
        f"({', '.join(f'{k} {v // 1024} KiB' for k, v in sizes.items() if v > 100_000)})")
  return 0 if good == total else 1


if __name__ == "__main__":
  sys.exit(main())
