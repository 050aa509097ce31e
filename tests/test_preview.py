"""`pgbatch run JOB.yaml --limit N` / `--sample F --seed S`: a few images into the preview folder, results inline,
the HTML report written, the job's output never touched."""
import json

import pytest
import yaml

from pgbatch import cli, config, demo, preview


@pytest.fixture(scope="module")
def job(tmp_path_factory):
  root = tmp_path_factory.mktemp("preview")
  demo.write_demo_model(root / "model")
  demo.write_shards(root / "shards", demo.samples(), shards=3)
  tree = demo.job_dict(root)
  tree["tasks"] = [t for t in tree["tasks"] if t["name"] in ("caption_en", "detections")]
  tree["safety"] = {"pii": {"enabled": False}, "toxicity": {"enabled": False}}
  path = root / "job.yaml"
  path.write_text(yaml.safe_dump(tree))
  return path


def test_selection_is_deterministic(job):
  spec = config.load(str(job), environ={})
  keys = [k for k, *_ in demo.samples()]
  assert [r["key"] for r in preview.select(spec, 3, None, 0)] == keys[:3]
  a = [r["key"] for r in preview.select(spec, None, 0.5, 7)]
  assert a == [r["key"] for r in preview.select(spec, None, 0.5, 7)] and 0 < len(a) < len(keys) - 1
  assert a != [r["key"] for r in preview.select(spec, None, 0.5, 8)]
  assert demo.BROKEN_KEY in keys and all(k in keys for k in a)
  hits = sum(preview.chosen(str(i), "s", 0.1, 1) for i in range(5000))
  assert 400 < hits < 600


def test_limit_preview_prints_results_and_writes_the_report(job, tmp_path, capsys):
  import ray
  spec = config.load(str(job), environ={})
  try:
    code = cli.main(["run", str(job), "--limit", "3", "--preview-dir", str(tmp_path / "pv"), "--no-progress"])
  finally:
    ray.shutdown()
  out = capsys.readouterr().out
  assert code == 0, out
  photos = {p["key"]: p for p in demo.annotations()["photos"]}
  for key in ("astronaut", "chelsea", "coffee"):
    assert f"{key}  [ok]" in out and f"caption_en: {photos[key]['caption_en']!r}" in out
  assert "detections: cat×1" in out and "rocket  [" not in out
  assert "3 images (ok 3, error 0, filtered 0) in 1/1 shards" in out
  assert f"report: {tmp_path / 'pv' / 'report.html'}" in out and (tmp_path / "pv" / "report.html").is_file()
  assert not (job.parent / "output").exists()   # the job's own output: untouched
  entries = [json.loads(p.read_text()) for p in (tmp_path / "pv" / "output" / "_manifest").glob("*.json")]
  assert len(entries) == 1 and entries[0]["rows"] == 3
  assert spec.output.uri.rstrip("/") == str(job.parent / "output")


def test_bad_preview_arguments_exit_2(job, capsys):
  assert cli.main(["run", str(job), "--sample", "0"]) == 2
  assert cli.main(["run", str(job), "--limit", "0"]) == 2
  assert "--sample in (0, 1]" in capsys.readouterr().err
