"""Job specs: loading, defaults, errors that name the field, --set and environment overrides, shipped jobs."""
import glob
import json
import os

import pytest
import yaml

from pgbatch import cli, config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOBS = sorted(glob.glob(os.path.join(ROOT, "jobs", "*.yaml")))

BASE = {
    "name": "nightly-captions",
    "input": {"uri": "gs://bucket/shards/*.tar", "format": "webdataset"},
    "output": {"uri": "gs://bucket/annotations/nightly/"},
    "model": {"checkpoint": "gs://m/paligemma2-3b-pt-224.b16.npz", "tokenizer": "gs://m/paligemma_tokenizer.model",
              "dtype": "bfloat16"},
    "tasks": [{"name": "caption_en", "kind": "caption", "lang": "en"},
              {"name": "objects", "kind": "detect", "classes": ["car", "person"]}],
    "resources": {"accelerator": "gpu", "actors": 1, "chips_per_actor": 1, "batch_size": 64},
}


def problems(tree=BASE, overrides=(), environ=None) -> list[tuple[str, str]]:
  with pytest.raises(config.JobSpecError) as e:
    config.from_dict(tree, overrides=overrides, environ=environ or {})
  return e.value.problems


def test_issue_example_loads_with_defaults():
  spec = config.from_dict(BASE, environ={})
  assert spec.resources.accelerator == "gpu" and spec.resources.batch_size == 64
  assert spec.input.image_column == "image" and spec.input.key_column == "key"
  assert spec.decode.max_pixels > 0 and spec.model.vae is None
  assert [t.name for t in spec.task_objects()] == ["caption_en", "objects"]
  assert spec.text_task_names() == ["caption_en"]
  names = spec.output_schema().names
  assert names[:3] == ["key", "source_uri", "shard"] and names[-2:] == ["caption_en", "objects"]
  # the Annotator and safety actors rebuild the spec from JSON: it must round-trip exactly
  assert config.JobSpec.model_validate_json(spec.model_dump_json()) == spec
  assert spec.safety.pii.enabled  # shipped safety defaults apply when the spec has no safety block


@pytest.mark.parametrize("override, path, expect", [
    ("resources.batch_size=0", "resources.batch_size", "greater than or equal to 1 (got 0)"),
    ("resources.batch_size=many", "resources.batch_size", "valid integer"),
    ("resources.accelerator=fpga", "resources.accelerator", "'cpu', 'gpu' or 'tpu' (got 'fpga')"),
    ("resources.gpus=2", "resources.gpus", "unknown field"),
    ("input.format=tar", "input.format", "'webdataset', 'parquet' or 'images'"),
    ("model.dtype=int8", "model.dtype", "'bfloat16', 'float32' or 'float16'"),
    ("model.variant=pg3-big", "model.variant", "unknown model variant 'pg3-big'"),
    ("tasks[1].classes=[]", "tasks[1].classes", "non-empty list"),
    ("tasks[objects].lang=en", "tasks[1].lang", "not used by detect tasks"),
    ("tasks[0].kind=describe", "tasks[0].kind", "'caption', 'ocr', 'answer', 'detect' or 'segment'"),
    ("tasks[0].name=status", "tasks[0].name", "clashes with a fixed output column"),
    ("tasks[1].name=caption_en", "tasks[1].name", "clashes with another task"),
    ("tasks[1].kind=segment", "model.vae", "need the VQ-VAE mask decoder"),
    ("safety.pii.entities=[SHOE_SIZE]", "safety.pii.entities", "unknown entity"),
    ("safety.toxicity.threshold=2", "safety.toxicity.threshold", "less than or equal to 1"),
    ("safety.nsfw.colour=red", "safety.nsfw.colour", "unknown field"),
    ("name=my job!", "name", "letters, digits"),
    ("tasks=[]", "tasks", "at least 1 item"),
    ("output=null", "output", "valid dictionary"),
])
def test_errors_name_the_field_and_what_was_expected(override, path, expect):
  got = problems(overrides=[override])
  assert len(got) == 1, got
  assert got[0][0] == path, got
  assert expect in got[0][1], got


