"""PaliGemma's SentencePiece tokenizer: prompts the big_vision way, loc/seg ids, decoding up to EOS.

Vocabulary (spec §4): 256000 Gemma pieces, then `<loc0000>`…`<loc1023>` (ids 256000…257023), then
`<seg000>`…`<seg127>` (ids 257024…257151) = 257152. Ids 0/1/2/3 are pad/eos/bos/unk.

    tok = load("gs://big_vision/paligemma_tokenizer.model")
    ids = tok.encode_prompt("caption en")      # [BOS] + sp("caption en") + sp("\\n")
    text = tok.decode(generated_ids)            # stops at the first EOS
"""
from __future__ import annotations

import hashlib
import io
import random
from typing import Iterable

import fsspec
import sentencepiece as spm

PAD, EOS, BOS, UNK = 0, 1, 2, 3
NUM_LOC, NUM_SEG = 1024, 128    # loc tokens (box edge bins), seg tokens (VQ-VAE codes)
LOCS_PER_BOX, SEGS_PER_MASK = 4, 16  # the detect/segment output: 4 loc tokens per box, 16 seg tokens per mask
LOC0 = 256_000
SEG0 = LOC0 + NUM_LOC            # 257024
VOCAB_SIZE = SEG0 + NUM_SEG      # 257152


class TokenizerError(Exception):
  """A tokenizer file that cannot be read or does not have PaliGemma's layout."""


def loc_piece(i: int) -> str:
  return f"<loc{i:04d}>"


def seg_piece(i: int) -> str:
  return f"<seg{i:03d}>"


def check_layout(sp: spm.SentencePieceProcessor, where: str = "tokenizer") -> None:
  """Raises TokenizerError unless special ids, loc and seg pieces sit where PaliGemma expects them."""
  n = sp.get_piece_size()
  if n != VOCAB_SIZE:
    raise TokenizerError(f"{where} has {n} pieces; PaliGemma needs {VOCAB_SIZE} (256000 Gemma pieces + "
                         f"{NUM_LOC} <locXXXX> at {LOC0}… + {NUM_SEG} <segXXX> at {SEG0}…)")
  for name, got, want in (("pad", sp.pad_id(), PAD), ("eos", sp.eos_id(), EOS), ("bos", sp.bos_id(), BOS)):
    if got != want:
      raise TokenizerError(f"{where}: {name} id is {got}, PaliGemma expects {want}")
  for base, count, piece in ((LOC0, NUM_LOC, loc_piece), (SEG0, NUM_SEG, seg_piece)):
    for i in range(count):
      if sp.id_to_piece(base + i) != piece(i):
        at = sp.piece_to_id(piece(i))
        found = f"it is at id {at}" if sp.id_to_piece(at) == piece(i) else "it is missing"
        raise TokenizerError(f"{where}: expected {piece(i)} at id {base + i}, found "
                             f"{sp.id_to_piece(base + i)!r} there ({found})")


class Tokenizer:
  """SentencePiece model with PaliGemma's layout. `digest` is the sha256 of the model bytes."""

  def __init__(self, model: bytes, uri: str = "<bytes>"):
    self.uri = uri
    self.sp = spm.SentencePieceProcessor()
    try:
      self.sp.LoadFromSerializedProto(model)
    except (RuntimeError, OSError, TypeError) as e:
      raise TokenizerError(f"tokenizer {uri} is not a SentencePiece model ({e})") from None
    check_layout(self.sp, f"tokenizer {uri}")
    self.digest = hashlib.sha256(model).hexdigest()

  @property
  def vocab_size(self) -> int:
    return self.sp.get_piece_size()

  def encode(self, text: str) -> list[int]:
    """Plain pieces, no BOS/EOS."""
    return list(self.sp.encode(text))

  def encode_prompt(self, prompt: str) -> list[int]:
    """big_vision prefix: `sp(prompt, add_bos)` then `sp("\\n")` tokenized separately (no EOS)."""
    return [BOS] + self.encode(prompt) + self.encode("\n")

  def decode(self, ids: Iterable[int]) -> str:
    """Text up to (excluding) the first EOS; pad/bos dropped; loc/seg render as `<loc0123>` / `<seg012>`."""
    out = []
    for i in ids:
      i = int(i)
      if i == EOS:
        break
      out.append(i)
    return self.sp.decode(out)

  def id_to_piece(self, i: int) -> str:
    return self.sp.id_to_piece(int(i))


