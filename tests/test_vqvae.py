"""VQ-VAE mask decoder: `vae-oid.npz` layout, and agreement with two independent implementations.

References built here on the same random weights:
  * PyTorch: `nn.Conv2d` / `nn.ConvTranspose2d(k=4, s=2, p=1)` modules whose state_dict keys are exactly the
    published file's (`decoder.0.weight`, `decoder.2.net.0.weight`, ...), loaded with strict=True;
  * Flax linen: big_vision's decoder as written in `evaluators/proj/paligemma/transfers/segmentation.py`
    (`nn.ConvTranspose(padding=2, transpose_kernel=True)`), with its own PyTorch -> Flax param conversion.
"""
import io

import fsspec
import jax
import numpy as np
import pytest
import torch
from torch import nn

from pgbatch.model import vqvae

EMB = 24  # codebook width of the tiny test decoder (the published file's is read from the file)


@pytest.fixture(scope="module")
def arrays():
  return vqvae.random_npz_arrays(seed=7, emb_dim=EMB)


@pytest.fixture(scope="module")
def npz_path(arrays, tmp_path_factory):
  path = tmp_path_factory.mktemp("vae") / "vae-oid.npz"
  # the published file also carries the encoder; the decoder must ignore it
  extra = {"encoder.0.weight": np.zeros((128, 1, 4, 4), np.float32), "encoder.0.bias": np.zeros(128, np.float32)}
  np.savez(path, **arrays, **extra)
  return str(path)


@pytest.fixture(scope="module")
def decoder(npz_path):
  return vqvae.load(npz_path)


@pytest.fixture(scope="module")
def codes():
  rng = np.random.default_rng(0)
  out = rng.integers(0, vqvae.NUM_CODES, (5, 16)).astype(np.int32)
  out[0] = 0
  out[1] = vqvae.NUM_CODES - 1
  return out


class _TorchResBlock(nn.Module):
  def __init__(self, dim=128):
    super().__init__()
    self.net = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU(), nn.Conv2d(dim, dim, 3, padding=1),
                             nn.ReLU(), nn.Conv2d(dim, dim, 1))

  def forward(self, x):
    return x + self.net(x)


class _TorchDecoder(nn.Module):
  """The decoder half of the VQ-VAE as a PyTorch model (NCHW); keys match `vae-oid.npz`."""

  def __init__(self, emb_dim):
    super().__init__()
    self._vq_vae = nn.Module()
    self._vq_vae.register_buffer("_embedding", torch.zeros(128, emb_dim))
    self.decoder = nn.Sequential(
        nn.Conv2d(emb_dim, 128, 1), nn.ReLU(), _TorchResBlock(), _TorchResBlock(),
        nn.ConvTranspose2d(128, 128, 4, stride=2, padding=1), nn.ReLU(),
        nn.ConvTranspose2d(128, 64, 4, stride=2, padding=1), nn.ReLU(),
        nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), nn.ReLU(),
        nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 1, 1))

  def forward(self, codes):  # int64 [B, 16] -> [B, 64, 64]
    q = self._vq_vae._embedding[codes].reshape(codes.shape[0], 4, 4, -1).permute(0, 3, 1, 2)
    return self.decoder(q)[:, 0]


def _flax_big_vision_reference(arrays):
  """big_vision's Flax decoder and `_get_params`, restated; returns `int32 [B, 16] -> float32 [B, 64, 64]`."""
  import flax.linen as fnn
  import jax.numpy as jnp

  class ResBlock(fnn.Module):
    features: int

    @fnn.compact
    def __call__(self, x):
      y = fnn.relu(fnn.Conv(self.features, (3, 3), padding=1)(x))
      y = fnn.relu(fnn.Conv(self.features, (3, 3), padding=1)(y))
      return fnn.Conv(self.features, (1, 1), padding=0)(y) + x

  class Decoder(fnn.Module):
    @fnn.compact
    def __call__(self, x):
      dim = 128
      x = fnn.relu(fnn.Conv(dim, (1, 1), padding=0)(x))
      for _ in range(2):
        x = ResBlock(dim)(x)
      for _ in range(4):
        x = fnn.relu(fnn.ConvTranspose(dim, (4, 4), strides=(2, 2), padding=2, transpose_kernel=True)(x))
        dim //= 2
      return fnn.Conv(1, (1, 1), padding=0)(x)

  def conv(name):
    return {"bias": arrays[name + ".bias"], "kernel": np.transpose(arrays[name + ".weight"], (2, 3, 1, 0))}

  def res(name):
    return {"Conv_0": conv(name + ".0"), "Conv_1": conv(name + ".2"), "Conv_2": conv(name + ".4")}

  params = {"Conv_0": conv("decoder.0"), "ResBlock_0": res("decoder.2.net"), "ResBlock_1": res("decoder.3.net"),
            **{f"ConvTranspose_{i}": conv(f"decoder.{n}") for i, n in enumerate((4, 6, 8, 10))},
            "Conv_1": conv("decoder.12")}
  emb = arrays["_vq_vae._embedding"]

  def run(codes):
    with jax.default_matmul_precision("highest"):
      q = jnp.take(emb, codes.reshape(-1), axis=0).reshape(codes.shape[0], 4, 4, -1)
      return np.asarray(Decoder().apply({"params": params}, q))[..., 0]

  return run