def test_missing_section_is_named():
  tree = {k: v for k, v in BASE.items() if k != "model"}
  assert problems(tree) == [("model", "required field is missing")]


def test_every_problem_is_reported_at_once():
  tree = dict(BASE, extra_field=1, resources={"actors": 0, "batch_size": -3})
  paths = [p for p, _ in problems(tree)]
  assert sorted(paths) == ["extra_field", "resources.actors", "resources.batch_size"]


def test_set_overrides_parse_yaml_values_and_address_tasks():
  spec = config.from_dict(BASE, environ={}, overrides=[
      "resources.batch_size=8", "resources.accelerator=cpu", "tasks[objects].classes=[bus, tram]",
      "tasks.0.lang=de", "tasks[2]={name: text, kind: ocr}", "input.key_column=null"])
  assert spec.resources.batch_size == 8 and spec.resources.accelerator == "cpu"
  assert spec.tasks[1].classes == ["bus", "tram"] and spec.tasks[0].lang == "de"
  assert spec.tasks[2].kind == "ocr" and spec.input.key_column is None
  with pytest.raises(config.JobSpecError, match="no list entry named 'nope'"):
    config.from_dict(BASE, environ={}, overrides=["tasks[nope].lang=de"])
  with pytest.raises(config.JobSpecError, match="expected PATH=VALUE"):
    config.from_dict(BASE, environ={}, overrides=["resources.batch_size"])
  with pytest.raises(config.JobSpecError, match="out of range"):
    config.from_dict(BASE, environ={}, overrides=["tasks[7].lang=de"])


def test_environment_overrides_and_variables():
  env = {"PGBATCH__RESOURCES__BATCH_SIZE": "16", "PGBATCH__OUTPUT__URI": "gs://other/${NIGHT:-latest}/",
         "NIGHT": "2026-12-01", "PGBATCH_RUN_BY": "kuberay"}
  spec = config.from_dict(BASE, environ=env)
  assert spec.resources.batch_size == 16 and spec.output.uri == "gs://other/2026-12-01/"
  # --set wins over the environment
  assert config.from_dict(BASE, environ=env, overrides=["resources.batch_size=4"]).resources.batch_size == 4
  got = problems(dict(BASE, output={"uri": "gs://b/${UNSET_VAR}/"}))
  assert got[0][0] == "output.uri" and "${UNSET_VAR} is not set" in got[0][1]
  assert problems(environ={"PGBATCH__RESOURCES__ACTORS": "0"})[0][0] == "resources.actors"


def test_environment_variables_expand_only_in_location_and_credential_fields():
  env = {"SECRET": "hunter2-token-value", "B": "bkt"}
  tree = dict(BASE, input=dict(BASE["input"], uri="gs://${B}/in/*.tar", storage_options={"token": "${SECRET}"}),
              output={"uri": "gs://${B}/out/", "storage_options": {"headers": ["${SECRET}"]}})
  spec = config.from_dict(tree, environ=env)
  assert spec.input.uri == "gs://bkt/in/*.tar" and spec.input.storage_options == {"token": "hunter2-token-value"}
  assert spec.output.storage_options == {"headers": ["hunter2-token-value"]}
  # text that reaches every output row (prompts, the Parquet metadata) or provenance is never expanded
  task = {"name": "vqa", "kind": "answer", "lang": "en", "question": "what is ${SECRET}?"}
  for bad, field in ((dict(BASE, tasks=[task]), "tasks[0].question"), (dict(BASE, name="n-${SECRET}"), "name"),
                     (dict(BASE, resources={"actors": "${SECRET}"}), "resources.actors")):
    with pytest.raises(config.JobSpecError) as e:
      config.from_dict(bad, environ=env, source="job.yaml")
    assert e.value.problems[0][0] == field and "${SECRET}" in str(e.value), str(e.value)
    assert "hunter2" not in str(e.value) and str(e.value).startswith("job.yaml: ")


