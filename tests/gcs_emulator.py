"""A real GCS emulator (`gcp-storage-emulator`) on loopback, for tests that read or write `gs://` URLs.

    from tests.gcs_emulator import gcs      # in conftest.py (already done): the session fixture
    def test_x(gcs):
      fs, bucket = gcs                      # gcsfs.GCSFileSystem talking to the emulator; an empty bucket
      fs.pipe(f"{bucket}/a.bin", b"...")    # and plain "gs://{bucket}/a.bin" URLs work through fsspec.open too

The server runs in-process (a thread) on a free 127.0.0.1 port with in-memory storage. `STORAGE_EMULATOR_HOST`
is set for the whole session so every gcsfs instance (including ones fsspec creates from `gs://` URLs, also in
Ray workers started afterwards) talks to it; fsspec's instance cache is cleared on start and stop.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
from typing import Iterator

import pytest

BUCKET = "pgbatch-test"


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def gcs_emulator(bucket: str = BUCKET) -> Iterator[tuple[object, str]]:
  """Starts the emulator, yields (gcsfs.GCSFileSystem, bucket name), restores the environment after."""
  from gcp_storage_emulator.server import create_server  # pylint: disable=g-import-not-at-top
  os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"  # read when gcsfs is first imported
  import fsspec  # pylint: disable=g-import-not-at-top
  import gcsfs  # pylint: disable=g-import-not-at-top

  logging.getLogger("gcp_storage_emulator").setLevel(logging.WARNING)
  port = free_port()
  endpoint = f"http://127.0.0.1:{port}"
  server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
  server.start()
  env = {"STORAGE_EMULATOR_HOST": endpoint, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  gcsfs.GCSFileSystem.clear_instance_cache()
  fsspec.AbstractFileSystem.clear_instance_cache()
  try:
    yield gcsfs.GCSFileSystem(endpoint_url=endpoint, token="anon", project="test"), bucket
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    gcsfs.GCSFileSystem.clear_instance_cache()
    server.stop()


@pytest.fixture(scope="session")
def gcs():
  """Session-wide (gcsfs filesystem, bucket) on a loopback GCS emulator. Use unique prefixes per test."""
  with gcs_emulator() as fs_bucket:
    yield fs_bucket
