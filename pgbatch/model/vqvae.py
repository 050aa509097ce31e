"""VQ-VAE mask decoder of PaliGemma segmentation, as pure JAX functions.

Sixteen `<segNNN>` tokens are codebook indices of a 4x4 latent grid (row-major) that this decoder turns into
a 64x64 mask logit map (>0 is inside). Architecture (Ning et al. 2023; big_vision
`evaluators/proj/paligemma/transfers/segmentation.py`):

  q = E[codes].reshape(B, 4, 4, D)                     E = `_vq_vae._embedding` [128, D]
  x = relu(conv1x1(q) -> 128)                          `decoder.0`
  2x x = x + conv1x1(relu(conv3x3(relu(conv3x3(x)))))  `decoder.{2,3}.net.{0,2,4}`
  4x x = relu(conv_transpose k4 s2)  -> 128, 64, 32, 16 channels, 4 -> 8 -> 16 -> 32 -> 64
                                                       `decoder.{4,6,8,10}`
  x = conv1x1(x) -> 1                                  `decoder.12`, float32 [B, 64, 64], roughly in [-1, 1]

Weights come from the published `vae-oid.npz`, keyed PyTorch-style (`<name>.weight` in OIHW for convolutions
and IOHW for transposed convolutions, `<name>.bias`). The file also holds `encoder.*` keys (used only to
make training targets); they are ignored here. Kernels are converted to HWIO with `transpose(w, (2, 3, 1, 0))`
exactly as big_vision does; the transposed convolutions then run with `transpose_kernel=True` and explicit
padding 2 on the stride-dilated input, which equals `torch.nn.ConvTranspose2d(k=4, stride=2, padding=1)`.

Params are a plain dict tree:
  {"embedding": [128, D], "conv_in": {"kernel", "bias"}, "res": [{"conv0", "conv1", "conv2"}] * 2,
   "up": [{"kernel", "bias"}] * 4, "conv_out": {"kernel", "bias"}}
"""
from __future__ import annotations

import functools
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

NUM_CODES = 128
NUM_TOKENS = 16
MASK_SIZE = 64
UP_FEATURES = (128, 64, 32, 16)
CODEBOOK_KEY = "_vq_vae._embedding"
CONV_KEYS = ("decoder.0",
             "decoder.2.net.0", "decoder.2.net.2", "decoder.2.net.4",
             "decoder.3.net.0", "decoder.3.net.2", "decoder.3.net.4",
             "decoder.4", "decoder.6", "decoder.8", "decoder.10",
             "decoder.12")

Decoder = Callable[[np.ndarray], np.ndarray]  # int32 [B, 16] -> float32 [B, 64, 64]


def _conv_params(npz: Mapping[str, np.ndarray], name: str) -> dict:
  w, b = np.asarray(npz[f"{name}.weight"], np.float32), np.asarray(npz[f"{name}.bias"], np.float32)
  return {"kernel": np.transpose(w, (2, 3, 1, 0)), "bias": b}


def params_from_npz(npz: Mapping[str, np.ndarray]) -> dict:
  """PyTorch-keyed arrays (`vae-oid.npz` layout) -> decoder param tree (numpy)."""
  missing = [k for k in (CODEBOOK_KEY, *(f"{n}.{s}" for n in CONV_KEYS for s in ("weight", "bias")))
             if k not in npz]
  if missing:
    raise KeyError(f"not a VQ-VAE checkpoint, missing keys: {missing[:4]}{'…' if len(missing) > 4 else ''}")
  emb, w0 = np.shape(npz[CODEBOOK_KEY]), np.shape(npz["decoder.0.weight"])
  if len(emb) != 2 or emb[0] != NUM_CODES:
    raise ValueError(f"{CODEBOOK_KEY}: expected a [{NUM_CODES}, D] codebook, got shape {emb}")
  if w0[1:] != (emb[1], 1, 1):
    raise ValueError(f"decoder.0.weight: expected [128, {emb[1]}, 1, 1] (codebook width {emb[1]}), got {w0}")
  res = lambda i: {f"conv{j}": _conv_params(npz, f"decoder.{i}.net.{2 * j}") for j in range(3)}
  return {
      "embedding": np.asarray(npz[CODEBOOK_KEY], np.float32),
      "conv_in": _conv_params(npz, "decoder.0"),
      "res": [res(2), res(3)],
      "up": [_conv_params(npz, f"decoder.{i}") for i in (4, 6, 8, 10)],
      "conv_out": _conv_params(npz, "decoder.12"),
  }


def load_params(uri: str) -> dict:
  """Reads a `vae-oid.npz`-layout file from any fsspec URL (gs://, s3://, file://, local path)."""
  import io
  import fsspec
  with fsspec.open(uri, "rb") as f:
    data = f.read()
  with np.load(io.BytesIO(data), allow_pickle=False) as npz:
    return params_from_npz({k: npz[k] for k in npz.files})


def _conv(x, p, padding):
  """x [B, H, W, C], kernel HWIO."""
  y = jax.lax.conv_general_dilated(x, p["kernel"], (1, 1), padding,
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                   precision=jax.lax.Precision.HIGHEST)
  return y + p["bias"]


