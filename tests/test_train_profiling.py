"""train.profile_steps: the device's busy share against a naive reference; a short training writes its profile."""

import json

import numpy as np
import pytest
from helpers import REPO_ROOT, train_overrides

from vclr.config import load_config
from vclr.train.loop import train
from vclr.train.profiling import busy_fraction, device_work


def naive_busy(intervals, start, end, resolution=0.01):
    """Sample the window on a fine grid: covered if any interval holds the point."""
    points = np.arange(start, end, resolution) + resolution / 2
    return float(np.mean([any(a <= p < b for a, b in intervals) for p in points]))


@pytest.mark.parametrize("seed", range(5))
def test_busy_fraction_counts_overlapping_kernels_once(seed):
    rng = np.random.default_rng(seed)
    starts = rng.uniform(-2, 20, 12)
    intervals = [(float(a), float(a + rng.uniform(0.1, 4))) for a in starts]  # streams overlap; some stick out
    assert busy_fraction(intervals, 0.0, 20.0) == pytest.approx(naive_busy(intervals, 0.0, 20.0), abs=2e-3)
    assert busy_fraction([], 0.0, 1.0) == 0.0


def test_device_work_leaves_out_gpu_annotations():
    """A step's GPU-side annotation spans the whole step: the busy share counts kernels and copies only (an H200 run
    read 98% busy when the annotations counted, 38% from its kernels)."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent

    def event(name, start, end, device=DeviceType.CUDA, annotation=False):
        return FunctionEvent(0, name, 0, start, end, device_type=device, is_user_annotation=annotation)

    events = [event("ProfilerStep#3", 0, 100, annotation=True),
              event("## Call CompiledFxGraph", 5, 95, annotation=True), event("nvjet_sm90_gemm", 10, 30),
              event("Memcpy HtoD", 40, 50), event("aten::mm", 0, 100, DeviceType.CPU)]
    work = device_work(events)
    assert sorted(work) == [(10, 30), (40, 50)]
    assert busy_fraction(work, 0, 100) == pytest.approx(0.3)


def test_training_writes_a_profile_of_the_asked_steps(small_shapes, tmp_path):
    run = tmp_path / "run"
    train(load_config(None, train_overrides(small_shapes, run, **{"optim.max_steps": 16, "train.profile_steps": 3,
                                                                  "train.checkpoint_every": 100})))
    profile = run / "profile"
    summary = json.loads((profile / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["wall_ms_per_step"] > 0
    assert "aten::" in (profile / "summary.txt").read_text()  # the operator table
    traces = list(profile.glob("*.pt.trace.json.gz"))
    assert len(traces) == 1 and traces[0].stat().st_size > 1000


def test_profile_breakdown_reads_device_time_and_idle_gaps(monkeypatch):
    """scripts/profile_breakdown.py on a hand-made trace of 2 steps: kernel kinds, busy share and the host op that
    held the thread during the largest gap."""
    monkeypatch.syspath_prepend(str(REPO_ROOT / "scripts"))
    from profile_breakdown import breakdown

    def x(cat, name, ts, dur):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts * 1000, "dur": dur * 1000}  # given in ms, traces hold us

    trace = {"traceEvents": [
        x("user_annotation", "ProfilerStep#1", 0, 100), x("user_annotation", "ProfilerStep#2", 100, 100),
        x("gpu_user_annotation", "ProfilerStep#1", 0, 100),  # a GPU-side annotation: not device work
        x("cpu_op", "image::decode_jpegs_cuda", 5, 50), x("kernel", "nvjet_sm90_tst_128x160", 60, 20),
        x("kernel", "triton_poi_fused_gelu_0", 70, 20),  # overlaps the matmul on another stream: counted once
        x("gpu_memcpy", "Memcpy HtoD (Pageable -> Device)", 0, 5), x("kernel", "nvjet_sm90_tst_256x128", 120, 40)]}
    result = breakdown(trace, gaps=1)
    assert result["steps"] == 2 and result["wall_ms_per_step"] == 100
    assert result["device_ms_per_step"] == 37.5 and result["device_busy"] == 0.375  # (5 + 30 + 40) ms over 2 steps
    assert result["by_kind_ms_per_step"] == {"matmul": 30, "compiled pointwise": 10, "copies": 2.5}
    assert result["largest_gaps"] == [{"ms": 55, "host": "image::decode_jpegs_cuda"}]