def test_npz_layout_is_the_published_one(arrays):
  expected = {"_vq_vae._embedding"} | {f"{n}.{s}" for n in vqvae.CONV_KEYS for s in ("weight", "bias")}
  assert set(arrays) == expected
  assert arrays["decoder.0.weight"].shape == (128, EMB, 1, 1)          # Conv2d: OIHW
  assert arrays["decoder.2.net.0.weight"].shape == (128, 128, 3, 3)
  assert arrays["decoder.4.weight"].shape == (128, 128, 4, 4)          # ConvTranspose2d: IOHW
  assert arrays["decoder.10.weight"].shape == (32, 16, 4, 4)
  assert arrays["decoder.12.weight"].shape == (1, 16, 1, 1)
  model = _TorchDecoder(EMB)
  assert set(model.state_dict()) == expected


def test_matches_pytorch_reference(arrays, decoder, codes):
  model = _TorchDecoder(EMB)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()}, strict=True)
  with torch.no_grad():
    ref = model(torch.from_numpy(codes).long()).numpy()
  got = decoder(codes)
  assert got.shape == (5, 64, 64) and got.dtype == np.float32
  np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
  assert np.abs(ref).max() > 0.1  # not a degenerate all-zero comparison


def test_matches_big_vision_flax_decoder(arrays, decoder, codes):
  ref = _flax_big_vision_reference(arrays)(codes)
  np.testing.assert_allclose(decoder(codes), ref, atol=1e-5, rtol=0)


def test_masks_have_structure(decoder, codes):
  inside = (decoder(codes) > 0).mean(axis=(1, 2))
  assert ((inside > 0.02) & (inside < 0.98)).all(), inside
  assert len({m.tobytes() for m in decoder(codes) > 0}) == len(codes)  # different codes, different masks


def test_batching_padding_and_validation(decoder, codes):
  full = decoder(codes)
  for i in range(len(codes)):   # padding to a bucket does not change a row
    np.testing.assert_allclose(decoder(codes[i:i + 1])[0], full[i], atol=1e-6)
  big = np.concatenate([codes] * 4)  # 20 rows -> bucket 32
  np.testing.assert_allclose(decoder(big)[-5:], full, atol=1e-6)
  np.testing.assert_allclose(decoder(codes.reshape(-1))[0], full[0], atol=1e-6)  # flat 16*k accepted
  assert decoder(np.zeros((0, 16), np.int32)).shape == (0, 64, 64)
  for bad in (codes + 128, codes - 1):
    with pytest.raises(ValueError, match="codebook indices"):
      decoder(bad)
  assert [vqvae._bucket(n) for n in (0, 1, 8, 9, 33)] == [8, 8, 8, 16, 64]


def test_params_from_file_urls(npz_path, arrays, gcs):
  ref = vqvae.params_from_npz(arrays)
  fs, bucket = gcs
  fs.pipe(f"{bucket}/models/vae-oid.npz", open(npz_path, "rb").read())
  for uri in (npz_path, "file://" + npz_path, f"gs://{bucket}/models/vae-oid.npz"):
    got = vqvae.load_params(uri)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, ref)
  assert ref["embedding"].shape == (128, EMB)
  assert ref["up"][0]["kernel"].shape == (4, 4, 128, 128) and ref["up"][3]["kernel"].shape == (4, 4, 16, 32)


def test_write_random_vae_round_trip(tmp_path):
  path = vqvae.write_random_vae(str(tmp_path / "v.npz"), seed=1, emb_dim=8)
  with fsspec.open(path, "rb") as f, np.load(io.BytesIO(f.read())) as npz:
    assert npz["_vq_vae._embedding"].shape == (128, 8)
  assert vqvae.load_params(path)["conv_in"]["kernel"].shape == (1, 1, 8, 128)


def test_missing_keys_are_named(arrays):
  partial = {k: v for k, v in arrays.items() if not k.startswith("decoder.12")}
  with pytest.raises(KeyError, match="decoder.12.weight"):
    vqvae.params_from_npz(partial)
  with pytest.raises(KeyError, match="not a VQ-VAE checkpoint"):
    vqvae.params_from_npz({"img/embedding/kernel": np.zeros(3)})


def test_inconsistent_shapes_are_named(arrays):
  with pytest.raises(ValueError, match=r"_vq_vae._embedding: expected a \[128, D\] codebook"):
    vqvae.params_from_npz({**arrays, "_vq_vae._embedding": np.zeros((256, EMB), np.float32)})
  with pytest.raises(ValueError, match="decoder.0.weight: expected"):
    vqvae.params_from_npz({**arrays, "_vq_vae._embedding": np.zeros((128, EMB + 1), np.float32)})
