"""Peak memory of one call, on CUDA and on CPU, for the benchmark and comparison scripts.

    peak = peak_bytes(lambda: train_step(batch), device)   # bytes above what was allocated before the call

CUDA: ``torch.cuda.max_memory_allocated`` after a reset, minus ``memory_allocated`` before the call.
CPU: PyTorch keeps no allocator statistics for the CPU, so the call runs once under ``torch.profiler`` with
``profile_memory=True``, which records every allocation and free of the CPU allocator as a ``[memory]`` event with
its signed size; the peak is the largest running sum of those, in time order. Blocks that existed before the call are
not counted (the profiler does not know their sizes, so their frees are not reported). This counts what PyTorch
allocates (outputs, saved activations, gradients, temporaries, optimizer state created in the call); the profiler
makes the call slower, so never time a call that is being measured here. (The profiler's own memory timeline,
``prof._memory_profile()``, gives the same peak to within a few hundred bytes but takes 20 to 30 times as long to
build: 1 to 2 s per training step of the comparison's models.)
"""

from __future__ import annotations

import torch


def peak_bytes(fn, device) -> int:
    """Run ``fn()`` once and return the most memory it had allocated at any moment beyond what existed before."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    return _cpu_peak_bytes(fn)


def _cpu_peak_bytes(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cpu = torch.autograd.DeviceType.CPU
    # by time; sorted() is stable, so events of the same nanosecond keep the profiler's order
    events = sorted(((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == cpu), key=lambda e: e[0])
    current = peak = 0
    for _, size in events:  # size < 0: a free
        current += size
        peak = max(peak, current)
    return peak