def test_validate_show_redacts_credentials(tmp_path, capsys):
  key_json = '{"type": "service_account", "private_key": "-----BEGIN PRIVATE KEY-----\\nMIIE\\n"}'
  tree = dict(BASE, input=dict(BASE["input"], storage_options={"token": "${SECRET}", "project": "p1"}),
              output={"uri": "https://user:pw-1234@h.example/o/?X-Goog-Signature=abcdef&x=1",
                      "storage_options": {"key": "AKIA123", "secret": "s3cr3t-v", "extra": key_json,
                                          "headers": {"Authorization": "Bearer tok-999"}}})
  (tmp_path / "job.yaml").write_text(json.dumps(tree))
  os.environ["SECRET"] = "ya29.oauth-token-value"
  try:
    assert cli.main(["validate", str(tmp_path / "job.yaml"), "--show", "--spec-only"]) == 0
  finally:
    del os.environ["SECRET"]
  out = capsys.readouterr().out
  for secret in ("ya29.oauth-token-value", "pw-1234", "abcdef", "AKIA123", "s3cr3t-v", "MIIE", "private_key",
                 "tok-999"):
    assert secret not in out, (secret, out)
  assert "project: p1" in out and "X-Goog-Signature=<redacted>&x=1" in out and "user:<redacted>@h.example" in out


def test_load_resolves_relative_paths_against_the_job_file(tmp_path):
  d = tmp_path / "jobdir"
  d.mkdir()
  tree = json.loads(json.dumps(BASE))
  tree["input"]["uri"] = "shards/*.tar"
  tree["output"]["uri"] = "out/"
  tree["model"].update(checkpoint="model/ckpt.npz", tokenizer="/abs/tok.model")
  (d / "job.yaml").write_text(yaml.safe_dump(tree))
  spec = config.load(str(d / "job.yaml"), environ={})
  assert spec.input.uri == str(d / "shards" / "*.tar") and spec.output.uri == str(d / "out") + "/"
  assert spec.model.checkpoint == str(d / "model" / "ckpt.npz") and spec.model.tokenizer == "/abs/tok.model"
  assert config.load(str(d / "job.yaml"), ["output.uri=gs://x/y/"], environ={}).output.uri == "gs://x/y/"


def test_dtype_and_files_per_shard_follow_the_accelerator_unless_set():
  tree = json.loads(json.dumps(BASE))
  del tree["model"]["dtype"]
  assert config.from_dict(tree, environ={}).model.dtype == "bfloat16"                       # gpu
  assert config.from_dict(tree, ["resources.accelerator=cpu"], environ={}).model.dtype == "float32"
  del tree["resources"]
  assert config.from_dict(tree, environ={}).model.dtype == "float32"                        # cpu by default
  assert config.from_dict(tree, ["model.dtype=bfloat16"], environ={}).model.dtype == "bfloat16"  # as set
  spec = config.from_dict(tree, environ={})
  assert config.JobSpec.model_validate_json(spec.model_dump_json()) == spec
  assert spec.input.files_per_shard == 64                                                    # cpu
  assert config.from_dict(tree, ["resources.accelerator=tpu"], environ={}).input.files_per_shard == 1000
  assert config.from_dict(tree, ["input.files_per_shard=7"], environ={}).input.files_per_shard == 7


