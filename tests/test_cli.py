"""The command line imports only what a command needs: `--help` and `validate` never import JAX or Ray."""
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEAVY = ("jax", "ray", "torch", "transformers", "flax")

PROBE = """
import json, sys
from pgbatch import cli
try:
  rc = cli.main(sys.argv[1:])
except SystemExit as e:  # --help
  rc = e.code
print(json.dumps({"rc": rc, "heavy": [m for m in %r if m in sys.modules]}), file=sys.stderr)
""" % (HEAVY,)


def _probe(*argv):
  """Runs the CLI in a fresh interpreter (so sys.modules starts empty) → (exit code, heavy modules, stdout)."""
  proc = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120,
                        cwd=ROOT)
  report = json.loads(proc.stderr.strip().splitlines()[-1])
  return report["rc"], report["heavy"], proc.stdout


def test_validate_imports_neither_jax_nor_ray(tmp_path):
  rc, heavy, out = _probe("validate", "--spec-only", str(ROOT / "jobs" / "nightly-captions.yaml"))  # example buckets
  assert rc == 0 and "ok" in out
  assert heavy == []
  import yaml
  from pgbatch import demo   # a job ready to run here, segment task included: every check of validate runs
  demo.write_demo_model(tmp_path / "model")
  demo.write_shards(tmp_path / "shards", demo.samples()[:2], shards=1)
  (tmp_path / "job.yaml").write_text(yaml.safe_dump(demo.job_dict(tmp_path)))
  rc, heavy, out = _probe("validate", str(tmp_path / "job.yaml"))
  assert rc == 0 and "output writable, model readable" in out and heavy == []


def test_validate_of_a_bad_spec_imports_neither_jax_nor_ray(tmp_path):
  job = tmp_path / "bad.yaml"
  job.write_text((ROOT / "jobs" / "nightly-captions.yaml").read_text().replace("kind: caption", "kind: poem"))
  rc, heavy, _ = _probe("validate", str(job))
  assert rc == 2 and heavy == []


def test_help_imports_neither_jax_nor_ray():
  rc, heavy, out = _probe("--help")
  assert rc == 0 and heavy == []
  for command in ("run", "validate", "demo", "convert", "schema", "safety", "bench", "submit", "status"):
    assert command in out
  rc, heavy, out = _probe("run", "--help")
  assert rc == 0 and heavy == [] and "JOB.yaml" in out


def test_every_command_module_has_help_register_and_main():
  from pgbatch import cli
  for name in cli.COMMANDS:
    module = cli.command_module(name)
    assert isinstance(module.HELP, str) and callable(module.register) and callable(module.main), name
