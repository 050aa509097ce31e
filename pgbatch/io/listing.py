"""A job's input shards, listed with a deadline and one-line errors naming input.uri (the driver and
`pgbatch validate --inputs`; the listing itself is `readers.list_shards`)."""
from __future__ import annotations

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
