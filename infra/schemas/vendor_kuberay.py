"""Vendor KubeRay's CRD schemas (v1 RayCluster, RayJob and RayCronJob) for the manifest tests, kept small.

    git clone --branch v1.7.0 https://github.com/ray-project/kuberay /tmp/kuberay
    python infra/schemas/vendor_kuberay.py /tmp/kuberay/ray-operator/config/crd/bases v1.7.0

Writes infra/schemas/kuberay-<version>/<kind>-ray-v1.json: the CRD's `openAPIV3Schema` with `status` and
every `description` removed, and every embedded Kubernetes PodTemplateSpec replaced by a `$ref` to the
Kubernetes schema (`https://kubernetes.io/api/podtemplatespec/v1`, resolved by the test from the
kubernetes-validate package), which is what makes the upstream files 1 MB each.

kuberay-v1.7.0/ was made from tag v1.7.0 (commit 59d663aeec13760646da3db9c1cf8cfe883e30b7); RayCronJob (the
nightly schedule) exists since KubeRay 1.6 behind the operator's `RayCronJob` feature gate (Alpha, off by default).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

KINDS = {"rayclusters": "raycluster", "rayjobs": "rayjob", "raycronjobs": "raycronjob"}
POD_TEMPLATE_REF = {"$ref": "https://kubernetes.io/api/podtemplatespec/v1"}


def is_pod_template(schema: dict) -> bool:
  """A PodTemplateSpec: {metadata, spec} where spec has `containers`."""
  props = schema.get("properties", {})
  return set(props) == {"metadata", "spec"} and "containers" in props["spec"].get("properties", {})


def shrink(node):
  if isinstance(node, dict):
    if is_pod_template(node):
      return dict(POD_TEMPLATE_REF)
    return {k: shrink(v) for k, v in node.items() if k != "description"}
  if isinstance(node, list):
    return [shrink(v) for v in node]
  return node


def vendor(crd_dir: Path, version: str, out_root: Path) -> list[Path]:
  out_dir = out_root / f"kuberay-{version}"
  out_dir.mkdir(parents=True, exist_ok=True)
  written = []
  for plural, kind in KINDS.items():
    crd = yaml.safe_load((crd_dir / f"ray.io_{plural}.yaml").read_text())
    v1 = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = v1["schema"]["openAPIV3Schema"]
    schema["properties"].pop("status", None)
    schema = shrink(schema)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://ray.io/schemas/{version}/{kind}-ray-v1.json"
    path = out_dir / f"{kind}-ray-v1.json"
    path.write_text(json.dumps(schema, sort_keys=True, separators=(",", ":")) + "\n")
    written.append(path)
  return written


if __name__ == "__main__":
  crd_dir, version = Path(sys.argv[1]), sys.argv[2]
  for p in vendor(crd_dir, version, Path(__file__).resolve().parent):
    print(p, p.stat().st_size)
