"""Where the annotate stage runs: `resources` (from the job spec) → Ray arguments, mesh shape, actor robustness.

Pure functions; the only module-level Ray import is lazy so the Engine side can use `mesh_shape` without Ray.

How the pipeline uses it::

    ds = ds.map_batches(decode, runtime_env=cpu_stage_env(), ...)            # decode / safety / sink
    ds = ds.map_batches(AnnotatorActor, batch_size=res.batch_size, **annotate_ray_args(res))
    configure_data_context(ray.data.DataContext.get_current(), res)

and inside the annotate actor::

    self.engine = init_with_retry(lambda: Engine(cfg, params, mesh=jax.make_mesh(mesh_shape(n, variant), ("data", "model"))))
    ...
    except Exception as e:
      exit_if_fatal(e)     # device lost / HBM corrupted → the actor process exits, Ray Data replaces it
      raise

Accelerators (`resources.accelerator`):
- `cpu`: one CPU actor per `actors`; the default and what tests and the demo use.
- `gpu`: `num_gpus=chips_per_actor`; `XLA_PYTHON_CLIENT_MEM_FRACTION` caps JAX's preallocation so the
  safety filters or decode can share the GPU node.
- `tpu`: `resources={"TPU": chips_per_actor}` (8 on a v5e host): one actor per TPU host; Ray sets
  `TPU_VISIBLE_CHIPS` for it. Multi-host slices: `tpu_slice_placement_group` (see there).
Every CPU stage gets `JAX_PLATFORMS=cpu` so no other process grabs the accelerator.
"""
from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any, Callable, Mapping, Optional, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

ACCELERATORS = ("cpu", "gpu", "tpu")
V5E_CHIPS_PER_HOST = 8
# bf16 weights must fit in this share of one device's memory; the rest is KV cache and activations.
WEIGHT_MEMORY_SHARE = 0.5
DEFAULT_DEVICE_MEMORY = {"tpu": 16 << 30, "gpu": 80 << 30, "cpu": 1 << 40}  # v5e HBM, H100, host RAM

# Messages after which this process's accelerator is unusable, whatever the exception type.
FATAL_DEVICE_MARKERS = (
    "CUDA_ERROR_ILLEGAL_ADDRESS", "CUDA_ERROR_LAUNCH_FAILED", "CUDA_ERROR_ECC_UNCORRECTABLE",
    "CUDA_ERROR_DEVICE_UNAVAILABLE", "CUDA_ERROR_UNKNOWN", "cudaErrorIllegalAddress",
    "uncorrectable ECC", "GPU has fallen off the bus", "NCCL error",
    "TPU halted", "TPU device error", "Failed to get TPU", "TPU initialization failed",
    "Unable to initialize backend 'tpu'", "Unable to initialize backend 'cuda'",
)
# XLA status codes that mean the runtime (not the program) broke; only for XLA's own exception types.
FATAL_XLA_STATUS = ("DATA_LOSS", "UNAVAILABLE", "ABORTED", "DEADLINE_EXCEEDED", "INTERNAL: Failed to")
XLA_EXCEPTION_TYPES = ("XlaRuntimeError", "JaxRuntimeError")


def field(resources: Any, name: str) -> Any:
  """A field of `resources` (the job's `config.ResourcesSpec`, or any dict or object with some of its fields, or
  None); missing or None fields take `ResourcesSpec`'s default, the one place defaults are written."""
  value = None
  if resources is not None:
    value = resources.get(name) if isinstance(resources, Mapping) else getattr(resources, name, None)
  return getattr(_default_resources(), name) if value is None else value


@functools.cache
def _default_resources():
  from pgbatch.config import ResourcesSpec  # pylint: disable=g-import-not-at-top  (keeps placement light in Ray workers)
  return ResourcesSpec()


def accelerator(resources: Any) -> str:
  acc = str(field(resources, "accelerator")).lower()
  if acc not in ACCELERATORS:
    raise ValueError(f"resources.accelerator must be one of {ACCELERATORS}, got {acc!r}")
  return acc


def cpu_stage_env() -> dict:
  """Runtime env for every non-annotate stage: JAX (if imported) stays off the accelerator."""
  return {"env_vars": {"JAX_PLATFORMS": "cpu"}}


def annotate_env(resources: Any) -> dict:
  """Runtime env of the annotate actors."""
  acc = accelerator(resources)
  env = {"PGBATCH_ACCELERATOR": acc}
  if acc == "gpu":
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{float(field(resources, 'memory_fraction')):.2f}"
  if acc == "cpu":
    env["JAX_PLATFORMS"] = "cpu"
  return {"env_vars": env}


