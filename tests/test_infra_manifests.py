"""infra/: every manifest parses and validates against the Kubernetes and KubeRay schemas; the TPU, GPU and
CPU groups, image tags, pinned versions, RayJob entrypoints, Dockerfile and nightly RayCronJob agree with the code.

Kubernetes kinds: `kubernetes_validate` (strict: unknown fields are errors). Ray kinds (RayCluster, RayJob,
RayCronJob): KubeRay v1.7.0's CRD
schemas vendored under infra/schemas/ (strict, pod templates checked against Kubernetes' PodTemplateSpec),
plus the rules KubeRay's operator enforces in Go (ray-operator/controllers/ray/utils/validation.go).
"""
from __future__ import annotations

import importlib.metadata
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
import zoneinfo
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from referencing import Registry, Resource

from pgbatch import config, placement

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
K8S_VERSION = "1.33"          # the oldest GKE minor the manifests target
KUBERAY_SCHEMAS = INFRA / "schemas" / "kuberay-v1.7.0"
RAY_KINDS = {"RayCluster": "raycluster", "RayJob": "rayjob", "RayCronJob": "raycronjob"}
MAX_RAYJOB_NAME = 47          # KubeRay: DNS-1035, <= 47 characters; a RayCronJob's name leaves 11 for "-<minutes>"
IMAGE_IN_CONTAINER_JOBS = "/opt/pgbatch/jobs/"   # where infra/Dockerfile copies jobs/
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# GKE accelerator label → GPUs per node its machine types offer.
GKE_GPUS = {"nvidia-h100-80gb": {8}, "nvidia-h100-mega-80gb": {8}, "nvidia-h200-141gb": {8},
            "nvidia-a100-80gb": {1, 2, 4, 8}, "nvidia-tesla-a100": {1, 2, 4, 8, 16}, "nvidia-l4": {1, 2, 4, 8}}
V5E_HOST_CHIPS = {1, 4, 8}    # ct5lp-hightpu-1t / -4t / -8t


# --- loading ----------------------------------------------------------------------------------------------


def manifest_files() -> list[Path]:
  files = sorted(p for p in INFRA.rglob("*.yaml")
                 if not {"schemas", "helm"} & set(p.parts) and p.name != "kustomization.yaml")
  assert files, "no manifests under infra/"
  return files


def load_docs(path: Path) -> list[dict]:
  docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
  assert docs and all(isinstance(d, dict) for d in docs), f"{path}: expected YAML mappings"
  return docs


def all_docs() -> list[tuple[str, dict]]:
  return [(str(p.relative_to(ROOT)), d) for p in manifest_files() for d in load_docs(p)]


def of_kind(kind: str) -> list[tuple[str, dict]]:
  return [(f, d) for f, d in all_docs() if d["kind"] == kind]


def kustomize_build() -> list[dict]:
  """What `kubectl apply -k infra/` applies: its resources (no generators, patches or transformers)."""
  k = yaml.safe_load((INFRA / "kustomization.yaml").read_text())
  assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and k["kind"] == "Kustomization"
  assert set(k) == {"apiVersion", "kind", "resources"}, "this render knows resources only; extend it first"
  return [d for r in k["resources"] for d in load_docs(INFRA / r)]


# --- schemas ----------------------------------------------------------------------------------------------


def _k8s_schema_dir() -> Path:
  base = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
  versions = sorted((p for p in base.glob("v*-local-strict")), key=lambda p: [int(x) for x in p.name[1:].split("-")[0].split(".")])
  wanted = [p for p in versions if p.name[1:].startswith(K8S_VERSION + ".")]
  return (wanted or versions)[-1]


def _strict(node):
  """kubeconform -strict: unknown fields are errors (the API server would silently drop them)."""
  if isinstance(node, dict):
    node = {k: _strict(v) for k, v in node.items()}
    if node.get("type") == "object" and "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
      node.setdefault("additionalProperties", False)
    return node
  if isinstance(node, list):
    return [_strict(v) for v in node]
  return node


