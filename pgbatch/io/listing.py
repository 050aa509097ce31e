"""A job's input shards, listed with a deadline and one-line errors naming input.uri (the driver and
`pgbatch validate --inputs`; the listing itself is `readers.list_shards`), and its output location checked
the same way (`check_output`: the driver before any work, and `pgbatch validate`)."""
from __future__ import annotations

from typing import Optional

from pgbatch import errors
from pgbatch.io import readers
from pgbatch.redact import redact_uri


def list_inputs(input_spec, timeout_s: float | None = None) -> list:
  """`readers.list_shards` for a job's `input` section; an unreachable or unreadable location is an InputError
  naming input.uri (after `timeout_s`, when given: listing an unreachable bucket retries for minutes)."""
  uri = input_spec.uri

  def call():
    return readers.list_shards(uri, input_spec.format, files_per_shard=input_spec.files_per_shard,
                               storage_options=dict(input_spec.storage_options) or None)
  try:
    return call() if timeout_s is None else errors.call_with_deadline(call, timeout_s)
  except readers.InputError:
    raise
  except (OSError, ValueError) as e:  # TimeoutError and connection errors are OSErrors
    raise readers.InputError(f"input.uri: cannot list {redact_uri(uri)}: {type(e).__name__}: "
                             f"{errors.one_line(e)}") from None


def check_output(uri: str, storage_options: Optional[dict] = None) -> None:
  """OutputError (naming output.uri) when `uri` is a file, lies under a file, or cannot be reached."""
  import fsspec
  shown = redact_uri(uri)
  try:
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    probe = path.rstrip("/")
    while probe and not fs.exists(probe):
      parent = probe.rsplit("/", 1)[0] if "/" in probe else ""
      if parent == probe:
        break
      probe = parent
    if probe and fs.isfile(probe):
      where = "is a file" if probe == path.rstrip("/") else f"lies under the file {probe}"
      raise errors.OutputError(f"output.uri: {shown} {where}; expected a folder")
  except errors.OutputError:
    raise
  except (OSError, ValueError) as e:
    raise errors.OutputError(f"output.uri: cannot use {shown}: {type(e).__name__}: {errors.one_line(e)}") from None