def test_load_file_errors(tmp_path):
  with pytest.raises(config.JobSpecError, match="file not found"):
    config.load(str(tmp_path / "missing.yaml"), environ={})
  (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
  with pytest.raises(config.JobSpecError, match="not valid YAML"):
    config.load(str(tmp_path / "bad.yaml"), environ={})
  (tmp_path / "list.yaml").write_text("- a\n- b\n")
  with pytest.raises(config.JobSpecError, match="a job spec is a YAML mapping"):
    config.load(str(tmp_path / "list.yaml"), environ={})


@pytest.mark.parametrize("job", JOBS, ids=[os.path.basename(j) for j in JOBS])
def test_shipped_jobs_validate(job, capsys):
  assert cli.main(["validate", "--spec-only", job]) == 0  # their buckets exist only in the examples
  assert ": ok" in capsys.readouterr().out
  spec = config.load(job, environ={})
  assert spec.output.uri.endswith("/") and spec.input.uri.startswith("gs://")


def test_shipped_jobs_cover_the_use_cases():
  kinds = {os.path.basename(j): {t.kind for t in config.load(j, environ={}).tasks} for j in JOBS}
  assert "caption" in kinds["nightly-captions.yaml"]
  assert "detect" in kinds["detection-labeling.yaml"]
  assert "ocr" in kinds["ocr-documents.yaml"]


def test_validate_command_reports_the_field_and_fails(tmp_path, capsys):
  tree = json.loads(json.dumps(BASE))
  tree["resources"]["batch_sise"] = 32
  (tmp_path / "job.yaml").write_text(yaml.safe_dump(tree))
  assert cli.main(["validate", str(tmp_path / "job.yaml")]) == 2
  err = capsys.readouterr().err
  assert "resources.batch_sise: unknown field; did you mean 'batch_size'?" in err
  del tree["resources"]["batch_sise"]
  (tmp_path / "job.yaml").write_text(yaml.safe_dump(tree))
  assert cli.main(["validate", str(tmp_path / "job.yaml"), "--spec-only", "--set", "resources.batch_size=32",
                   "--show"]) == 0
  assert "batch_size: 32" in capsys.readouterr().out


def test_validate_inputs_lists_the_shards(tmp_path, capsys):
  tree = json.loads(json.dumps(BASE))
  tree["input"]["uri"] = str(tmp_path / "shards" / "*.tar")
  (tmp_path / "job.yaml").write_text(yaml.safe_dump(tree))
  assert cli.main(["validate", str(tmp_path / "job.yaml"), "--inputs", "--spec-only"]) == 2  # model: examples
  assert "input.uri:" in capsys.readouterr().err
  (tmp_path / "shards").mkdir()
  for i in range(4):
    (tmp_path / "shards" / f"s-{i}.tar").write_bytes(b"")
  assert cli.main(["validate", str(tmp_path / "job.yaml"), "--inputs", "--spec-only"]) == 0
  assert "4 input shard(s): " in capsys.readouterr().out


def test_readme_job_example_validates(tmp_path):
  """The job spec shown in README.md ("Job specs") is a valid job."""
  import pathlib
  readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
  start = readme.index("```yaml\nname: nightly-captions") + len("```yaml\n")
  (tmp_path / "job.yaml").write_text(readme[start:readme.index("```", start)])
  spec = config.load(str(tmp_path / "job.yaml"), environ={})
  assert [t.kind for t in spec.tasks] == ["caption", "detect", "ocr", "answer"]
  assert spec.resources.accelerator == "tpu" and spec.safety.pii.action == "redact"


def test_log_filter_redacts_secret_values():
  import logging
  from pgbatch import redact
  spec = config.from_dict(dict(BASE, input=dict(BASE["input"], storage_options={"token": "ya29.tok-value"})),
                          environ={})
  assert spec.secrets() == {"ya29.tok-value"}
  record = logging.LogRecord("pgbatch.x", logging.WARNING, __file__, 1, "opening with %s failed", ("ya29.tok-value",),
                             None)
  assert redact.RedactingFilter(spec.secrets()).filter(record) and record.getMessage() == "opening with <redacted> failed"
  assert redact.redact_uri("gs://b/x") == "gs://b/x"
