"""Safety policy validation, precedence and redaction offsets (pure logic, no models)."""
import pytest
import yaml
from pydantic import ValidationError

from pgbatch.cli import main as cli_main
from pgbatch.safety import Finding, SafetyPolicy, apply_policy, decide_row
from pgbatch.safety.decide import map_offset, merge_spans, redact_text


def test_defaults_load_and_merge():
  p = SafetyPolicy.model_validate(None)
  assert p == SafetyPolicy.default()
  assert p.enabled() == ["toxicity", "wordlist", "pii", "nsfw"]  # hash list ships off: no list ships
  assert p.pii.rule("URL") == (0.5, "flag") and p.pii.rule("CREDIT_CARD") == (0.4, "redact")
  q = SafetyPolicy.model_validate({"pii": {"threshold": 0.7}, "nsfw": {"enabled": False}})
  assert q.pii.threshold == 0.7 and q.pii.action == "redact" and "CREDIT_CARD" in q.pii.entities
  assert q.enabled() == ["toxicity", "wordlist", "pii"]
  assert q.digest() != p.digest() and p.digest() == SafetyPolicy.default().digest()


@pytest.mark.parametrize("block,loc", [
    ({"pii": {"threshold": 1.5}}, "pii.threshold"),
    ({"toxicity": {"action": "delete"}}, "toxicity.action"),
    ({"wordlist": {"on_error": "fail_open"}}, "wordlist.on_error"),
    ({"pii": {"entities": ["CREDIT_CARD", "SHOE_SIZE"]}}, "pii.entities"),
    ({"wordlist": {"languages": ["xx"]}}, "wordlist.languages"),
    ({"hashlist": {"enabled": True}}, "hashlist"),
    ({"hashlist": {"uri": "memory://h.txt", "action": "flag"}}, "hashlist.action"),
    ({"nsfw": {"fields": ["caption"]}}, "nsfw.fields.0"),
    ({"pii": {"tresh": 0.3}}, "pii.tresh"),
    ({"pii": {"categories": {"CREDIT_CRAD": {"threshold": 0.9}}}}, "pii.categories"),
    ({"toxicity": {"categories": {"insult": {"action": "redact"}}}}, "toxicity.categories"),
    ({"nsfw": {"categories": {"porn": {"threshold": 0.5}}}}, "nsfw.categories"),
    ({"pii": {"language": "zz"}}, "pii.language"),
    ({"hashlist": {"uri": "memory://h", "max_distance": 17}}, "hashlist.max_distance"),
])
def test_errors_name_the_field(block, loc):
  with pytest.raises(ValidationError) as e:
    SafetyPolicy.model_validate(block)
  assert any(".".join(map(str, err["loc"])) == loc for err in e.value.errors()), e.value.errors()


def F(flt, cat, score, start=None, end=None, field="ocr.text"):
  return Finding(flt, cat, field, score, start, end)


def test_precedence_drop_over_redact_over_flag():
  p = SafetyPolicy.default()
  flag = F("toxicity", "toxicity", 0.95)
  redact = F("pii", "EMAIL_ADDRESS", 1.0, 0, 5)
  drop = F("nsfw", "nsfw", 0.9, field="image")
  low = F("nsfw", "nsfw", 0.79, field="image")
  assert apply_policy([], p).decision == "pass"
  assert apply_policy([low], p).decision == "pass"
  assert apply_policy([flag, low], p).decision == "flagged"
  assert apply_policy([flag, redact], p).decision == "redacted"
  d = apply_policy([flag, redact, drop], p)
  assert d.decision == "filtered" and d.redactions == {}
  assert [r.action for r in d.ruled] == ["flag", "redact", "drop_content"]
  assert apply_policy([F("nsfw", "nsfw", 0.8, field="image")], p).decision == "filtered"  # score >= t


def test_merge_and_offsets():
  assert merge_spans([(5, 10, "A"), (0, 3, "B"), (7, 15, "C")]) == [(0, 3, "B"), (5, 15, "C")]
  text = "ab 4111 1111 1111 1111 cd x@y.io ef"
  new_text, old, new = redact_text(text, [(3, 22, "CREDIT_CARD"), (26, 32, "EMAIL_ADDRESS")])
  assert new_text == "ab [CREDIT_CARD] cd [EMAIL_ADDRESS] ef"
  assert [new_text[s:e] for s, e in new] == ["[CREDIT_CARD]", "[EMAIL_ADDRESS]"]
  assert map_offset(0, old, new, False) == 0
  assert map_offset(23, old, new, False) == new_text.index("cd")
  assert map_offset(33, old, new, False) == new_text.index("ef")
  assert map_offset(10, old, new, False) == 3 and map_offset(10, old, new, True) == 16