@pytest.fixture(scope="module")
def ray_validators() -> dict:
  k8s = _k8s_schema_dir()
  pod = json.loads((k8s / "podtemplatespec-v1.json").read_text())
  defs = json.loads((k8s / "_definitions.json").read_text())
  registry = Registry().with_resources([(pod["$id"], Resource.from_contents(pod)),
                                        (defs["$id"], Resource.from_contents(defs))])
  out = {}
  for kind, stem in RAY_KINDS.items():
    schema = _strict(json.loads((KUBERAY_SCHEMAS / f"{stem}-ray-v1.json").read_text()))
    jsonschema.Draft202012Validator.check_schema(schema)
    out[kind] = jsonschema.Draft202012Validator(schema, registry=registry)
  return out


def validate(doc: dict, ray_validators: dict) -> None:
  if doc["kind"] in RAY_KINDS:
    assert doc["apiVersion"] == "ray.io/v1", doc["apiVersion"]
    errors = sorted(ray_validators[doc["kind"]].iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5])
    kuberay_rules(doc)
  else:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def kuberay_rules(doc: dict) -> None:
  """The checks KubeRay's operator makes in Go before it creates anything (utils/validation.go)."""
  meta, spec = doc["metadata"], doc["spec"]
  name = meta.get("name") or meta["generateName"] + "x" * 5   # generateName gets 5 random characters
  assert DNS1035.match(name) and len(name) <= MAX_RAYJOB_NAME, f"{name}: KubeRay wants a DNS-1035 name of <= 47 characters"
  if doc["kind"] == "RayCronJob":   # ValidateRayCronJobSpec, then the template as a RayJob
    assert len(name) <= MAX_RAYJOB_NAME - 11, f"{name}: a RayCronJob name has at most 36 characters"
    assert "TZ" not in spec["schedule"] and len(spec["schedule"].split()) == 5, "a standard 5-field cron schedule"
    if "timeZone" in spec:
      zoneinfo.ZoneInfo(spec["timeZone"])
    kuberay_rules({"kind": "RayJob", "metadata": {"name": f"{name}-29000000"}, "spec": spec["jobTemplate"]})
    return
  if doc["kind"] == "RayJob":
    assert spec.get("rayClusterSpec") or spec.get("clusterSelector"), "RayJob: rayClusterSpec or clusterSelector"
    assert spec.get("activeDeadlineSeconds", 1) > 0 and spec.get("backoffLimit", 0) >= 0
    assert spec.get("ttlSecondsAfterFinished", 0) >= 0
    if spec.get("suspend"):
      assert spec.get("shutdownAfterJobFinishes"), "a suspended RayJob must shut down after it finishes"
    env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}")
    assert isinstance(env, dict), "runtimeEnvYAML must be a YAML mapping"
    cluster = spec.get("rayClusterSpec")
  else:
    cluster = spec
  if not cluster:
    return
  groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]
  for gname, g in groups:
    assert g["template"]["spec"]["containers"], f"{gname}: at least one container"
    params = g.get("rayStartParams", {})
    assert "labels" not in params, f"{gname}: rayStartParams.labels is not supported"
    if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
      assert not g.get("resources"), f"{gname}: resources in both rayStartParams and resources"
    if gname != "head":
      lo, hi = g.get("minReplicas", 0), g.get("maxReplicas", 2 ** 31 - 1)
      assert 0 <= lo <= g.get("replicas", lo) <= hi, f"{gname}: minReplicas <= replicas <= maxReplicas"
      if not cluster.get("enableInTreeAutoscaling"):
        assert "minReplicas" in g and "maxReplicas" in g, f"{gname}: min/maxReplicas without the autoscaler"


# --- helpers over the Ray manifests -----------------------------------------------------------------------


