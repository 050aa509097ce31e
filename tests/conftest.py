"""Shared test setup. Eight virtual CPU devices so mesh tests can shard; must run before jax is imported."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