def chips_per_actor(resources: Any) -> int:
  """Accelerators each annotate actor holds. On TPU with a `topology` (e.g. "2x4", "4x4"), a whole host:
  the topology's chips per host (8 on a single-host v5e 2x4, 4 on each host of a multi-host slice);
  `chips_per_actor` may then be left at 1 or must equal that."""
  chips = int(field(resources, "chips_per_actor"))
  topology = field(resources, "topology")
  if accelerator(resources) != "tpu" or not topology:
    return chips
  host = tpu_chips_per_host(str(topology))
  if chips not in (1, host):
    raise ValueError(f"resources.chips_per_actor is {chips} but a host of TPU topology {topology} has {host} chips")
  return host


def concurrent_batches(resources: Any) -> int:
  """Batches one annotate actor works on at once. With 2, the host work of one batch (prompts, padding,
  parsing, Arrow) overlaps the device running the other; JAX dispatch is thread-safe. Default: 2 on an
  accelerator, 1 on `cpu` (where host and "device" share the same cores)."""
  value = field(resources, "concurrent_batches")
  if value is None:
    return 1 if accelerator(resources) == "cpu" else 2
  if int(value) < 1:
    raise ValueError(f"resources.concurrent_batches must be >= 1, got {value}")
  return int(value)


def annotate_ray_args(resources: Any) -> dict:
  """Keyword arguments for `ds.map_batches(AnnotateActor, **annotate_ray_args(resources))`.

  One actor pool of `actors` actors; each holds `chips_per_actor` accelerators and runs
  `concurrent_batches` calls at once (threads sharing one Engine). A crashed actor is
  restarted without limit and its in-flight batch retried: Ray Data's own defaults for actor pools
  (`max_restarts=-1`, `max_task_retries=-1`), which tests/test_infra_placement.py checks for real. They are
  not passed here: Ray 2.60 deprecates `**ray_remote_args` in `map_batches` (removed in 2.64).
  """
  from ray.data import ActorPoolStrategy
  acc, chips, actors = accelerator(resources), chips_per_actor(resources), int(field(resources, "actors"))
  if chips < 1 or actors < 1:
    raise ValueError(f"resources.actors and chips_per_actor must be >= 1, got {actors}, {chips}")
  calls = concurrent_batches(resources)
  overlap = dict(max_concurrent_calls_per_actor=calls, enable_true_multi_threading=True) if calls > 1 else {}
  pool = ActorPoolStrategy(size=actors, **overlap)
  args = dict(compute=pool, num_cpus=float(field(resources, "num_cpus")),
              runtime_env=annotate_env(resources))
  if acc == "gpu":
    args["num_gpus"] = chips
  elif acc == "tpu":
    args["resources"] = {"TPU": chips}
  return args


def configure_data_context(ctx: Any, resources: Any = None) -> Any:
  """Bound every wait so a lost actor fails the job instead of hanging it at 99%.

  Constructor errors are retried in the actor (`init_retries`), actors that die while starting are
  replaced, actors that never get placed time out (`wait_for_actors_s`), and an execution that makes
  no progress for `no_progress_timeout_s` raises.
  """
  ctx.actor_init_retry_on_errors = True
  ctx.actor_init_max_retries = int(field(resources, "init_retries"))
  ctx.max_consecutive_actor_init_deaths = max(2, 2 * int(field(resources, "actors")))
  ctx.wait_for_min_actors_s = int(field(resources, "wait_for_actors_s"))
  ctx.execution_no_progress_timeout_s = float(field(resources, "no_progress_timeout_s"))
  return ctx


# --- decode memory ---------------------------------------------------------------------------------------

DECODE_MEMORY_SHARE = 0.5  # of a node's Ray `memory` for the decode tasks running on it at once
MIN_DECODE_BUDGET = 64 << 20
FALLBACK_DECODE_BUDGET = 512 << 20  # when no node reports memory


def decode_memory_budget(nodes: list[dict], cpu_stage_cpus: float, peak_factor: float) -> int:
  """Default decode.max_decoded_bytes: on the smallest alive node (`ray.nodes()`), DECODE_MEMORY_SHARE of its
  memory split over the decode tasks it runs at once (CPU / cpu_stage_cpus), divided by the decoder's peak
  working memory per decoded byte. At least MIN_DECODE_BUDGET."""
  budgets = []
  for n in nodes:
    res = n.get("Resources") or {}
    mem, cpus = float(res.get("memory", 0)), float(res.get("CPU", 0))
    if n.get("Alive", True) and mem > 0 and cpus > 0:
      tasks = max(1.0, cpus / float(cpu_stage_cpus))
      budgets.append(int(mem * DECODE_MEMORY_SHARE / tasks / peak_factor))
  return max(MIN_DECODE_BUDGET, min(budgets)) if budgets else FALLBACK_DECODE_BUDGET


# --- local Ray ------------------------------------------------------------------------------------------