def _conv_transpose(x, p):
  """k4 s2: [B, H, W, C] -> [B, 2H, 2W, F]; kernel [4, 4, F, C] as big_vision (transpose_kernel=True)."""
  y = jax.lax.conv_transpose(x, p["kernel"], (2, 2), ((2, 2), (2, 2)),
                             dimension_numbers=("NHWC", "HWIO", "NHWC"), transpose_kernel=True,
                             precision=jax.lax.Precision.HIGHEST)
  return y + p["bias"]


def decode(params: dict, codes: jax.Array) -> jax.Array:
  """int32 [B, 16] codebook indices -> float32 [B, 64, 64] mask logits (>0 inside)."""
  b = codes.shape[0]
  x = jnp.take(params["embedding"], codes.reshape(-1), axis=0).reshape(b, 4, 4, -1)
  x = jax.nn.relu(_conv(x, params["conv_in"], "VALID"))
  for r in params["res"]:
    y = jax.nn.relu(_conv(x, r["conv0"], ((1, 1), (1, 1))))
    y = jax.nn.relu(_conv(y, r["conv1"], ((1, 1), (1, 1))))
    x = x + _conv(y, r["conv2"], "VALID")
  for p in params["up"]:
    x = jax.nn.relu(_conv_transpose(x, p))
  return _conv(x, params["conv_out"], "VALID")[..., 0]


_decode_jit = jax.jit(decode)


def _bucket(n: int) -> int:
  """Batch sizes are padded to powers of two (at least 8) so a job compiles a handful of programs."""
  return max(8, 1 << (max(n, 1) - 1).bit_length())


def make_decoder(params: dict) -> Decoder:
  """Host callable `int32 [B, 16] -> float32 [B, 64, 64]`; runs jit-compiled on the CPU, as big_vision does."""
  cpu = jax.devices("cpu")[0]
  dev_params = jax.device_put(params, cpu)

  def run(codes: np.ndarray) -> np.ndarray:
    codes = np.asarray(codes, np.int32).reshape(-1, NUM_TOKENS)
    n = len(codes)
    if n == 0:
      return np.zeros((0, MASK_SIZE, MASK_SIZE), np.float32)
    if codes.min() < 0 or codes.max() >= NUM_CODES:
      raise ValueError(f"codebook indices must be in [0, {NUM_CODES}), got [{codes.min()}, {codes.max()}]")
    padded = np.zeros((_bucket(n), NUM_TOKENS), np.int32)
    padded[:n] = codes
    return np.asarray(_decode_jit(dev_params, jax.device_put(padded, cpu)))[:n]

  return run


def load(uri: str) -> Decoder:
  """The segment tasks' mask decoder from a `vae-oid.npz`-layout file (job spec `model.vae`)."""
  return make_decoder(load_params(uri))


def random_npz_arrays(seed: int = 0, emb_dim: int = 512) -> dict[str, np.ndarray]:
  """Random weights in the `vae-oid.npz` decoder layout (He-scaled, so masks have structure).

  The published file's codebook width D is read from the file by `params_from_npz`; 512 is the default here.
  """
  rng = np.random.default_rng(seed)
  out = {CODEBOOK_KEY: rng.normal(0, 1, (NUM_CODES, emb_dim)).astype(np.float32)}

  def put(name, shape, fan_in, gain=2.0):
    out[f"{name}.weight"] = rng.normal(0, np.sqrt(gain / fan_in), shape).astype(np.float32)
    out[f"{name}.bias"] = rng.normal(0, 0.05, (shape[0],)).astype(np.float32)

  put("decoder.0", (128, emb_dim, 1, 1), emb_dim)              # Conv2d OIHW
  for blk in (2, 3):
    put(f"decoder.{blk}.net.0", (128, 128, 3, 3), 128 * 9)
    put(f"decoder.{blk}.net.2", (128, 128, 3, 3), 128 * 9)
    put(f"decoder.{blk}.net.4", (128, 128, 1, 1), 128)
  c = 128
  for name, f in zip(("decoder.4", "decoder.6", "decoder.8", "decoder.10"), UP_FEATURES):
    w = rng.normal(0, np.sqrt(2.0 / (c * 4)), (c, f, 4, 4)).astype(np.float32)  # ConvTranspose2d IOHW
    out[f"{name}.weight"], out[f"{name}.bias"] = w, rng.normal(0, 0.05, (f,)).astype(np.float32)
    c = f
  put("decoder.12", (1, c, 1, 1), c, gain=0.05)  # logits of order 1, like the trained decoder
  return out


def write_random_vae(path: str, seed: int = 0, emb_dim: int = 512) -> str:
  """Writes random decoder weights in the exact `vae-oid.npz` key layout to an fsspec URL; returns `path`."""
  import io
  import fsspec
  buf = io.BytesIO()
  np.savez(buf, **random_npz_arrays(seed, emb_dim))
  with fsspec.open(path, "wb") as f:
    f.write(buf.getvalue())
  return path
