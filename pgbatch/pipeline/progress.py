"""What a run shows: the progress line and its phases while it runs (one definition of the rate everywhere), and
the `Summary` it returns.

Phases, in order: `checking input and model` (listing shards, the output's manifest, model headers), `starting Ray`, `loading and compiling the model` (until the first batch of
results reaches the driver), `annotating` (until the last shard is committed). Each phase's duration is kept
(`phases`) and goes into the summary.

Rate: **images per second of annotating** = images that came back after the first batch / seconds since the
first batch came back (the steady state: start-up, model load and compilation are not in it, and neither is the
first batch, whose time started before the clock did). Until a second batch arrives it is unknown (`…`). The
summary prints this figure and, labelled apart, the wall-clock images / seconds of the whole run.

ETA: from the image count known so far (each shard's row count arrives with its first batch; shards not seen
yet count as the average of those seen) and the annotating rate, or, until that is known, the rate since the
model started loading. On a terminal the line is redrawn in place every second; on other streams (logs) a line
is written at each phase change and every `every_s` seconds while the run goes, and a final line when it ends.
"""
from __future__ import annotations

import dataclasses
import sys
import threading
import time
from typing import Optional

PHASES = ("checking input and model", "starting Ray", "loading and compiling the model", "annotating")


def fmt_s(s: float) -> str:
  s = int(round(s))
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
  """See the module doc. `update` is called per batch of results and per committed shard."""

  def __init__(self, shards: int, enabled: bool = True, stream=None, every_s: float = 30.0, tick_s: float = 1.0,
               started: Optional[float] = None):
    self.stream = stream or sys.stderr
    self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
    self.enabled, self.every_s = enabled, every_s
    self.shards, self.done_shards, self.images, self.done_images = shards, 0, 0, 0
    self.start = self.last = started or time.monotonic()
    self.phase_name, self.phase_at = PHASES[0], self.start
    self.phases: dict[str, float] = {}
    self.first_at: Optional[float] = None      # the first batch of results came back
    self.first_images = 0
    self.shard_rows: dict[str, int] = {}       # rows per shard, as learnt from the batches
    self.end: Optional[float] = None
    self._lock = threading.Lock()
    self._closed = threading.Event()
    if enabled and tick_s > 0:
      threading.Thread(target=self._tick, args=(tick_s if self.tty else min(tick_s, every_s),),
                       name="pgbatch-progress", daemon=True).start()

  def phase(self, name: str, now: Optional[float] = None, draw: bool = True) -> None:
    """Ends the current phase (its duration is kept) and starts `name`."""
    now = now or time.monotonic()
    with self._lock:
      self.phases[self.phase_name] = now - self.phase_at
      self.phase_name, self.phase_at = name, now
    if self.enabled and draw:  # on a log too: a short run still shows where its time went
      self._draw(now)

  def _tick(self, tick_s: float) -> None:
    while not self._closed.wait(tick_s):
      now = time.monotonic()
      if self.tty or now - self.last >= self.every_s:
        self._draw(now)

  def update(self, images: int = 0, shards: int = 0, done_images: int = 0,
             shard_rows: Optional[dict[str, int]] = None) -> None:
    now = time.monotonic()
    with self._lock:
      if images and self.first_at is None:
        self.first_at, self.first_images = now, images
      self.images += images
      self.done_shards += shards
      self.done_images += done_images
      self.shard_rows.update(shard_rows or {})
    if images and self.phase_name != PHASES[3]:
      self.phase(PHASES[3], now)
    if self.enabled and self.tty:
      self._draw(now)

  def rate(self, now: Optional[float] = None) -> Optional[float]:
    """Images per second of annotating (see the module doc), None until a second batch came back."""
    now = self.end or now or time.monotonic()
    if self.first_at is None or self.images <= self.first_images or now <= self.first_at:
      return None
    return (self.images - self.first_images) / (now - self.first_at)

  def expected_images(self) -> Optional[int]:
    if not self.shard_rows:
      return None
    avg = sum(self.shard_rows.values()) / len(self.shard_rows)
    return round(sum(self.shard_rows.values()) + avg * max(self.shards - len(self.shard_rows), 0))

  def _eta(self, now: float) -> str:
    total = self.expected_images()
    if total is None:
      return "?"
    rate = self.rate(now)
    if rate is None:  # only the first batch so far: its images over the time since the model started loading
      loading = self.phases.get(PHASES[2], 0.0) + self.phases.get(PHASES[1], 0.0)
      rate = self.images / max(now - self.start - self.phases.get(PHASES[0], 0.0) - loading, 1e-9) \
          if loading else None
      rate = rate or self.images / max(now - self.start, 1e-9)
    return fmt_s(max(total - self.images, 0) / rate) if rate else "?"

  def text(self, now: Optional[float] = None) -> str:
    now = self.end or now or time.monotonic()
    elapsed = now - self.start
    frac = self.done_shards / self.shards if self.shards else 1.0
    bar = "#" * int(frac * 24) + "-" * (24 - int(frac * 24))
    head = f"[{bar}] {self.done_shards}/{self.shards} shards  {self.images} images"
    if self.first_at is None:
      done = ", ".join(f"{k} {fmt_s(v)}" for k, v in self.phases.items())
      return (f"{head}  {self.phase_name} … {fmt_s(now - self.phase_at)}" + (f" ({done})" if done else "")
              + f"  elapsed {fmt_s(elapsed)}")
    rate = self.rate(now)
    shown = f"{rate:.2f}" if rate is not None else "…"
    eta = "0:00" if self.end else self._eta(now)
    return f"{head}  {shown} img/s annotating  ETA {eta}  elapsed {fmt_s(elapsed)}"

  def _draw(self, now: float) -> None:
    with self._lock:
      if self._closed.is_set():
        return
      self.last = now
      self.stream.write(("\r" if self.tty else "") + self.text(now) + ("\x1b[K" if self.tty else "\n"))
      self.stream.flush()

  def cancel(self) -> None:
    """Stops the line without a final one (the run failed before it started)."""
    self._closed.set()

  def close(self) -> None:
    """Ends the last phase and writes the final line (on every kind of stream)."""
    if self._closed.is_set():
      return
    now = time.monotonic()
    self.phase("done", now, draw=False)
    self.end = now
    if self.enabled:
      self._draw(now)
      if self.tty:
        self.stream.write("\n")
        self.stream.flush()
    self._closed.set()