def cluster_specs() -> list[tuple[str, dict]]:
  out = [(f, d["spec"]) for f, d in of_kind("RayCluster")]
  out += [(f, d["spec"]["rayClusterSpec"]) for f, d in of_kind("RayJob")]
  out += [(f, d["spec"]["jobTemplate"]["rayClusterSpec"]) for f, d in of_kind("RayCronJob")]
  assert out
  return out


def pod_specs(cluster: dict) -> list[tuple[str, dict, dict]]:
  """(group name, group, pod spec) for the head and every worker group."""
  groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
  return [(n, g, g["template"]["spec"]) for n, g in groups]


def container_env(container: dict) -> dict:
  return {e["name"]: e.get("value") for e in container.get("env", [])}


def accelerator_of(file: str) -> str:
  return "tpu" if "tpu" in Path(file).name else "gpu"


# --- tests ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(INFRA)))
def test_manifest_validates(path, ray_validators):
  for doc in load_docs(path):
    validate(doc, ray_validators)


def test_kustomization_builds_and_validates(ray_validators):
  built = kustomize_build()
  for doc in built:
    validate(doc, ray_validators)
  kinds = sorted(d["kind"] for d in built)
  assert kinds == ["Namespace", "RayCronJob", "ServiceAccount"]
  namespaces = {d["metadata"]["name"] for d in built if d["kind"] == "Namespace"}
  assert all(d["metadata"]["namespace"] in namespaces for d in built if d["kind"] != "Namespace")


def test_strict_validation_catches_typos(ray_validators):
  """The checks can fail: a misspelt RayJob field, a bad Kubernetes field, a CPU count KubeRay refuses."""
  (_, job), = [(f, d) for f, d in of_kind("RayJob") if "tpu" in f]
  bad = json.loads(json.dumps(job))
  bad["spec"]["shutdownAfterJobFinish"] = bad["spec"].pop("shutdownAfterJobFinishes")
  with pytest.raises(AssertionError, match="shutdownAfterJobFinish"):
    validate(bad, ray_validators)
  bad = json.loads(json.dumps(job))
  bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resource"] = {}
  with pytest.raises(AssertionError, match="resource"):
    validate(bad, ray_validators)
  bad = json.loads(json.dumps(job))
  bad["spec"]["activeDeadlineSeconds"] = 0
  with pytest.raises(AssertionError):
    validate(bad, ray_validators)
  (_, sa), = [(f, d) for f, d in of_kind("ServiceAccount")]
  bad = json.loads(json.dumps(sa))
  bad["automountServiceAccountToken"] = "no"
  with pytest.raises(kubernetes_validate.ValidationError):
    validate(bad, ray_validators)
  # RayCronJob: batch/v1 CronJob fields it does not have, a bad template, a TZ inside the schedule.
  (_, cron), = of_kind("RayCronJob")
  for field, value in [("concurrencyPolicy", "Forbid"), ("startingDeadlineSeconds", 3600)]:
    bad = json.loads(json.dumps(cron))
    bad["spec"][field] = value
    with pytest.raises(AssertionError, match=field):
      validate(bad, ray_validators)
  bad = json.loads(json.dumps(cron))
  bad["spec"]["jobTemplate"]["shutdownAfterJobFinish"] = True
  with pytest.raises(AssertionError, match="shutdownAfterJobFinish"):
    validate(bad, ray_validators)
  bad = json.loads(json.dumps(cron))
  bad["spec"]["schedule"] = "CRON_TZ=Europe/Paris " + bad["spec"]["schedule"]
  with pytest.raises(AssertionError, match="5-field"):
    validate(bad, ray_validators)
  bad = json.loads(json.dumps(cron))
  bad["metadata"]["name"] = "pgbatch-nightly-captions-tpu-v5e-2x4-run"
  with pytest.raises(AssertionError, match="36"):
    validate(bad, ray_validators)


