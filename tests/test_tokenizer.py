"""Tokenizer: a real SentencePiece model with PaliGemma's layout (built once per session, see conftest)."""
import hashlib

import pytest
from sentencepiece import sentencepiece_model_pb2 as pb

from pgbatch import tokenizer as T


@pytest.fixture(scope="module")
def tok(tokenizer_path):
  return T.load(tokenizer_path)


def test_constants():
  assert (T.PAD, T.EOS, T.BOS, T.LOC0, T.SEG0, T.VOCAB_SIZE) == (0, 1, 2, 256000, 257024, 257152)


def test_layout_and_digest(tok, tokenizer_path):
  assert tok.vocab_size == T.VOCAB_SIZE
  assert [tok.id_to_piece(i) for i in (0, 1, 2, 3)] == ["<pad>", "</s>", "<s>", "<unk>"]
  assert tok.id_to_piece(256000) == "<loc0000>" and tok.id_to_piece(257023) == "<loc1023>"
  assert tok.id_to_piece(257024) == "<seg000>" and tok.id_to_piece(257151) == "<seg127>"
  with open(tokenizer_path, "rb") as f:
    assert tok.digest == hashlib.sha256(f.read()).hexdigest()


def test_loc_seg_encode_to_their_ids(tok):
  assert tok.encode("<loc0123>") == [T.LOC0 + 123]
  assert tok.encode("<seg012>") == [T.SEG0 + 12]
  ids = tok.encode("<loc0001><loc0002><loc0100><loc1023> cat")
  assert ids[:4] == [256001, 256002, 256100, 257023] and all(i < T.LOC0 for i in ids[4:])


def test_encode_prompt_layout(tok):
  ids = tok.encode_prompt("caption en")
  newline = tok.encode("\n")
  assert ids == [T.BOS] + tok.encode("caption en") + newline
  assert [tok.id_to_piece(i) for i in newline] == ["\n"]
  assert T.EOS not in ids
  assert tok.decode(ids) == "caption en\n"


def test_decode_stops_at_eos_and_renders_loc_seg(tok):
  ids = tok.encode("a cat ") + [T.LOC0 + 12, T.LOC0 + 345, T.SEG0 + 7] + tok.encode(" dog")
  assert tok.decode(ids + [T.EOS] + tok.encode("junk after eos")) == "a cat <loc0012><loc0345><seg007> dog"
  assert tok.decode([T.EOS, 5, 6]) == ""
  assert tok.decode([T.BOS] + tok.encode("two birds") + [T.PAD]) == "two birds"


def test_roundtrip_text_with_bytes(tok):
  text = "where is the überraschung? 1234 ; red car\n"
  assert tok.decode(tok.encode(text)) == text


def test_load_from_gcs(tok, tokenizer_path, gcs):
  fs, bucket = gcs
  fs.put(tokenizer_path, f"{bucket}/tok/paligemma.model")
  remote = T.load(f"gs://{bucket}/tok/paligemma.model")
  assert remote.digest == tok.digest and remote.encode_prompt("ocr") == tok.encode_prompt("ocr")


def _proto(path):
  m = pb.ModelProto()
  with open(path, "rb") as f:
    m.ParseFromString(f.read())
  return m


def test_refuses_missing_seg_pieces(tokenizer_path):
  m = _proto(tokenizer_path)
  del m.pieces[T.SEG0:]
  with pytest.raises(T.TokenizerError, match=r"has 257024 pieces; PaliGemma needs 257152"):
    T.Tokenizer(m.SerializeToString(), "no-seg.model")


def test_refuses_pieces_at_wrong_ids(tokenizer_path):
  m = _proto(tokenizer_path)
  a, b = m.pieces[T.LOC0 + 5], m.pieces[T.LOC0 + 6]
  a.piece, b.piece = b.piece, a.piece
  with pytest.raises(T.TokenizerError, match=r"swapped.model: expected <loc0005> at id 256005, found '<loc0006>' "
                     r"there \(it is at id 256006\)"):
    T.Tokenizer(m.SerializeToString(), "swapped.model")


def test_refuses_plain_gemma_layout(tokenizer_path):
  m = _proto(tokenizer_path)
  for i in range(T.NUM_LOC + T.NUM_SEG):
    m.pieces[T.LOC0 + i].piece = f"<extra{i}>"
  with pytest.raises(T.TokenizerError, match=r"expected <loc0000> at id 256000, found '<extra0>' there "
                     r"\(it is missing\)"):
    T.Tokenizer(m.SerializeToString(), "gemma.model")


def test_refuses_unreadable_and_missing(tmp_path):
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"definitely not a protobuf")
  with pytest.raises(T.TokenizerError, match=r"bad.model is not a SentencePiece model"):
    T.load(str(bad))
  with pytest.raises(T.TokenizerError, match=r"tokenizer not found: .*nope.model"):
    T.load(str(tmp_path / "nope.model"))