def test_decide_row_offsets_are_into_written_text():
  p = SafetyPolicy.default()
  text = "mail x@y.io, see www.example.org now"
  findings = [F("pii", "EMAIL_ADDRESS", 1.0, 5, 11), F("pii", "URL", 0.5, 17, 32), F("pii", "URL", 0.5, 7, 11),
              F("toxicity", "toxicity", 0.1)]
  decision, written, rec = decide_row(findings, p, {"ocr.text": text}, "abc")
  out = written["ocr.text"]
  assert decision == "redacted" and out == "mail [EMAIL_ADDRESS], see www.example.org now"
  spans = {(f["category"], f["action"]): out[f["start"]:f["end"]] for f in rec["findings"]}
  assert spans[("EMAIL_ADDRESS", "redact")] == "[EMAIL_ADDRESS]"
  assert spans[("URL", "flag")] in ("www.example.org", "[EMAIL_ADDRESS]")
  assert [f["end"] - f["start"] for f in rec["findings"] if f["category"] == "URL"] == [15, 15]
  assert {s["category"]: s["score"] for s in rec["scores"]} == {"EMAIL_ADDRESS": 1.0, "URL": 0.5, "toxicity": 0.1}
  assert all(f["score"] >= f["threshold"] for f in rec["findings"]) and rec["policy_digest"] == "abc"


def test_spanless_redact_replaces_whole_field_and_filtered_nulls():
  p = SafetyPolicy.model_validate({"toxicity": {"action": "redact"}})
  decision, written, rec = decide_row([F("toxicity", "toxicity", 0.99)], p, {"ocr.text": "some words"}, "d")
  assert decision == "redacted" and written["ocr.text"] == "[TOXICITY]"
  assert (rec["findings"][0]["start"], rec["findings"][0]["end"]) == (0, 10)
  decision, written, rec = decide_row([F("nsfw", "nsfw", 0.99, field="image")], p, {"ocr.text": "hi"}, "d")
  assert decision == "filtered" and written == {"ocr.text": None}
  assert rec["findings"][0]["start"] is None


def test_cli_show(tmp_path, capsys):
  job = tmp_path / "job.yaml"
  job.write_text(yaml.safe_dump({"name": "x", "safety": {"pii": {"threshold": 0.65}}}))
  assert cli_main(["safety", "show", "--job", str(job)]) == 0
  out = capsys.readouterr().out
  shown = yaml.safe_load(out)
  assert shown["pii"]["threshold"] == 0.65 and shown["nsfw"]["action"] == "drop_content"
  assert SafetyPolicy.model_validate({"pii": {"threshold": 0.65}}).digest() in out
  job.write_text(yaml.safe_dump({"safety": {"pii": {"action": "shred"}}}))
  assert cli_main(["safety", "show", "--job", str(job)]) == 2
  assert "pii.action" in capsys.readouterr().err


def test_category_overrides_and_fields_are_checked():
  with pytest.raises(ValidationError, match=r"unknown \['CREDIT_CRAD'\]; this filter reports \['CREDIT_CARD'"):
    SafetyPolicy.model_validate({"pii": {"categories": {"CREDIT_CRAD": {"threshold": 0.9}}}})
  p = SafetyPolicy.model_validate({"pii": {"entities": ["EMAIL_ADDRESS"], "fields": ["ocr", "caption_en.text"]}})
  assert p.pii.rule("URL") == (0.5, "flag")  # the shipped URL override stays valid without URL scanning
  p.check_fields(["ocr", "caption_en"])
  with pytest.raises(ValueError, match=r"safety.pii.fields: 'ocr' is not a text task .*\['caption_en'\]"):
    p.check_fields(["caption_en"])
  SafetyPolicy.model_validate({"pii": {"enabled": False, "fields": ["nope"]}}).check_fields([])  # disabled: ignored