@dataclasses.dataclass
class Summary:
  """What one `run` did. `images`: rows written by this run (`ok + error + filtered`)."""
  job: str
  run_id: str
  output_uri: str
  shards_total: int = 0
  shards_skipped: int = 0       # already committed by an earlier run
  shards_committed: int = 0     # committed by this run
  shards_failed: list = dataclasses.field(default_factory=list)  # shard ids not committed by this run
  images: int = 0
  ok: int = 0
  error: int = 0
  filtered: int = 0
  seconds: float = 0.0
  files: list = dataclasses.field(default_factory=list)
  failure: Optional[str] = None   # why the run stopped early, if it did
  reasons: dict = dataclasses.field(default_factory=dict)  # "stage/type" -> error rows written by this run
  annotate_rate: Optional[float] = None  # images/s of annotating (pgbatch.progress); None under two batches
  phases: dict = dataclasses.field(default_factory=dict)   # phase name -> seconds (pgbatch.progress.PHASES)
  changed: list = dataclasses.field(default_factory=list)  # committed shards whose input changed since commit
  model_error: bool = False       # the failure is the model failing to load in the actors (exit 2)
  compiles: dict = dataclasses.field(default_factory=lambda: {"warm_up": 0, "mid_job": 0})  # annotate actors' XLA

  def count_compiles(self, warm_up, mid_job) -> None:
    """Adds a batch's compile columns (`plan.COMPILES`: Arrow int64 columns) to `compiles`."""
    import pyarrow.compute as pc
    for key, col in (("warm_up", warm_up), ("mid_job", mid_job)):
      self.compiles[key] += int(pc.sum(col).as_py() or 0)

  @property
  def success(self) -> bool:
    return self.failure is None and not self.shards_failed

  def reasons_line(self, top: int = 5) -> str:
    """`errors: decode/TruncatedImageError 3, read/ReadError 1` (most frequent first), or ""."""
    if not self.reasons:
      return ""
    items = sorted(self.reasons.items(), key=lambda kv: (-kv[1], kv[0]))
    more = f", … ({len(items) - top} more)" if len(items) > top else ""
    return "errors: " + ", ".join(f"{k} {n}" for k, n in items[:top]) + more

  def line(self) -> str:
    """The run in one line; the two rates are labelled: annotating (steady state) and wall-clock (whole run)."""
    rate = self.images / self.seconds if self.seconds > 0 else 0.0
    skipped = f", {self.shards_skipped} already done" if self.shards_skipped else ""
    failed = f", {len(self.shards_failed)} FAILED" if self.shards_failed else ""
    annotating = f"{self.annotate_rate:.2f} images/s annotating, " if self.annotate_rate is not None else ""
    return (f"pgbatch: {self.job}: {self.images} images (ok {self.ok}, error {self.error}, filtered "
            f"{self.filtered}) in {self.shards_committed}/{self.shards_total} shards{skipped}{failed}, "
            f"{self.seconds:.1f} s, {annotating}{rate:.2f} images/s wall-clock → {self.output_uri}")

  def phases_line(self) -> str:
    """`phases: listing input 0:00, starting Ray 0:04, …` or "" when nothing ran."""
    return ("phases: " + ", ".join(f"{k} {fmt_s(v)}" for k, v in self.phases.items())) if self.phases else ""
