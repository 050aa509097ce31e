"""Shared test setup. Eight virtual CPU devices so mesh tests can shard; must run before jax is imported."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# gcsfs reads this at import time; "true" (its default) routes bucket probes over gRPC, which the emulator lacks.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

from tests.gcs_emulator import gcs  # noqa: E402,F401  (session fixture: loopback GCS emulator)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> str:
  """A real small SentencePiece model with PaliGemma's 257152-piece layout, built once per session."""
  from pgbatch import tokenizer
  return tokenizer.build_test_tokenizer(str(tmp_path_factory.mktemp("tokenizer") / "paligemma_test.model"))
