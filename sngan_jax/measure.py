"""What the machine reports about a program: compilations, FLOPs, peak FLOP/s,
peak memory and the age of the process. Used by the benchmark and the tests."""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Sequence

import jax

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"

# Dense bfloat16 peaks (TFLOP/s per chip) from the vendors' data sheets; the
# usual denominator of model-FLOPs utilization. Others: --peak_tflops.
PEAK_TFLOPS = {
    "NVIDIA H100": 989.0,
    "NVIDIA H200": 989.0,
    "NVIDIA A100": 312.0,
    "NVIDIA L4": 121.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v6 lite": 918.0,
}


class CompileCounter:
    """Counts XLA compilations inside ``with counter:`` blocks, added up."""

    def __init__(self):
        self.count = 0

    def __enter__(self) -> CompileCounter:
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listen)

    def _listen(self, event: str, duration: float, **kwargs) -> None:
        if event == BACKEND_COMPILE:
            self.count += 1


def flops(p_step, state, batches) -> float | None:
    """XLA's FLOP count of one iteration, summed over the local devices."""
    try:
        analysis = p_step.lower(state, batches).compile().cost_analysis()
    except Exception:  # an analysis some backends do not offer
        return None
    if isinstance(analysis, Sequence):
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    # pmap compiles the per-device program; every device runs it.
    return float(flops) * jax.local_device_count() if flops else None


def peak_tflops() -> float | None:
    kind = jax.devices()[0].device_kind
    for prefix, peak in PEAK_TFLOPS.items():
        if kind.startswith(prefix):
            return peak
    return None


def peak_memory() -> tuple[int | None, str]:
    """Peak bytes in use on device 0 where the backend tracks them, else host RSS."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device"
    # ru_maxrss is in kilobytes on Linux (bytes on macOS).
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024), "host RSS"


def process_age() -> float | None:
    """Seconds since this process started (Linux), else None."""
    try:
        with open("/proc/self/stat") as f:
            started_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, IndexError, ValueError):
        return None
    return uptime - started_ticks / os.sysconf("SC_CLK_TCK")