def test_every_ray_kind_in_infra_is_covered():
  kinds = {d["kind"] for _, d in all_docs()}
  assert {"RayCluster", "RayJob", "RayCronJob", "Namespace", "ServiceAccount"} <= kinds
  files = {Path(f).name for f, _ in all_docs()}
  assert {"raycluster-tpu-v5e.yaml", "raycluster-gpu.yaml", "rayjob-tpu-v5e.yaml", "rayjob-gpu.yaml",
          "raycronjob-tpu-v5e.yaml"} <= files


def test_tpu_v5e_groups():
  n = 0
  for f, cluster in cluster_specs():
    for gname, g, pod in pod_specs(cluster):
      limits = pod["containers"][0]["resources"].get("limits", {})
      if "google.com/tpu" not in limits:
        continue
      n += 1
      where = f"{f}:{gname}"
      sel = pod["nodeSelector"]
      assert sel["cloud.google.com/gke-tpu-accelerator"] == "tpu-v5-lite-podslice", where
      topology = sel["cloud.google.com/gke-tpu-topology"]
      assert topology in ray_v5e_topologies(), f"{where}: {topology} is not a v5e topology"
      chips = int(limits["google.com/tpu"])
      requests = pod["containers"][0]["resources"]["requests"]
      assert int(requests["google.com/tpu"]) == chips, f"{where}: TPU requests must equal limits"
      # One Ray node per TPU host, owning all of that host's chips; numOfHosts hosts make the slice.
      from ray.util import tpu
      assert chips == tpu.get_chips_per_host(topology, "v5litepod") == placement.tpu_chips_per_host(topology), where
      assert chips in V5E_HOST_CHIPS
      assert g.get("numOfHosts", 1) * chips == tpu.get_num_chips_from_topology(topology), where
      assert any(t["key"] == "google.com/tpu" for t in pod.get("tolerations", [])), f"{where}: TPU taint"
      assert container_env(pod["containers"][0]).get("JAX_PLATFORMS") != "cpu", f"{where}: JAX must see the TPU"
  assert n >= 2, "expected a TPU v5e worker group in the RayCluster and the RayJob"


def ray_v5e_topologies() -> set:
  from ray._private.accelerators import tpu
  return set(tpu.VALID_TPU_TOPOLOGY["v5litepod"])


def test_gpu_groups():
  n = 0
  for f, cluster in cluster_specs():
    for gname, g, pod in pod_specs(cluster):
      res = pod["containers"][0]["resources"]
      if "nvidia.com/gpu" not in res.get("limits", {}):
        continue
      n += 1
      where = f"{f}:{gname}"
      gpus = int(res["limits"]["nvidia.com/gpu"])
      assert int(res["requests"]["nvidia.com/gpu"]) == gpus, f"{where}: GPU requests must equal limits"
      kind = pod["nodeSelector"]["cloud.google.com/gke-accelerator"]
      assert gpus in GKE_GPUS[kind], f"{where}: {kind} nodes do not come with {gpus} GPUs"
      assert any(t["key"] == "nvidia.com/gpu" for t in pod.get("tolerations", [])), f"{where}: GPU taint"
      env = container_env(pod["containers"][0])
      assert 0 < float(env["XLA_PYTHON_CLIENT_MEM_FRACTION"]) < 1, f"{where}: room for the CPU-side stages"
      assert env.get("JAX_PLATFORMS") != "cpu"
  kinds = {p["nodeSelector"]["cloud.google.com/gke-accelerator"] for _, c in cluster_specs()
           for _, _, p in pod_specs(c) if "cloud.google.com/gke-accelerator" in p.get("nodeSelector", {})}
  assert {"nvidia-h100-80gb", "nvidia-l4"} <= kinds and n >= 4


