"""Where a training step's time goes (`train.profile_steps`): torch.profiler over a few optimizer steps.

    vclr train ... train.profile_steps=5     # -> RUN/profile/

After the first steps (compilation, cuDNN autotuning and the loader's start are not what a profile is for), the
profiler records `profile_steps` optimizer steps, data loading between them included, and writes into RUN/profile/:
- `*.pt.trace.json.gz`: the timeline (CPU ops, CUDA kernels and copies per stream), for Perfetto or chrome://tracing;
- `summary.txt`: operators by self time on the device (CUDA) or the CPU;
- `summary.json`: wall ms per step and, on CUDA, the share of that wall time with a kernel running (`device_busy`):
  well below 1 says the GPU waits for data or for the host.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

from vclr.storage import atomic_write_bytes

logger = logging.getLogger(__name__)

WAIT_STEPS = 10  # steps left alone first: compilation, autotuning, the loader's first batches
WARMUP_STEPS = 2  # traced but dropped: the profiler's own start-up cost


def busy_fraction(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """Share of [start, end] covered by the union of `intervals` (overlapping kernels on several streams count once)."""
    covered, reach = 0.0, start
    for a, b in sorted(intervals):
        a, b = max(a, reach), min(b, end)
        if b > a:
            covered += b - a
            reach = b
    return covered / (end - start) if end > start else 0.0


def device_work(events) -> list[tuple[float, float]]:
    """(start, end) of what the device itself ran: kernels, copies, memsets. The GPU-side annotations (each
    `ProfilerStep#`, a compiled graph's `## Call CompiledFxGraph` range) are CUDA events too and span whole steps:
    counting them read 98% busy on an H200 whose kernels covered 38% of the step."""
    return [(e.time_range.start, e.time_range.end) for e in events
            if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]


class StepProfiler:
    """Call `step()` after each optimizer step and `close()` at the end; does nothing when `steps` is 0."""

    def __init__(self, steps: int, max_steps: int, out_dir: Path, device: torch.device, enabled: bool = True):
        self.steps, self.out_dir, self.cuda = steps, Path(out_dir), device.type == "cuda"
        self._profiler = None
        if not (steps and enabled):
            return
        wait = max(0, min(WAIT_STEPS, max_steps - steps - WARMUP_STEPS))
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._profiler = profile(activities=activities, schedule=schedule(wait=wait, warmup=WARMUP_STEPS,
                                                                          active=steps, repeat=1),
                                 on_trace_ready=self._write, record_shapes=True)
        self._profiler.start()
        logger.info("profiling optimizer steps %d-%d into %s", wait + WARMUP_STEPS + 1,
                    wait + WARMUP_STEPS + steps, self.out_dir)

    def step(self) -> None:
        if self._profiler is not None:
            self._profiler.step()

    def close(self) -> None:
        if self._profiler is not None:
            self._profiler.stop()  # writes the trace when the active steps were reached
            self._profiler = None

    def _write(self, prof) -> None:
        tensorboard_trace_handler(str(self.out_dir), use_gzip=True)(prof)
        sort = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=40)
        atomic_write_bytes(self.out_dir / "summary.txt", (table + "\n").encode())
        events = prof.events()
        start = min(e.time_range.start for e in events)
        end = max(e.time_range.end for e in events)
        summary = {"steps": self.steps, "wall_ms_per_step": round((end - start) / 1e3 / self.steps, 3)}
        if self.cuda:
            kernels = device_work(events)
            summary["device_busy"] = round(busy_fraction(kernels, start, end), 4) if kernels else None
        atomic_write_bytes(self.out_dir / "summary.json", (json.dumps(summary) + "\n").encode())
        logger.info("profile of %d steps: %s (%s)", self.steps, summary, self.out_dir)
