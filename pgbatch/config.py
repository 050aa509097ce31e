"""Job specs: YAML → `JobSpec` (pydantic), validated completely before any work starts.

    spec = config.load("jobs/nightly-captions.yaml", overrides=["resources.batch_size=32"])

Sources, later ones win:
1. the YAML file;
2. environment overrides `PGBATCH__<PATH>=value`, the path's parts separated by a double underscore and
   matched case-insensitively (`PGBATCH__OUTPUT__URI=gs://b/out/`, `PGBATCH__RESOURCES__ACTORS=4`);
3. command-line overrides `--set a.b=c` (`tasks[0].lang=de`, or a task by name: `tasks[objects].classes=[car]`).
Override values are parsed as YAML (`4` is an int, `[a, b]` a list, `null` is null).
String values may reference the environment: `${VAR}` or `${VAR:-default}` (a missing VAR without default
is an error). Relative local paths are resolved against the job file's folder.

Errors (`JobSpecError`, a `ValueError`) list every problem as `field.path: what was expected (got …)`.
Everything that can be checked without touching data is checked here: field types and ranges, tasks (via
`pgbatch.tasks.make_task`) and their output column names, the safety policy (the text stage is
constructed), resources, and the model variant name.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pgbatch.fsutil import is_local_path
from pgbatch.safety.policy import SafetyPolicy

FORMATS = ("webdataset", "parquet", "images")
DTYPES = ("bfloat16", "float32", "float16")
ENV_PREFIX = "PGBATCH__"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class JobSpecError(ValueError):
  """An invalid job spec. `problems` is a list of (field path, message)."""

  def __init__(self, source: str, problems: list[tuple[str, str]]):
    self.source, self.problems = source, problems
    lines = "\n".join(f"  {path or '(top level)'}: {msg}" for path, msg in problems)
    super().__init__(f"{source}: invalid job spec ({len(problems)} problem{'s' * (len(problems) != 1)}):\n{lines}")


class _Strict(BaseModel):
  model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
  """Where the images come from."""
  uri: str = Field(min_length=1, description="glob of shards: gs://b/x/*.tar, /data/*.parquet, s3://b/img/**/*.jpg")
  format: Literal["webdataset", "parquet", "images"] = "webdataset"
  image_column: str = Field("image", min_length=1, description="parquet: column with the image bytes")
  key_column: Optional[str] = Field("key", description="parquet: column with the sample key (row index if absent)")
  files_per_shard: int = Field(1000, ge=1, le=1_000_000, description="images: files per shard (output file); "
                               "default 64 when resources.accelerator is cpu, else 1000")
  storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options, e.g. {project: x}")
  allowed_sources: list[str] = Field(
      default_factory=list, description="URI prefixes that image paths inside the data may point to, besides the "
      "input's own folder (e.g. https://cdn.example.com/images/); see pgbatch.io.sources")

  @field_validator("allowed_sources")
  @classmethod
  def _sources(cls, v: list[str]) -> list[str]:
    from pgbatch.io import sources
    for i, s in enumerate(v):
      try:
        sources.normalize(s if not sources.is_local(s) else os.path.abspath(s))
      except ValueError as e:
        raise ValueError(f"[{i}] {s!r}: {e}") from None
      if sources.WILDCARDS.search(s):
        raise ValueError(f"[{i}] {s!r}: a prefix, not a glob")
    return v


class OutputSpec(_Strict):
  """Where the Parquet files and the manifest go."""
  uri: str = Field(min_length=1, description="folder: gs://b/annotations/nightly/ or a local path")
  storage_options: dict[str, Any] = Field(default_factory=dict)

  @field_validator("uri")
  @classmethod
  def _a_folder(cls, v: str) -> str:
    stem = v.rstrip("/")
    if stem.lower().endswith((".parquet", ".pq", ".json", ".csv")):
      folder = stem.rsplit(".", 1)[0] + "/"
      raise ValueError(f"{v!r} names a file; output.uri is a folder or prefix that gets one Parquet file per input "
                       f"shard and a _manifest/ (e.g. {folder!r})")
    return v


class ModelSpec(_Strict):
  checkpoint: str = Field(min_length=1, description="big_vision .npz (or split parts) or HF safetensors folder")
  tokenizer: str = Field(min_length=1, description="PaliGemma sentencepiece model")
  variant: Optional[str] = Field(None, description="architecture name (`pgbatch models`); inferred if omitted")
  dtype: Literal["bfloat16", "float32", "float16"] = Field(
      "bfloat16", description="default: float32 when resources.accelerator is cpu, else bfloat16")
  vae: Optional[str] = Field(None, description="VQ-VAE mask decoder (vae-oid.npz), needed by segment tasks")

  @field_validator("variant")
  @classmethod
  def _known_variant(cls, v: Optional[str]) -> Optional[str]:
    if v is None:
      return v
    from pgbatch.model import configs
    if v not in configs.VARIANTS:
      raise ValueError(f"unknown model variant {v!r}; expected one of {', '.join(configs.VARIANTS)}")
    return v


class TaskSpec(_Strict):
  """One output column; the fields a kind does not use must be absent (see `pgbatch.tasks`)."""
  name: str
  kind: Literal["caption", "ocr", "answer", "detect", "segment"]
  lang: Optional[str] = None
  classes: Optional[list[str]] = None
  question: Optional[str] = None
  question_field: Optional[str] = None
  max_new_tokens: Optional[int] = None

  def as_dict(self) -> dict:
    return self.model_dump(exclude_none=True)


class DecodeSpec(_Strict):
  max_pixels: int = Field(178_956_970, ge=1, description="larger images are errors (decompression bombs)")
  max_decoded_bytes: Optional[int] = Field(
      None, ge=1 << 20, description="larger decoded images (width x height x bytes per pixel, from the header) "
      "are errors; default: what lets the decode tasks of the smallest node run at once in half its memory")
  batch_size: int = Field(32, ge=1, le=4096, description="images per decode task batch")


class ResourcesSpec(_Strict):
  """Where the annotate stage runs (see `pgbatch.placement`) and how big its batches are."""
  accelerator: Literal["cpu", "gpu", "tpu"] = "cpu"
  actors: int = Field(1, ge=1, le=10_000, description="annotate actors (one per accelerator host)")
  chips_per_actor: int = Field(1, ge=1, le=256)
  batch_size: int = Field(64, ge=1, le=65_536, description="images per annotate batch")
  num_cpus: float = Field(1.0, gt=0, description="CPUs reserved by each annotate actor")
  cpu_stage_cpus: float = Field(0.25, gt=0, le=64, description="CPUs per read/decode task and safety actor")
  safety_actors: Optional[int] = Field(None, ge=1, le=10_000,
                                       description="most text-safety actors (default: 2 per annotate actor)")
  concurrent_batches: Optional[int] = Field(
      None, ge=1, le=8, description="batches each annotate actor works on at once (default: 2 on gpu/tpu, so "
      "the host work of one batch overlaps the device running the other; 1 on cpu)")
  memory_fraction: float = Field(0.75, gt=0, le=1, description="gpu: XLA_PYTHON_CLIENT_MEM_FRACTION")
  topology: Optional[str] = None
  init_retries: int = Field(3, ge=0, le=100)
  init_backoff_s: float = Field(2.0, ge=0)
  no_progress_timeout_s: float = Field(3600.0, gt=0)
  wait_for_actors_s: float = Field(1800.0, gt=0)


class JobSpec(_Strict):
  """A whole job. `tasks` are checked by `pgbatch.tasks.make_task`; `safety` merges over the shipped defaults."""
  name: str = Field(description="job name, part of provenance.job_id and the manifest")
  input: InputSpec
  output: OutputSpec
  model: ModelSpec
  tasks: list[TaskSpec] = Field(min_length=1)
  resources: ResourcesSpec = ResourcesSpec()
  decode: DecodeSpec = DecodeSpec()
  safety: SafetyPolicy = Field(default_factory=SafetyPolicy.default)

  @field_validator("name")
  @classmethod
  def _name(cls, v: str) -> str:
    if not NAME_RE.match(v):
      raise ValueError(f"expected letters, digits, '_', '-' or '.', at most 100 characters, got {v!r}")
    return v

  @model_validator(mode="before")
  @classmethod
  def _defaults_follow_accelerator(cls, data: Any) -> Any:
    """When not given: model.dtype float32 on cpu (bfloat16 matmuls are slow and lossy there), else bfloat16;
    input.files_per_shard 64 on cpu (a shard, the unit of commit and resume, takes minutes there, not hours),
    else 1000."""
    if not isinstance(data, dict):
      return data
    model, res, inp = data.get("model"), data.get("resources"), data.get("input")
    acc = res.get("accelerator", "cpu") if isinstance(res, dict) else getattr(res, "accelerator", "cpu")
    if isinstance(model, dict) and model.get("dtype") is None:
      data = {**data, "model": {**model, "dtype": "float32" if acc == "cpu" else "bfloat16"}}
    if isinstance(inp, dict) and inp.get("files_per_shard") is None:
      data = {**data, "input": {**inp, "files_per_shard": 64 if acc == "cpu" else 1000}}
    return data

  @field_validator("safety", mode="before")
  @classmethod
  def _safety_defaults(cls, v: Any) -> Any:
    return SafetyPolicy.model_validate(v) if v is None or isinstance(v, dict) else v

  @model_validator(mode="after")
  def _cross_checks(self) -> "JobSpec":
    from pgbatch import schema, tasks
    built = []
    for i, t in enumerate(self.tasks):
      try:
        built.append(tasks.make_task(t.as_dict()))
      except tasks.TaskSpecError as e:
        raise ValueError(f"tasks[{i}] {e}") from None
    try:
      schema.output_schema(built)
    except ValueError as e:
      m = re.match(r"^tasks\[([^\]]*)\]\.name: (.*)$", str(e))
      if m is None:
        raise
      i = max(j for j, t in enumerate(built) if t.name == m.group(1))
      raise ValueError(f"tasks[{i}].name: {m.group(2)} ({m.group(1)!r})") from None
    seg = [t.name for t in built if t.kind == "segment"]
    if seg and not self.model.vae:
      raise ValueError(f"model.vae: segment task(s) {', '.join(seg)} need the VQ-VAE mask decoder "
                       "(model.vae: path or URL of vae-oid.npz)")
    if self.resources.accelerator == "tpu" and self.model.dtype == "float16":
      raise ValueError("model.dtype: float16 is not supported on TPU; use bfloat16 or float32")
    return self

  # --- derived ----------------------------------------------------------------------------------------

  def task_objects(self, vae=None) -> list:
    """`pgbatch.tasks.Task` per entry (segment tasks bound to `vae` when given)."""
    from pgbatch import tasks
    return [tasks.make_task(t.as_dict(), vae=vae if t.kind == "segment" else None) for t in self.tasks]

  def output_schema(self):
    from pgbatch import schema
    return schema.output_schema(self.task_objects())

  def text_task_names(self) -> list[str]:
    from pgbatch import tasks
    return [t.name for t in self.tasks if t.kind in tasks.TEXT_KINDS]

  def post_filter(self):
    """The text-safety stage for this job (constructing it validates the policy against the tasks)."""
    from pgbatch.safety.stages import PostFilter
    return PostFilter(self.safety, text_fields=self.text_task_names(), task_fields=[t.name for t in self.tasks])

  def to_yaml(self, redacted: bool = True) -> str:
    """The resolved spec as YAML; credential-looking values replaced (`pgbatch.redact`) unless `redacted=False`."""
    from pgbatch.redact import redact
    tree = self.model_dump(mode="json", exclude_none=True)
    return yaml.safe_dump(redact(tree) if redacted else tree, sort_keys=False)

  def secrets(self) -> set[str]:
    """Credential-looking values of this spec, for the log filter (`pgbatch.redact`)."""
    from pgbatch.redact import secrets_in
    return secrets_in(self.model_dump(mode="json", exclude_none=True))


# --- loading ----------------------------------------------------------------------------------------------


def _loc(loc: tuple) -> str:
  out = ""
  for part in loc:
    if isinstance(part, int):
      out += f"[{part}]"
    elif part in ("function-after", "function-before") or "[" in str(part) or str(part).startswith("literal"):
      continue
    else:
      out += ("." if out else "") + str(part)
  return out


def _did_you_mean(loc: tuple) -> Optional[str]:
  """The known field closest to the unknown last part of `loc` (`ouput` -> `output`), if any is close."""
  import difflib
  import typing
  cls: Any = JobSpec
  for part in loc[:-1]:
    if isinstance(part, int) or not (isinstance(cls, type) and issubclass(cls, BaseModel)):
      continue
    info = cls.model_fields.get(str(part))
    if info is None:
      return None
    todo, cls = [info.annotation], None
    while todo:  # Optional[X] / list[X] -> X
      t = todo.pop()
      if isinstance(t, type) and issubclass(t, BaseModel):
        cls = t
        break
      todo += list(typing.get_args(t))
  if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
    return None
  near = difflib.get_close_matches(str(loc[-1]), list(cls.model_fields), n=1, cutoff=0.6)
  return near[0] if near else None


def _problems(e: ValidationError) -> list[tuple[str, str]]:
  out = []
  for err in e.errors(include_url=False):
    path, msg = _loc(err["loc"]), err["msg"]
    msg = re.sub(r"^(Value|Assertion) error, ", "", msg)
    if err["type"] == "extra_forbidden":
      near = _did_you_mean(err["loc"])
      msg = (f"unknown field; did you mean {near!r}?" if near else
             "unknown field (check the spelling; see `pgbatch validate --help` for the spec shape)")
    elif err["type"] == "missing":
      msg = "required field is missing"
    elif "input" in err and err["type"] not in ("value_error", "assertion_error") and not isinstance(
        err["input"], (dict, list)):
      msg = f"{msg} (got {err['input']!r})"
    m = re.match(r"^(tasks\[\d+\]) tasks\[[^\]]*\]\.(\S+): (.*)$", msg, re.S)
    if m:  # make_task names the task by its name; lead with the position so the path is exact
      path, msg = f"{m.group(1)}.{m.group(2)}", m.group(3)
    else:
      m = re.match(r"^((?:model|tasks\[[^\]]*\])(?:\.[\w\[\]]+)*): (.*)$", msg, re.S)
      if m and path == "":
        path, msg = m.group(1), m.group(2)
    out.append((path, msg))
  return out


# Fields whose strings may use `${VAR}`: locations and credentials, never text that flows into outputs.
ENV_FIELDS = re.compile(r"^(?:input\.uri|output\.uri|model\.(?:checkpoint|tokenizer|vae)|safety\.\w+\.uri|"
                        r"input\.allowed_sources\[\d+\]|(?:input|output)\.storage_options(?:[.\[].*)?)$")


def expand_env(node: Any, environ: Mapping[str, str], path: str = "") -> Any:
  """`${VAR}` / `${VAR:-default}` in the location and credential fields (ENV_FIELDS); anywhere else a
  JobSpecError naming the field (a question or name would carry the value into every output row)."""
  if isinstance(node, dict):
    return {k: expand_env(v, environ, f"{path}.{k}" if path else str(k)) for k, v in node.items()}
  if isinstance(node, list):
    return [expand_env(v, environ, f"{path}[{i}]") for i, v in enumerate(node)]
  if not isinstance(node, str) or not VAR_RE.search(node):
    return node
  if not ENV_FIELDS.match(path):
    name = VAR_RE.search(node).group(1)
    raise JobSpecError("environment", [(path, f"${{{name}}}: environment variables are expanded only in "
                                        "location and credential fields (input/output uri and storage_options, "
                                        "model paths, safety list uris); this field's text reaches the output "
                                        f"(give the value itself, or --set {path}=...)")])

  def sub(m):
    name, default = m.group(1), m.group(2)
    if name in environ:
      return environ[name]
    if default is not None:
      return default
    raise JobSpecError("environment", [(path, f"${{{name}}} is not set (use ${{{name}:-default}} for a default)")])
  return VAR_RE.sub(sub, node)


_PART_RE = re.compile(r"([^.\[\]]+)|\[([^\]]*)\]")


def split_path(path: str) -> list[str | int]:
  """`tasks[0].lang` / `tasks.0.lang` / `tasks[objects].classes` → ['tasks', 0, 'lang'] (names kept as str)."""
  parts: list[str | int] = []
  for m in _PART_RE.finditer(path):
    p = m.group(1) if m.group(1) is not None else m.group(2)
    parts.append(int(p) if p.lstrip("-").isdigit() else p)
  if not parts or "".join(str(p) for p in parts).strip() == "":
    raise ValueError(f"empty field path {path!r}")
  return parts


def set_path(tree: dict, path: str, value: Any, where: str = "--set") -> None:
  """Sets `value` at `path` in the nested dict/list `tree` (creating mappings on the way)."""
  parts = split_path(path)
  node: Any = tree
  for i, part in enumerate(parts):
    last = i == len(parts) - 1
    shown = path if last else ".".join(str(p) for p in parts[:i + 1])
    if isinstance(node, list):
      if isinstance(part, str):  # a task by name
        idx = [j for j, x in enumerate(node) if isinstance(x, dict) and x.get("name") == part]
        if not idx:
          raise JobSpecError(where, [(shown, f"no list entry named {part!r}")])
        part = idx[0]
      if not -len(node) <= part < len(node):
        if last and part == len(node):
          node.append(value)
          return
        raise JobSpecError(where, [(shown, f"index {part} out of range (the list has {len(node)} entries)")])
      if last:
        node[part] = value
        return
      node = node[part]
      continue
    if not isinstance(node, dict):
      raise JobSpecError(where, [(shown, f"cannot set a field inside a {type(node).__name__}")])
    part = str(part)
    if last:
      node[part] = value
      return
    if not isinstance(node.get(part), (dict, list)):
      node[part] = {}
    node = node[part]


def parse_override(text: str) -> tuple[str, Any]:
  """`a.b=c` → ('a.b', yaml value of c)."""
  if "=" not in text:
    raise JobSpecError("--set", [(text, "expected PATH=VALUE, e.g. resources.batch_size=32")])
  path, raw = text.split("=", 1)
  try:
    value = yaml.safe_load(raw) if raw.strip() else ""
  except yaml.YAMLError:
    value = raw
  return path.strip(), value


def env_overrides(environ: Mapping[str, str]) -> list[tuple[str, Any]]:
  """`PGBATCH__OUTPUT__URI=x` → [('output.uri', 'x')], sorted by variable name."""
  out = []
  for k in sorted(environ):
    if k.upper().startswith(ENV_PREFIX) and len(k) > len(ENV_PREFIX):
      path = ".".join(p.lower() for p in k[len(ENV_PREFIX):].split("__"))
      out.append((path, parse_override(f"x={environ[k]}")[1]))
  return out


def env_variables(environ: Mapping[str, str]) -> dict[str, str]:
  """field path -> the `PGBATCH__…` variable that sets it (as `env_overrides` reads them)."""
  return {".".join(p.lower() for p in k[len(ENV_PREFIX):].split("__")): k for k in sorted(environ)
          if k.upper().startswith(ENV_PREFIX) and len(k) > len(ENV_PREFIX)}


def name_variables(problems: list[tuple[str, str]], variables: Mapping[str, str]) -> list[tuple[str, str]]:
  """Adds `(set by environment variable PGBATCH__X__Y)` to problems at or under a field an env var set."""
  out = []
  for path, msg in problems:
    var = next((v for p, v in variables.items() if path == p or path.startswith(p + ".") or path.startswith(p + "[")),
               None)
    out.append((path, f"{msg} (set by environment variable {var})" if var else msg))
  return out


def _resolve(value: Optional[str], base: Optional[Path]) -> Optional[str]:
  if value is None or base is None or not is_local_path(value):
    return value
  p = Path(os.path.expanduser(value))
  out = str(p if p.is_absolute() else (base / p))
  return out + "/" if value.endswith("/") and not out.endswith("/") else out


# Fields that name local files when they hold a relative or absolute path (`submit` ships the named files).
PATH_FIELDS = ("input.uri", "output.uri", "model.checkpoint", "model.tokenizer", "model.vae", "safety.hashlist.uri")


def get_path(tree: Any, path: str) -> Any:
  """The value at a dotted `path` of a nested dict (None where any part is missing)."""
  node = tree
  for part in path.split("."):
    node = node.get(part) if isinstance(node, dict) else None
  return node


def resolve_paths(tree: dict, base: Optional[Path]) -> dict:
  """Relative local paths of the PATH_FIELDS (and input.allowed_sources) → absolute (Ray workers have another
  cwd)."""
  for field in PATH_FIELDS:
    section, _, key = field.rpartition(".")
    node = get_path(tree, section)
    if isinstance(node, dict) and isinstance(node.get(key), str):
      node[key] = _resolve(node[key], base)
  inp = tree.get("input")
  if isinstance(inp, dict) and isinstance(inp.get("allowed_sources"), list):
    inp["allowed_sources"] = [_resolve(s, base) if isinstance(s, str) else s for s in inp["allowed_sources"]]
  return tree


def merged_tree(tree: dict, overrides: Iterable[str] = (), environ: Optional[Mapping[str, str]] = None) -> dict:
  """A copy of `tree` with the `PGBATCH__…` environment and `--set` overrides applied (no `${VAR}` expansion,
  no path resolution): the spec as written, as it will be run."""
  import copy
  environ = os.environ if environ is None else environ
  tree = copy.deepcopy(tree)
  variables = env_variables(environ)
  for path, value in env_overrides(environ):
    set_path(tree, path, value, where=f"environment variable {variables[path]}")
  for text in overrides:
    set_path(tree, *parse_override(text))
  return tree


def from_dict(tree: Any, overrides: Iterable[str] = (), environ: Optional[Mapping[str, str]] = None, *,
              source: str = "<dict>", base: Optional[Path] = None) -> JobSpec:
  """Validates a spec tree with env and `--set` overrides applied; raises JobSpecError."""
  environ = os.environ if environ is None else environ
  if not isinstance(tree, dict):
    raise JobSpecError(source, [("", f"a job spec is a YAML mapping, got {type(tree).__name__}")])
  tree = merged_tree(tree, overrides, environ)
  try:
    tree = expand_env(tree, environ)
  except JobSpecError as e:
    raise JobSpecError(source, e.problems) from None
  tree = resolve_paths(tree, base)
  try:
    spec = JobSpec.model_validate(tree)
  except ValidationError as e:
    raise JobSpecError(source, name_variables(_problems(e), env_variables(environ))) from None
  try:
    spec.post_filter()
  except ValueError as e:
    raise JobSpecError(source, [("safety", str(e))]) from None
  return spec


def read_yaml(path: str) -> tuple[Any, Optional[Path]]:
  """The YAML tree of a job file (local path or fsspec URL) and the folder its relative paths resolve against
  (None for URLs); JobSpecError naming the file when it cannot be read or parsed. The one job-file reader."""
  path = str(path)
  base = None
  try:
    if is_local_path(path):
      text = Path(path).read_text()
      base = Path(path).resolve().parent
    else:
      import fsspec
      with fsspec.open(path, "r") as f:
        text = f.read()
  except FileNotFoundError:
    raise JobSpecError(path, [("", "file not found")]) from None
  except IsADirectoryError:
    raise JobSpecError(path, [("", "is a folder, expected a YAML job spec")]) from None
  try:
    return yaml.safe_load(text), base
  except yaml.YAMLError as e:
    raise JobSpecError(path, [("", f"not valid YAML: {e}")]) from None


def load(path: str, overrides: Iterable[str] = (), environ: Optional[Mapping[str, str]] = None) -> JobSpec:
  """Reads a YAML job spec (local path or fsspec URL) and validates it (see the module doc)."""
  tree, base = read_yaml(path)
  return from_dict(tree, overrides, environ, source=str(path), base=base)


def load_partial(path: str, overrides: Iterable[str] = (), environ: Optional[Mapping[str, str]] = None) -> dict:
  """A job file's tree with the environment and `--set` overrides applied but not validated as a whole, for
  commands that read one section (`pgbatch schema show --job`, `pgbatch safety show --job`)."""
  tree, _ = read_yaml(path)
  if tree is None:
    return {}
  if not isinstance(tree, dict):
    raise JobSpecError(str(path), [("", f"a job spec is a YAML mapping, got {type(tree).__name__}")])
  return merged_tree(tree, overrides, environ)


load_job = load
