"""How torch uses the CPU: intra-op threads beside other busy processes, and the convolution
backend for small inputs.

Threads. torch starts one intra-op thread per core, and its OpenMP threads spin while they wait
for each other. When another process keeps a core busy, the thread on that core is descheduled
and its siblings spin until it runs again: on 2 cores, sampling took 4x as long beside one busy
process and 66x beside four (BENCHMARKS.md, "A busy machine"); with one thread it took 1.5x and
4x. So where the user has not chosen a thread count (`--num_threads`, OMP_NUM_THREADS or
MKL_NUM_THREADS), torch gets one thread per core that other processes leave idle, measured from
/proc/stat on the cores this process may use (niced processes count only where the scheduler
lets them compete as equals: see `_nice_yields`):
- a training run measures once, while its models load, and keeps that count for the whole run
  (recorded with its configuration, so a resumed run computes exactly as the first did: the
  thread count changes float sums in the last bits);
- sampling (class images, validation, evaluation, serving) measures over each batch it runs and
  sets the count for the next.

Convolutions. oneDNN (mkldnn) convolutions cost a fixed ~0.1-0.3 ms a call, which dominates when
the input is tiny: a 64/128/128-channel UNet at 16x16 latents ran its forward and backward
15-20% faster with ATen's native convolution at 2 x 16 x 16 positions, and 10-100% slower at
2048 positions or more (BENCHMARKS.md). `conv_backend_for` picks per UNet call in training.
Sampling stays on oneDNN: the native kernels sum a batch in another order than its images alone,
and a generated image must depend on its seed only, not on its batch neighbours.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

import torch

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
# At most this many (batch x height x width) positions run on ATen's native convolution.
NATIVE_CONV_MAX_POSITIONS = 1024


def usable_cores() -> list[int]:
    """The CPU numbers this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def threads_chosen_by_user() -> bool:
    return any(os.environ.get(name, "").strip() for name in THREAD_VARIABLES)


def _busy_seconds(cores: list[int]) -> float | None:
    """CPU seconds spent busy on `cores` since boot, by every process (/proc/stat), or None."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    wanted = {f"cpu{core}" for core in cores}
    nice_yields = _nice_yields()
    busy = 0
    found = 0
    for line in lines:
        fields = line.split()
        if fields and fields[0] in wanted:
            # user nice system idle iowait irq softirq steal: all but idle and iowait, and but
            # nice where niced processes yield their core to ours (see _nice_yields).
            values = [int(value) for value in fields[1:9]]
            busy += sum(values) - values[3] - values[4] - (values[1] if nice_yields else 0)
            found += 1
    if found != len(wanted):
        return None
    return busy / os.sysconf("SC_CLK_TCK")


def _nice_yields() -> bool:
    """Whether a niced process gives way to ours: not under the scheduler's autogroups (the
    default of desktop Linux), where nice only ranks processes of one session, so a `nice -n
    19` job started from another terminal competes as an equal."""
    try:
        return Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "0"
    except OSError:
        return False


def _own_seconds() -> float:
    if os.getpriority(os.PRIO_PROCESS, 0) > 0 and _nice_yields():  # counted as nice time
        return 0.0
    times = os.times()
    return times.user + times.system


class LoadMeter:
    """Cores that other processes kept busy since the meter started (or was last read)."""

    def __init__(self, cores: list[int] | None = None):
        self.cores = cores or usable_cores()
        self._mark = self._now()

    def _now(self) -> tuple[float, float | None, float]:
        return time.monotonic(), _busy_seconds(self.cores), _own_seconds()

    def other_cores(self, *, restart: bool = True) -> float | None:
        """Average number of cores other processes used; None where /proc/stat is unreadable or
        too little time passed to tell (under 0.1 s)."""
        then, now = self._mark, self._now()
        elapsed = now[0] - then[0]
        if then[1] is None or now[1] is None or elapsed < 0.1:
            return None
        if restart:
            self._mark = now
        others = (now[1] - then[1]) - (now[2] - then[2])
        return min(len(self.cores), max(0.0, others / elapsed))


def threads_beside(other_cores: float | None, cores: int | None = None) -> int:
    """One thread per core other processes leave idle, at least one (all cores if unknown)."""
    cores = cores or len(usable_cores())
    if other_cores is None:
        return cores
    # A core counts as taken when others use more than a third of it: a spinning sibling
    # waiting on a descheduled thread costs more than a thread fewer does.
    return max(1, min(cores, cores - int(other_cores + 2 / 3)))


_PROCESS_METER: LoadMeter | None = None


def process_meter() -> LoadMeter:
    """One meter for the process, started when this module is imported: the first batch of
    sampling is measured over the seconds the process spent loading (its own CPU excluded)."""
    global _PROCESS_METER
    if _PROCESS_METER is None:
        _PROCESS_METER = LoadMeter()
    return _PROCESS_METER


class AdaptiveThreads:
    """Sets torch's intra-op threads before each sampling batch from the load measured over the
    previous one; restores the count it found on `close`. A no-op where the user chose threads."""

    def __init__(self):
        self.enabled = not threads_chosen_by_user() and _busy_seconds(usable_cores()) is not None
        self.initial = torch.get_num_threads()

    def before_batch(self) -> None:
        if not self.enabled:
            return
        others = process_meter().other_cores()
        if others is None:  # under 0.1 s since the last look: keep the count
            return
        threads = threads_beside(others, cores=self.initial)
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)

    def close(self) -> None:
        if self.enabled and torch.get_num_threads() != self.initial:
            torch.set_num_threads(self.initial)


@contextmanager
def adaptive_threads():
    threads = AdaptiveThreads()
    try:
        yield threads
    finally:
        threads.close()


def use_native_conv(positions: int, device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether ATen's native convolution beats oneDNN for a UNet call over `positions`
    (batch x latent height x width) samples: fp32 on the CPU with few positions."""
    return (torch.device(device).type == "cpu" and dtype == torch.float32
            and positions <= NATIVE_CONV_MAX_POSITIONS)


@contextmanager
def conv_backend_for(positions: int, device: torch.device | str, dtype: torch.dtype):
    """Run the enclosed convolutions (forward and backward) on the faster backend."""
    if not use_native_conv(positions, device, dtype):
        yield
        return
    # (Not torch.backends.mkldnn.flags(): it also sets oneDNN's TF32 flag, which warns.)
    was = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = was


process_meter()  # start measuring now