def load(uri: str) -> Tokenizer:
  """Reads a SentencePiece model from any fsspec URL and checks PaliGemma's layout."""
  try:
    with fsspec.open(str(uri), "rb") as f:
      model = f.read()
  except FileNotFoundError:
    raise TokenizerError(f"tokenizer not found: {uri}") from None
  except IsADirectoryError:
    raise TokenizerError(f"{uri} is a folder; expected the SentencePiece model file (tokenizer.model)") from None
  except OSError as e:
    raise TokenizerError(f"cannot read {uri}: {e.strerror or e}") from None
  return Tokenizer(model, str(uri))


# ---------------------------------------------------------------------------------------------------------------
# A real, small tokenizer with PaliGemma's layout, for tests and `pgbatch demo`.

_WORDS = ("a an the this that of in on at with and or is are was two three red blue green white black small large "
          "cat dog car bus person people tree house street sky water table chair bottle cup man woman child bird "
          "horse sign road building window door grass field beach snow plate pizza phone book train boat clock "
          "caption describe answer question detect segment ocr cap en de fr es where what how many color "
          "sitting standing running parked next to front behind left right top bottom image photo picture").split()


def _corpus(n: int, seed: int) -> list[str]:
  rng = random.Random(seed)
  lines = []
  for _ in range(n):
    words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 12))]
    lines.append(" ".join(words) + rng.choice(("", ".", "?", " ; " + rng.choice(_WORDS), " 42")))
  return lines


def build_test_tokenizer_bytes(vocab_size: int = 1000, seed: int = 0, sentences: Iterable[str] = ()) -> bytes:
  """Trains a tiny SentencePiece BPE model (Gemma-like: byte fallback, no dummy prefix, identity normalisation),
  pads it with unused pieces to 256000 and appends the loc/seg pieces as USER_DEFINED (like big_vision).
  `sentences` are added to the training corpus (the demo model's tokenizer learns its captions' words)."""
  from sentencepiece import sentencepiece_model_pb2 as pb  # pylint: disable=g-import-not-at-top
  out = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(_corpus(600, seed) + list(sentences)), model_writer=out, vocab_size=vocab_size, model_type="bpe",
      pad_id=PAD, eos_id=EOS, bos_id=BOS, unk_id=UNK, byte_fallback=True, add_dummy_prefix=False,
      normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
      user_defined_symbols=["\n"], hard_vocab_limit=False, num_threads=1, minloglevel=2)
  m = pb.ModelProto()
  m.ParseFromString(out.getvalue())
  unused = pb.ModelProto.SentencePiece.UNUSED
  for i in range(LOC0 - len(m.pieces)):
    m.pieces.add(piece=f"<unused{i}>", score=0.0, type=unused)
  user = pb.ModelProto.SentencePiece.USER_DEFINED
  for piece in [loc_piece(i) for i in range(NUM_LOC)] + [seg_piece(i) for i in range(NUM_SEG)]:
    m.pieces.add(piece=piece, score=0.0, type=user)
  return m.SerializeToString()


def build_test_tokenizer(path: str, vocab_size: int = 1000, seed: int = 0) -> str:
  """Writes `build_test_tokenizer_bytes(...)` to `path` (any fsspec URL); returns `path`."""
  with fsspec.open(str(path), "wb") as f:
    f.write(build_test_tokenizer_bytes(vocab_size, seed))
  return str(path)

