"""Text filters on deterministic fixtures: PII spans in OCR-like text, word-list spans, toxicity scores.

Fixtures are test values only: a Luhn-valid test card, a published example IBAN, a generated valid-format
SSN, example.com addresses, a 555 phone number; profane strings are mild and constructed.
"""
import os
import socket

import pytest

from pgbatch.safety import SafetyPolicy, decide_row, load_filter, score_text

CARD, IBAN, SSN = "4111 1111 1111 1111", "GB82 WEST 1234 5698 7654 32", "512-38-4476"
EMAIL, PHONE, IP = "jane.doe@example.com", "+1 212-555-0198", "192.168.10.4"
OCR = (f"ACME HARDWARE STORE\nVISA {CARD}\nRefund to IBAN {IBAN}\n"
       f"Questions? {EMAIL} or {PHONE}\nSSN on file {SSN}\nPOS host {IP}\nTHANK YOU")
RAW = {"CREDIT_CARD": CARD, "IBAN_CODE": IBAN, "US_SSN": SSN, "EMAIL_ADDRESS": EMAIL, "PHONE_NUMBER": PHONE,
       "IP_ADDRESS": IP}


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
  """No sockets, and an empty cache dir: the blank spaCy pipeline must be created, not downloaded."""
  mp = pytest.MonkeyPatch()
  cache = tmp_path_factory.mktemp("cache")
  mp.setenv("PGBATCH_CACHE_DIR", str(cache))

  def no_network(*a, **k):
    raise AssertionError(f"network access attempted: {a[1:] if a else k}")

  mp.setattr(socket.socket, "connect", no_network)
  mp.setattr(socket, "create_connection", no_network)
  mp.setattr(socket, "getaddrinfo", no_network)
  yield cache
  mp.undo()


@pytest.fixture(scope="module")
def filters(offline):
  p = SafetyPolicy.model_validate({"wordlist": {"languages": ["en", "de", "es", "fr"]}})
  return p, {n: load_filter(n, p) for n in ("toxicity", "wordlist", "pii")}


def test_blank_spacy_pipeline_saved_offline(filters, offline):
  (saved,) = [d for d in os.listdir(offline) if d.startswith("spacy-blank-en-")]
  assert os.path.isfile(os.path.join(offline, saved, "config.cfg"))


def test_pii_spans_in_ocr_text(filters):
  _, fs = filters
  hits = fs["pii"].score([OCR])[0]
  found = {h.category: OCR[h.start:h.end] for h in hits if h.category != "URL"}
  assert found == RAW
  assert {h.category for h in hits} <= set(RAW) | {"URL"}


def test_pii_validation_rejects_invalid_values(filters):
  _, fs = filters
  bad = "card 4111 1111 1111 1112 iban GB82 WEST 1234 5698 7654 33 ssn 000-12-3456"
  assert {h.category for h in fs["pii"].score([bad])[0]} <= {"PHONE_NUMBER"}


def test_redaction_placeholders_and_decision(filters):
  p, fs = filters
  findings = score_text([OCR], p, "ocr.text", filters=fs)[0]
  decision, written, rec = decide_row(findings, p, {"ocr.text": OCR}, p.digest())
  out = written["ocr.text"]
  assert decision == "redacted"
  for cat, raw in RAW.items():
    assert raw not in out and f"[{cat}]" in out
  assert out.startswith("ACME HARDWARE STORE\nVISA [CREDIT_CARD]\nRefund to IBAN [IBAN_CODE]\n")
  assert out.endswith("SSN on file [US_SSN]\nPOS host [IP_ADDRESS]\nTHANK YOU")
  for f in rec["findings"]:
    assert f["score"] >= f["threshold"]
    if f["action"] == "redact":
      assert out[f["start"]:f["end"]] == f"[{f['category']}]"
  assert {f["category"] for f in rec["findings"] if f["action"] == "redact"} == set(RAW)


def test_wordlist_spans_multilingual(filters):
  _, fs = filters
  texts = ["What a load of crap, said the sign.", "Du Depp!", "Eres un idiota.", "Quel imbécile.",
           "A scrappy dog on a crappie boat."]
  spans = [[t[h.start:h.end] for h in hits] for t, hits in zip(texts, fs["wordlist"].score(texts))]
  assert spans == [["crap"], ["Depp"], ["idiota"], ["imbécile"], []]


def test_toxicity_scores_in_range_and_ordered(filters):
  _, fs = filters
  benign, rude = [h[0].score for h in fs["toxicity"].score(["a cup of coffee on a saucer", "you stupid idiot"])]
  assert 0.0 <= benign < 0.2 and 0.9 < rude <= 1.0


def test_mild_profanity_is_redacted_and_flagged(filters):
  p, fs = filters
  text = "Caption: what a crap day, you idiot."
  decision, written, rec = decide_row(score_text([text], p, "caption.text", filters=fs)[0], p,
                                      {"caption.text": text}, "d")
  assert decision == "redacted"
  assert written["caption.text"] == "Caption: what a [PROFANITY] day, you [PROFANITY]."
  assert {(f["filter"], f["action"]) for f in rec["findings"]} == {("wordlist", "redact"), ("toxicity", "flag")}
