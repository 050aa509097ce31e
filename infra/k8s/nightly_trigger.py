"""Create tonight's pgbatch RayJob, unless an earlier nightly run is still going. Run by infra/k8s/nightly-cronjob.yaml.

Runs in the pgbatch image (Python + PyYAML; no kubectl needed), inside the cluster, as the `pgbatch-scheduler`
service account: lists the RayJobs labelled like the manifest (app.kubernetes.io/component=nightly), and if
none of them is still deploying or running, creates the RayJob manifest (`generateName`: a new name each night).

    python nightly_trigger.py [RAYJOB.yaml]      (default /etc/pgbatch/rayjob.yaml)

Exit status 0: created, or skipped because a run is still going; 1: the API refused or failed (the Job retries).
Environment (for tests and out-of-cluster use): KUBE_API (default https://kubernetes.default.svc),
KUBE_TOKEN_FILE, KUBE_CA_FILE, KUBE_NAMESPACE (default: the pod's namespace, else the manifest's).
"""
from __future__ import annotations

import json
import os
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request

import yaml

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
# jobDeploymentStatus values after which a RayJob no longer holds (or waits for) a cluster.
FINISHED = {"Complete", "Failed", "Suspended"}
SELECT_LABEL = "app.kubernetes.io/component"


def _read(path: str) -> str | None:
  try:
    with open(path) as f:
      return f.read().strip()
  except FileNotFoundError:
    return None


def api_call(method: str, path: str, body: dict | None = None) -> dict:
  """One Kubernetes API request with the pod's service-account token; JSON in and out."""
  base = os.environ.get("KUBE_API", "https://kubernetes.default.svc").rstrip("/")
  token = _read(os.environ.get("KUBE_TOKEN_FILE", f"{SA_DIR}/token"))
  req = urllib.request.Request(base + path, method=method,
                               data=None if body is None else json.dumps(body).encode())
  req.add_header("Accept", "application/json")
  if body is not None:
    req.add_header("Content-Type", "application/json")
  if token:
    req.add_header("Authorization", f"Bearer {token}")
  ctx = None
  if base.startswith("https://"):
    ca = os.environ.get("KUBE_CA_FILE", f"{SA_DIR}/ca.crt")
    ctx = ssl.create_default_context(cafile=ca if os.path.exists(ca) else None)
  with urllib.request.urlopen(req, context=ctx, timeout=30) as r:
    return json.loads(r.read() or b"{}")


def still_going(items: list[dict]) -> list[str]:
  """Names of RayJobs that have not finished (including ones still waiting for their TPU nodes)."""
  return sorted(j["metadata"]["name"] for j in items
                if (j.get("status") or {}).get("jobDeploymentStatus") not in FINISHED)


def main(argv: list[str]) -> int:
  path = argv[1] if len(argv) > 1 else "/etc/pgbatch/rayjob.yaml"
  with open(path) as f:
    rayjob = yaml.safe_load(f)
  ns = os.environ.get("KUBE_NAMESPACE") or _read(f"{SA_DIR}/namespace") or rayjob["metadata"]["namespace"]
  label = rayjob["metadata"]["labels"][SELECT_LABEL]
  base = f"/apis/ray.io/v1/namespaces/{urllib.parse.quote(ns)}/rayjobs"
  try:
    selector = urllib.parse.urlencode({"labelSelector": f"{SELECT_LABEL}={label}"})
    running = still_going(api_call("GET", f"{base}?{selector}").get("items", []))
    if running:
      print(f"previous nightly run still going: {', '.join(running)}; not starting another")
      return 0
    created = api_call("POST", base, dict(rayjob, metadata=dict(rayjob["metadata"], namespace=ns)))
  except urllib.error.HTTPError as e:
    print(f"Kubernetes API: {e.code} {e.reason}: {e.read().decode(errors='replace')[:2000]}", file=sys.stderr)
    return 1
  except (urllib.error.URLError, OSError) as e:
    print(f"Kubernetes API unreachable: {e}", file=sys.stderr)
    return 1
  print(f"created RayJob {ns}/{created['metadata']['name']}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
