"""Peak memory of one call, on CUDA and on CPU, for the benchmark and comparison scripts.

    peak = peak_bytes(lambda: train_step(batch), device)   # bytes above what was allocated before the call

CUDA: ``torch.cuda.max_memory_allocated`` after a reset, minus ``memory_allocated`` before the call.
CPU: PyTorch keeps no allocator statistics for the CPU, so the call runs once under ``torch.profiler`` with
``profile_memory=True`` and the peak is read off the profiler's memory timeline (every tensor allocation and free,
in order; tensors that existed before the call are not counted). This counts what PyTorch allocates (outputs, saved
activations, gradients, temporaries, optimizer state created in the call); the profiler makes the call slower, so
never time a call that is being measured here.
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
    from torch.profiler._memory_profiler import Action

    # record_shapes + with_stack are what the profiler's memory timeline needs to follow tensors.
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    current = peak = 0
    for _, action, (key, _version), size in prof._memory_profile().timeline:
        if key.device.type != "cpu":
            continue
        if action == Action.CREATE:
            current += size
        elif action == Action.DESTROY:
            current -= size
        peak = max(peak, current)
    return peak