LOOPBACK = "127.0.0.1"
# Ray turns a node IP of 127.0.0.1 into this machine's LAN address (and then listens on every interface)
# unless "clusters" are off, as Ray does by default on macOS/Windows.
RAY_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def start_local_ray(**init_kwargs: Any) -> None:
  """`ray.init(address="local", ...)` whose processes (GCS, raylet, workers, agents) listen on 127.0.0.1 only,
  with Ray's default token authentication, and no dashboard unless `include_dashboard=True` (then on
  127.0.0.1). Raises RuntimeError (after shutting Ray down) if Ray picked another node address."""
  import ray
  from ray._private import ray_constants  # pylint: disable=g-import-not-at-top
  # "Token authentication is enabled" on every start: that is the default we want, not news.
  logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
  init_kwargs.setdefault("include_dashboard", False)
  if init_kwargs["include_dashboard"]:
    init_kwargs["dashboard_host"] = LOOPBACK
  saved_env, saved_const = os.environ.get(RAY_CLUSTER_ENV), ray_constants.ENABLE_RAY_CLUSTER
  os.environ[RAY_CLUSTER_ENV] = "0"  # the processes Ray starts now read it
  ray_constants.ENABLE_RAY_CLUSTER = False  # this process already read it
  try:
    ray.init(address="local", _node_ip_address=LOOPBACK, **init_kwargs)
  finally:
    ray_constants.ENABLE_RAY_CLUSTER = saved_const
    if saved_env is None:
      os.environ.pop(RAY_CLUSTER_ENV, None)
    else:
      os.environ[RAY_CLUSTER_ENV] = saved_env
  ip = ray.util.get_node_ip_address()
  if ip != LOOPBACK:
    ray.shutdown()
    raise RuntimeError(f"the local Ray chose node address {ip}, not {LOOPBACK}; refusing to listen on it")


# --- mesh -----------------------------------------------------------------------------------------------


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def mesh_shape(num_devices: int, variant: str, device_memory_bytes: int | None = None,
               accelerator_kind: str = "tpu") -> tuple[int, int]:
  """`(data, model)` for a Mesh over one actor's devices.

  28B models are sharded over `model` on all devices. Others use the smallest `model` axis (dividing the
  device count and the head count) whose bf16 weight shard fits `WEIGHT_MEMORY_SHARE` of one device;
  the rest of the devices replicate along `data`.
  """
  if num_devices < 1:
    raise ValueError(f"num_devices must be >= 1, got {num_devices}")
  if "28b" in variant:
    return 1, num_devices
  from pgbatch.model import configs
  cfg = configs.get(variant)
  budget = WEIGHT_MEMORY_SHARE * (device_memory_bytes or DEFAULT_DEVICE_MEMORY[accelerator_kind])
  weights = 2 * configs.num_params(cfg)
  fits = [m for m in _divisors(num_devices) if weights / m <= budget]
  heads_ok = [m for m in fits if cfg.text.num_heads % m == 0]
  model = (heads_ok or fits or [num_devices])[0]
  return num_devices // model, model


# --- TPU slices -----------------------------------------------------------------------------------------


def tpu_slice_supported() -> bool:
  """True when this Ray has `ray.util.tpu.SlicePlacementGroup` (Ray >= 2.49)."""
  try:
    from ray.util import tpu
  except ImportError:
    return False
  return hasattr(tpu, "slice_placement_group") or hasattr(tpu, "SlicePlacementGroup")


def tpu_slice_placement_group(topology: str, accelerator_version: str = "v5litepod", num_slices: int = 1):
  """Reserve whole TPU slice(s) (one bundle per host, `TPU: chips_per_host`) for a multi-host mesh.

  Returns `(placement_group, num_hosts)`; schedule one annotate actor per host with
  `PlacementGroupSchedulingStrategy(placement_group)` and let JAX's distributed runtime span the slice
  (`jax.distributed.initialize()` picks up the TPU worker env Ray sets). Raises `RuntimeError` on a Ray
  without slice placement groups: single-host placement (`annotate_ray_args`) still works there.
  """
  if not tpu_slice_supported():
    raise RuntimeError("this Ray has no ray.util.tpu slice placement groups; use one actor per host")
  from ray.util import tpu
  handle = tpu.slice_placement_group(topology, accelerator_version, num_slices=num_slices)
  return handle.placement_group, handle.num_hosts


def tpu_chips_per_host(topology: str | None, accelerator_version: str = "v5litepod") -> int:
  """Chips one host of a slice owns (8 for a v5e host); `TPU` resource per actor."""
  if not topology:
    return V5E_CHIPS_PER_HOST
  try:
    from ray.util import tpu
    return int(tpu.get_chips_per_host(topology, accelerator_version))
  except (ImportError, AttributeError, ValueError):
    total = 1
    for d in topology.lower().split("x"):
      total *= int(d)
    # v5e/v6e: single-host slices (1x1, 2x2, 2x4) own all their chips; multi-host slices have 4 per host.
    return total if total <= V5E_CHIPS_PER_HOST else 4


