"""`pgbatch validate` checks what `run` will need (inputs, output, model files), without Ray, and each mistake is
one line naming the field or file, exit 2, the same code `run` gives."""
import json
import socket
import threading

import pytest
import yaml

from pgbatch import cli, config, demo, preflight


@pytest.fixture(scope="module")
def ready(tmp_path_factory) -> dict:
  """A job spec dict that is ready to run here: demo model files, two real shards, a fresh output folder."""
  root = tmp_path_factory.mktemp("ready")
  ckpt, tok, vae = demo.write_demo_model(root / "model")
  demo.write_shards(root / "shards", demo.samples()[:4], shards=2)
  spec = demo.job_dict(root)
  return json.loads(json.dumps(spec))


def _validate(tmp_path, capsys, tree, *extra, env=None, monkeypatch=None):
  if env and monkeypatch:
    for k, v in env.items():
      monkeypatch.setenv(k, v)
  job = tmp_path / "job.yaml"
  job.write_text(yaml.safe_dump(tree))
  code = cli.main(["validate", str(job), *extra])
  out = capsys.readouterr()
  return code, out.out, out.err


def _with(tree, path, value):
  t = json.loads(json.dumps(tree))
  config.set_path(t, path, value)
  return t


def test_a_ready_job_is_ok_and_lists_its_shards(tmp_path, capsys, ready):
  code, out, err = _validate(tmp_path, capsys, ready, "--inputs")
  assert code == 0 and err == "", err
  assert ": ok" in out and "2 input shard(s), output writable, model readable" in out
  assert out.index(": ok") < out.index("2 input shard(s): ")


@pytest.mark.parametrize("path, value, field, expect", [
    ("input.uri", "{root}/no-such-folder/*.tar", "input.uri", "matched no tar shards"),
    ("input.uri", "{root}/model/*.tar", "input.uri", "matched no tar shards"),
    ("model.checkpoint", "{root}/model/missing.npz", "model.checkpoint", "checkpoint not found"),
    ("model.checkpoint", "{root}/model/demo_tokenizer.model", "model.checkpoint", "cannot tell the format"),
    ("model.variant", "tiny-pg1", "model.checkpoint", "as tiny-pg1"),
    ("model.tokenizer", "{root}/model/missing.model", "model.tokenizer", "tokenizer not found"),
    ("model.tokenizer", "{root}/model/demo-vae.npz", "model.tokenizer", "not a SentencePiece model"),
    ("model.vae", "{root}/model/missing-vae.npz", "model.vae", "missing-vae.npz not found"),
    ("model.vae", "{root}/model/" + demo.CHECKPOINT_NAME, "model.vae", "not a VQ-VAE checkpoint"),
    ("output.uri", "{root}/model/demo-vae.npz", "output.uri", "demo-vae.npz is a file; expected a folder"),
    ("output.uri", "{root}/model/demo-vae.npz/sub/", "output.uri", "lies under the file"),
    ("output.uri", "results.parquet", "output.uri", "names a file"),
])
def test_each_mistake_is_one_line_exit_2(tmp_path, capsys, ready, path, value, field, expect):
  root = ready["model"]["checkpoint"].rsplit("/model/", 1)[0]
  code, out, err = _validate(tmp_path, capsys, _with(ready, path, value.format(root=root)))
  assert code == 2 and ": ok" not in out, out
  lines = [line for line in err.strip().splitlines() if f"{field}: " in line]
  assert len(lines) == 1 and expect in lines[0], err
  if field != "output.uri" or "names a file" not in expect:   # spec errors: a header, then the field's line
    assert err.strip() == lines[0] and lines[0].startswith(f"{tmp_path / 'job.yaml'}: {field}: "), err


def test_unknown_fields_get_a_suggestion(tmp_path, capsys, ready):
  tree = json.loads(json.dumps(ready))
  tree["ouput"] = tree.pop("output")
  tree["model"]["dtpye"] = tree["model"].pop("dtype")
  code, _, err = _validate(tmp_path, capsys, tree)
  assert code == 2
  assert "  ouput: unknown field; did you mean 'output'?" in err and "output: required field is missing" in err
  assert "  model.dtpye: unknown field; did you mean 'dtype'?" in err


def test_environment_override_errors_name_the_variable(tmp_path, capsys, ready, monkeypatch):
  code, _, err = _validate(tmp_path, capsys, ready, env={"PGBATCH__RESOURCES__BATCH_SIZE": "many"},
                           monkeypatch=monkeypatch)
  assert code == 2 and "resources.batch_size:" in err and "PGBATCH__RESOURCES__BATCH_SIZE" in err
  monkeypatch.setenv("PGBATCH__RESOURCES__BATCH_SIZE", "8")
  monkeypatch.setenv("PGBATCH__OUTPUT__URI", "out.parquet")
  code, _, err = _validate(tmp_path, capsys, ready)
  assert code == 2 and "output.uri:" in err and "(set by environment variable PGBATCH__OUTPUT__URI)" in err


def test_unreachable_storage_is_one_line_within_the_timeout(ready):
  """An input server that accepts the connection and never answers: the listing gives up after the timeout."""
  srv = socket.socket()
  srv.bind(("127.0.0.1", 0))
  srv.listen(8)
  held = []
  threading.Thread(target=lambda: held.append(srv.accept()), daemon=True).start()
  try:
    spec = config.from_dict(_with(ready, "input.uri", f"http://127.0.0.1:{srv.getsockname()[1]}/s/*.tar"),
                            environ={})
    problems, shards = preflight.check_input(spec, timeout_s=1.0)
    assert shards == [] and len(problems) == 1 and problems[0][0] == "input.uri"
    assert "no answer within 1 s" in problems[0][1]
  finally:
    for conn, _ in held:
      conn.close()
    srv.close()


def test_problems_never_show_credentials(tmp_path, capsys, ready):
  tree = _with(_with(ready, "output.uri", "https://user:pw-1234@127.0.0.1:9/o/?X-Goog-Signature=abcdef"),
               "input.storage_options", {"token": "ya29.secret-token"})
  tree = _with(tree, "input.uri", "gs://no-such-bucket-here/x/*.tar?token=ya29.secret-token")
  code, out, err = _validate(tmp_path, capsys, tree)
  assert code == 2 and "input.uri: cannot list gs://no-such-bucket-here/" in err
  for secret in ("pw-1234", "abcdef", "ya29.secret-token"):
    assert secret not in out + err, err


def test_run_gives_the_same_exit_code_before_any_work(tmp_path, capsys, ready):
  """`run` refuses what `validate` refuses, with 2 and the field, before Ray starts (no Ray here)."""
  root = ready["model"]["checkpoint"].rsplit("/model/", 1)[0]
  for path, value, field in (("output.uri", f"{root}/model/demo-vae.npz", "output.uri"),
                             ("model.checkpoint", f"{root}/model/missing.npz", "checkpoint not found"),
                             ("output.uri", "results.parquet", "output.uri")):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(_with(_with(ready, "output.uri", str(tmp_path / "out") + "/"), path, value)))
    assert cli.main(["validate", str(job)]) == 2
    assert cli.main(["run", str(job), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert field in err and "Traceback" not in err