def test_cpu_group_and_head_keep_jax_off_the_accelerator():
  for f, cluster in cluster_specs():
    groups = {n: (g, p) for n, g, p in pod_specs(cluster)}
    assert "cpu" in groups, f"{f}: a CPU worker group for decode and safety"
    for name in ("head", "cpu"):
      _, pod = groups[name]
      res = pod["containers"][0]["resources"]
      assert not {"google.com/tpu", "nvidia.com/gpu"} & set(res.get("limits", {})), f"{f}:{name}"
      assert container_env(pod["containers"][0])["JAX_PLATFORMS"] == "cpu", f"{f}:{name}"
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"  # the Job Submission API must be reachable
    ports = {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert {6379, 8265} <= ports


def test_ray_pods_share_memory_and_identity():
  for f, cluster in cluster_specs():
    for gname, _, pod in pod_specs(cluster):
      assert pod["serviceAccountName"] == "pgbatch", f"{f}:{gname}"
      shm = [v for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
      mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
      assert shm and mounts.get("/dev/shm") == shm[0]["name"], f"{f}:{gname}: /dev/shm for the object store"
      res = pod["containers"][0]["resources"]
      assert res["requests"]["cpu"] == res["limits"]["cpu"], f"{f}:{gname}: Ray reads CPUs from the limit"


def _image_tag_pattern(accel: str) -> re.Pattern:
  """Artifact Registry image; REGION and PROJECT_ID are the placeholders infra/README.md has users fill in."""
  return re.compile(rf"^(REGION|[a-z0-9-]+)-docker\.pkg\.dev/(PROJECT_ID|[a-z][a-z0-9-]+)/pgbatch/pgbatch:"
                    rf"{re.escape(PROJECT['version'])}-{accel}$")


def test_images_and_versions_agree():
  ray_pin = constraints()["ray"]
  for f, cluster in cluster_specs():
    assert cluster["rayVersion"] == ray_pin, f"{f}: rayVersion {cluster['rayVersion']} != ray=={ray_pin}"
    pattern = _image_tag_pattern(accelerator_of(f))
    for gname, _, pod in pod_specs(cluster):
      for c in pod["containers"]:
        assert pattern.match(c["image"]), f"{f}:{gname}: image {c['image']} is not pgbatch:{PROJECT['version']}-{accelerator_of(f)}"


def constraints() -> dict:
  pins = {}
  for line in (INFRA / "constraints.txt").read_text().splitlines():
    line = line.split("#", 1)[0].strip()
    if line:
      req = Requirement(line)
      (spec,) = req.specifier
      assert spec.operator == "==", f"constraints.txt: {line} is not an exact pin"
      pins[canonicalize_name(req.name)] = spec.version
  return pins


def test_constraints_pin_every_dependency_within_its_range():
  """The image installs with infra/constraints.txt; CI installs the newest releases pyproject admits, so the
  pins must exist and satisfy pyproject's ranges (they are not required to equal what this test process runs)."""
  pins = constraints()
  for text in PROJECT["dependencies"]:
    req = Requirement(text)
    name = canonicalize_name(req.name)
    assert name in pins, f"infra/constraints.txt does not pin {req.name} (a pyproject dependency)"
    assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} violates {req}"


def test_pins_are_mutually_consistent_and_jax_variants_exist():
  """What `pip install -c constraints.txt` resolves in the image must not conflict: every pinned package's own
  requirements accept the other pins, and jax's `tpu` / `cuda12` extras (the image variants) accept the pinned jaxlib."""
  pins = constraints()
  for name, version in pins.items():
    for text in importlib.metadata.requires(name) or []:
      req = Requirement(text)
      if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
      other = canonicalize_name(req.name)
      if other in pins:
        assert req.specifier.contains(pins[other], prereleases=True), f"{name}=={version} wants {text}, pinned {pins[other]}"
  extras = {}
  for text in importlib.metadata.requires("jax") or []:
    req = Requirement(text)
    for extra in ("tpu", "cuda12"):
      if req.marker is not None and req.marker.evaluate({"extra": extra}) and not req.marker.evaluate({"extra": ""}):
        extras.setdefault(extra, []).append(req)
  assert set(extras) == {"tpu", "cuda12"}, "jax lost an extra the Dockerfile installs"
  for extra, reqs in extras.items():
    (jaxlib,) = [r for r in reqs if r.name == "jaxlib"]
    assert jaxlib.specifier.contains(pins["jaxlib"]), f"jax[{extra}] wants {jaxlib}, pinned jaxlib=={pins['jaxlib']}"


def test_rayjob_entrypoints_run_a_shipped_job_spec():
  jobs = of_kind("RayJob")
  assert len(jobs) >= 2
  for f, job in jobs:
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["pgbatch", "run"], f"{f}: entrypoint must be `pgbatch run JOB.yaml`"
    assert argv[2].startswith(IMAGE_IN_CONTAINER_JOBS), f"{f}: job spec must come from the image"
    local = ROOT / "jobs" / argv[2][len(IMAGE_IN_CONTAINER_JOBS):]
    assert local.is_file(), f"{f}: {local.relative_to(ROOT)} does not exist"
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    assert len(argv) == 3 + 2 * len(sets), f"{f}: only --set options after the job spec"
    spec = config.load(str(local), sets)  # the spec, with the manifest's overrides, is valid
    assert spec.resources.accelerator == accelerator_of(f), f"{f}: runs with accelerator {spec.resources.accelerator}"
    # The annotate actors fit the accelerator pods of this cluster.
    per_pod = {g["groupName"]: int(p["containers"][0]["resources"]["limits"].get(
        "google.com/tpu" if accelerator_of(f) == "tpu" else "nvidia.com/gpu", 0))
        for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"] for p in [g["template"]["spec"]]}
    assert spec.resources.chips_per_actor in set(per_pod.values()) - {0}, (
        f"{f}: chips_per_actor {spec.resources.chips_per_actor} matches no pod ({per_pod})")
    # ... and the cluster can grow to hold all of them (else the job waits for actors, then fails).
    chips = spec.resources.chips_per_actor
    room = sum(g.get("maxReplicas", g.get("replicas", 1)) * g.get("numOfHosts", 1) * (per_pod[g["groupName"]] // chips)
               for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"])
    assert spec.resources.actors <= room, f"{f}: {spec.resources.actors} annotate actors, room for {room}"
    cli_argv = argv[1:]
    from pgbatch import cli
    assert cli.build_parser().parse_args(cli_argv).command == "run"


def test_rayjob_lifecycle():
  for f, job in of_kind("RayJob"):
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True, f"{f}: the cluster must go when the job ends"
    assert 0 < spec["activeDeadlineSeconds"] <= 24 * 3600, f"{f}: a deadline below a day (nightly)"
    assert spec["backoffLimit"] >= 1 and spec["submissionMode"] == "K8sJobMode"
    assert job["metadata"].get("generateName") and "name" not in job["metadata"], f"{f}: a new name per run"


def test_nightly_schedule():
  """A RayCronJob fires once a day; its RayJob is the run-it-now RayJob; nights cannot overlap; the operator
  values switch the feature gate on."""
  (f, cron), = of_kind("RayCronJob")
  spec = cron["spec"]
  minute, hour, dom, month, dow = spec["schedule"].split()
  assert minute.isdigit() and 0 <= int(minute) < 60 and hour.isdigit() and 0 <= int(hour) < 24
  assert (dom, month, dow) == ("*", "*", "*"), "once every day"
  zoneinfo.ZoneInfo(spec["timeZone"])
  assert not spec.get("suspend"), f"{f}: suspended"
  assert cron["metadata"]["namespace"] == "pgbatch"
  (_, rayjob), = [(g, d) for g, d in of_kind("RayJob") if Path(g).name == "rayjob-tpu-v5e.yaml"]
  assert spec["jobTemplate"] == rayjob["spec"], f"{f}: jobTemplate differs from rayjob-tpu-v5e.yaml's spec"
  assert rayjob["spec"]["entrypoint"].split()[2].endswith("/nightly-captions.yaml")
  # No concurrencyPolicy in RayCronJob: a night's RayJob (every retry included) is over before the next tick.
  job = spec["jobTemplate"]
  assert job["activeDeadlineSeconds"] * (job.get("backoffLimit", 0) + 1) < 24 * 3600
  values = yaml.safe_load((INFRA / "helm" / "kuberay-operator-values.yaml").read_text())
  gates = {g["name"]: g["enabled"] for g in values["featureGates"]}
  assert gates["RayCronJob"] is True and len(gates) == len(values["featureGates"])


# --- Dockerfile -------------------------------------------------------------------------------------------


def dockerfile() -> str:
  return (INFRA / "Dockerfile").read_text()


def test_dockerfile_variants_and_sources():
  text = dockerfile()
  assert re.search(r"^ARG JAX_EXTRA=tpu$", text, re.M)
  assert "-c /opt/pgbatch/constraints.txt" in text and '"jax$( [ "$JAX_EXTRA" = cpu ] || echo "[$JAX_EXTRA]" )"' in text
  for accel in ("tpu", "cuda12"):
    assert f"--build-arg JAX_EXTRA={accel}" in text
  py = re.search(r"^ARG PYTHON_VERSION=(\S+)$", text, re.M).group(1)
  assert py == f"{sys.version_info.major}.{sys.version_info.minor}", "the image runs the tested Python"
  for src in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
    for s in src.split():
      assert (ROOT / s).exists(), f"Dockerfile copies {s}, which does not exist"
  assert "COPY jobs /opt/pgbatch/jobs" in text  # where the RayJob entrypoints look
  # The build context keeps exactly what is copied (infra/Dockerfile.dockerignore is an allowlist).
  ignore = [l.strip() for l in (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
            if l.strip() and not l.startswith("#")]
  assert ignore[0] == "**"
  copied = {s for src in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M) for s in src.split()}
  assert copied == {l[1:] for l in ignore if l.startswith("!")}
  assert re.search(r"^USER ray$", text, re.M)


def test_dockerfile_wheel_stage_builds(tmp_path):
  """Stage 1 of the Dockerfile, without Docker: its COPYs into a fresh context, then its `pip wheel` line."""
  text = dockerfile()
  stage = text.split("FROM ", 2)[1]
  ctx = tmp_path / "src"
  ctx.mkdir()
  for line in stage.splitlines():
    if line.startswith("COPY "):
      *srcs, dst = line.split()[1:]
      for s in srcs:
        target = ctx / (s if dst.endswith("/") or dst == "./" else dst)
        if (ROOT / s).is_dir():
          shutil.copytree(ROOT / s, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
          target.parent.mkdir(parents=True, exist_ok=True)
          shutil.copy2(ROOT / s, target)
  (cmd,) = [l[4:] for l in stage.splitlines() if l.startswith("RUN pip wheel")]
  argv = shlex.split(cmd.replace("/wheels", str(tmp_path / "wheels")))
  subprocess.run([sys.executable, "-m", *argv], cwd=ctx, check=True, capture_output=True, timeout=300)
  (wheel,) = (tmp_path / "wheels").glob("pgbatch-*.whl")
  assert wheel.name.startswith(f"pgbatch-{PROJECT['version']}-")
  names = set(zipfile.ZipFile(wheel).namelist())
  for must in ("pgbatch/cli/__init__.py", "pgbatch/placement.py", "pgbatch/submit.py", "pgbatch/config.py",
               "pgbatch/safety/defaults.yaml", "pgbatch/py.typed"):
    assert must in names, f"the image's wheel lacks {must}"
  meta = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
  assert "pgbatch = pgbatch.cli:main" in zipfile.ZipFile(wheel).read(meta).decode()