# --- actor robustness -----------------------------------------------------------------------------------


def is_fatal_device_error(exc: BaseException) -> bool:
  """True when `exc` means this process's accelerator is gone or corrupted (retrying here is pointless)."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    text = str(exc)
    if any(m in text for m in FATAL_DEVICE_MARKERS):
      return True
    if type(exc).__name__ in XLA_EXCEPTION_TYPES and text.lstrip().startswith(FATAL_XLA_STATUS):
      return True
    exc = exc.__cause__ or exc.__context__
  return False


def exit_actor(code: int = 1) -> None:
  """End this worker process so Ray restarts the actor (never returns).

  `os._exit`, not `ray.actor.exit_actor()`: the latter is an intended exit, which Ray never restarts.
  """
  logging.shutdown()
  os._exit(code)


def exit_if_fatal(exc: BaseException, exit_fn: Callable[[int], None] = exit_actor) -> None:
  """Call from the actor's `except`: a fatal device error kills the process; anything else returns."""
  if is_fatal_device_error(exc):
    log.error("fatal device error, exiting so Ray replaces this actor: %s", exc)
    exit_fn(1)


def init_with_retry(make: Callable[[], T], retries: int = 3, backoff_s: float = 2.0,
                    sleep: Callable[[float], None] = time.sleep) -> T:
  """`make()` with up to `retries` retries (exponential backoff); a fatal device error exits at once."""
  for attempt in range(retries + 1):
    try:
      return make()
    except Exception as e:  # noqa: BLE001 - every init failure is retried, then re-raised
      exit_if_fatal(e)
      if attempt == retries:
        raise
      log.warning("actor init failed (attempt %d/%d): %s", attempt + 1, retries + 1, e)
      sleep(backoff_s * 2 ** attempt)
  raise AssertionError("unreachable")


# --- local Ray: start-up and resource checks ----------------------------------------------------------


def ensure_ray(accelerator: str = "cpu", num_cpus: Optional[int] = None) -> bool:
  """Starts a local Ray (or connects to RAY_ADDRESS) unless one is initialized. Returns True when this
  process started a local Ray, whose workers therefore inherit this process's environment."""
  import ray
  if ray.is_initialized():
    return False
  address = os.environ.get("RAY_ADDRESS") or "local"
  kwargs = dict(address=address, include_dashboard=False, logging_level=logging.WARNING,
                configure_logging=True, log_to_driver=True)
  if address == "local":
    # at least 2 logical CPUs: the annotate actor takes 1, the CPU stages share the other
    kwargs["num_cpus"] = num_cpus or max(os.cpu_count() or 1, 2)
    if accelerator == "cpu":  # every stage wants JAX on the CPU: workers inherit it, no per-stage env needed
      os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if address == "local":
    del kwargs["address"]
    start_local_ray(**kwargs)  # loopback only, token auth
  else:
    ray.init(**kwargs)
  return address == "local"


class ResourceError(RuntimeError):
  """The local Ray cannot host the job's actors (it would wait for them until wait_for_actors_s)."""


def check_local_resources(spec, available: dict) -> None:
  """For a local Ray started here: fail at once when the annotate actors cannot all be placed."""
  res = spec.resources
  need = {"CPU": res.actors * res.num_cpus + 2 * res.cpu_stage_cpus}
  if res.accelerator == "gpu":
    need["GPU"] = res.actors * res.chips_per_actor
  elif res.accelerator == "tpu":
    need["TPU"] = res.actors * res.chips_per_actor
  short = {k: (v, float(available.get(k, 0))) for k, v in need.items() if float(available.get(k, 0)) + 1e-9 < v}
  if short:
    what = ", ".join(f"{k}: needs {v:g}, this machine has {a:g}" for k, (v, a) in short.items())
    raise ResourceError(f"resources: the local Ray cannot place {res.actors} {res.accelerator} annotate actor(s) "
                        f"({what}); lower resources.actors / chips_per_actor / num_cpus, or run on a cluster "
                        "(RAY_ADDRESS)")


def stage_runtime_env(env: dict, inherited: bool) -> Optional[dict]:
  """`env` unless every variable already has that value in workers that inherit this process's environment
  (then workers Ray prestarted can run the stage instead of fresh processes: seconds saved per stage)."""
  if inherited and all(os.environ.get(k) == v for k, v in (env.get("env_vars") or {}).items()) and set(env) <= {
      "env_vars"}:
    return None
  return env


def ray_resources() -> dict:
  """The resources of the Ray this process is attached to."""
  import ray
  return ray.cluster_resources()
