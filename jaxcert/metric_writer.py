"""Training scalars as CSV and as TensorBoard event files.

``MetricWriter(workdir, start_step=s)`` appends one row per logged step to
``workdir/metrics.csv`` and writes the same values as scalar summaries to an event
file under ``workdir/tensorboard/`` (the ``tensorboard`` package's own writer and
protos; TensorFlow is not needed). Guarantees, for a run resumed from the checkpoint
at step ``s``:

- ``metrics.csv`` keeps only the rows with ``step <= s`` (and drops a half-written
  last line) before anything is appended, so its steps stay strictly increasing;
  the rewrite is atomic.
- A new event file starts with ``SessionLog.START`` at step ``s + 1``, TensorFlow's
  restart marker: TensorBoard (``EventAccumulator``; ``tensorboard`` with
  ``--load_fast`` true or false) then discards the values of the interrupted run
  with ``step > s``. The old event file itself is left untouched (docs/LOGGING.md).
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
from typing import Callable, Mapping

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.text import metadata as text_metadata
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tensorboard.util import tensor_util

from jaxcert import report

CSV_NAME = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"
_FIXED = ("step", "wall_time")


class MetricWriter:
  """Writes ``{name: value}`` scalars per step to CSV and TensorBoard.

  Args:
    workdir: the run directory; ``metrics.csv`` and ``tensorboard/`` go there.
    start_step: the step training (re)starts from (0 for a fresh run); CSV rows and
      TensorBoard values with a larger step belong to an interrupted run and are
      dropped (see the module docstring).
    tag_of: TensorBoard tag of a CSV column (default: the column name), e.g.
      ``"loss" -> "train/loss"`` to group tags in TensorBoard's UI.
    enabled: False writes nothing (processes other than 0 of a multi-host run).
  """

  def __init__(self, workdir: str, *, start_step: int = 0,
               tag_of: Callable[[str], str] | None = None, enabled: bool = True):
    if isinstance(start_step, bool) or int(start_step) != start_step or start_step < 0:
      raise ValueError(f"start_step must be an integer >= 0, got {start_step!r}")
    self.csv_path = os.path.join(workdir, CSV_NAME)
    self.tensorboard_dir = os.path.join(workdir, TENSORBOARD_DIR)
    self.enabled = enabled
    self._tag_of = tag_of or (lambda name: name)
    self._last_step = int(start_step)
    self._columns: list[str] | None = None
    self._events: EventFileWriter | None = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._columns = _truncate_csv(self.csv_path, int(start_step))
    self._events = EventFileWriter(self.tensorboard_dir, flush_secs=30)
    self._events.add_event(event_pb2.Event(
        wall_time=time.time(), step=int(start_step) + 1,
        session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
    self._events.flush()

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    """One CSV row and one TensorBoard scalar per entry, at ``step``.

    ``step`` must exceed every step written since ``start_step``. A name that the
    CSV header lacks extends the header (earlier rows get an empty cell).
    """
    if not self.enabled:
      return
    if self._events is None:
      raise ValueError(f"this MetricWriter of {self.csv_path} is closed")
    step = int(step)
    if step <= self._last_step:
      raise ValueError(f"step must increase: got step={step} after step "
                       f"{self._last_step} in {self.csv_path}")
    bad = [k for k in scalars if k in _FIXED or not k or "," in k]
    if bad:
      raise ValueError(f"scalar names must be non-empty, comma-free and not "
                       f"{_FIXED}, got {bad}")
    values = {k: float(v) for k, v in scalars.items()}
    wall = time.time()
    new = [k for k in values if self._columns is None or k not in self._columns]
    if new:
      self._extend_header(new)
    row = {"step": str(step), "wall_time": repr(wall)}
    row.update({k: repr(v) for k, v in values.items()})   # repr round-trips exactly
    with open(self.csv_path, "a", newline="") as f:
      csv.writer(f).writerow([row.get(c, "") for c in self._columns])
    self._events.add_event(event_pb2.Event(
        wall_time=wall, step=step,
        summary=summary_pb2.Summary(value=[
            summary_pb2.Summary.Value(tag=self._tag_of(k), simple_value=v)
            for k, v in values.items()])))
    self._events.flush()
    self._last_step = step

  def write_text(self, tag: str, text: str, step: int = 0) -> None:
    """A Markdown text summary (TensorBoard's Text tab); not written to the CSV."""
    if not self.enabled:
      return
    meta = text_metadata.create_summary_metadata(display_name=None, description=None)
    value = summary_pb2.Summary.Value(tag=tag, metadata=meta,
                                      tensor=tensor_util.make_tensor_proto(text))
    self._events.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                           summary=summary_pb2.Summary(value=[value])))
    self._events.flush()

  def close(self) -> None:
    if self._events is not None:
      self._events.close()
      self._events = None

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _extend_header(self, new: list[str]) -> None:
    columns = (self._columns or list(_FIXED)) + new
    rows = _read_rows(self.csv_path, self._columns) if self._columns else []
    report.atomic_write_text(self.csv_path, _csv_text(columns, rows))
    self._columns = columns


def _csv_text(columns: list[str], rows: list[dict]) -> str:
  buf = io.StringIO()
  w = csv.writer(buf)
  w.writerow(columns)
  for r in rows:
    w.writerow([r.get(c, "") for c in columns])
  return buf.getvalue()


def _read_rows(path: str, columns: list[str]) -> list[dict]:
  with open(path, newline="") as f:
    lines = list(csv.reader(f))
  return [dict(zip(columns, r, strict=True)) for r in lines[1:] if len(r) == len(columns)]


def _truncate_csv(path: str, start_step: int) -> list[str] | None:
  """Keeps the rows with step <= start_step; returns the header (None: no file)."""
  if not os.path.exists(path):
    return None
  with open(path, newline="") as f:
    lines = list(csv.reader(f))
  if not lines:
    return None
  header = lines[0]
  if header[:2] != list(_FIXED):
    raise ValueError(f"{path} is not a metrics file of this writer: its header starts "
                     f"with {header[:2]}, expected {list(_FIXED)}; move it away to "
                     "start a new one")
  keep = []
  for r in lines[1:]:
    try:
      ok = len(r) == len(header) and int(r[0]) <= start_step
    except ValueError:  # a half-written line of a killed run
      ok = False
    if ok:
      keep.append(dict(zip(header, r, strict=True)))
  if len(keep) != len(lines) - 1:
    report.atomic_write_text(path, _csv_text(header, keep))
  return header


def read_csv(path: str) -> dict[str, list[float]]:
  """``metrics.csv`` as ``{column: values}`` (empty cells are NaN)."""
  with open(path, newline="") as f:
    lines = list(csv.reader(f))
  if not lines:
    raise ValueError(f"{path} is empty")
  header = lines[0]
  out: dict[str, list[float]] = {c: [] for c in header}
  for r in lines[1:]:
    r = r + [""] * (len(header) - len(r))
    for c, v in zip(header, r, strict=False):
      out[c].append(float(v) if v else math.nan)
  out["step"] = [int(s) for s in out["step"]]
  return out
