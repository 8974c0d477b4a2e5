"""scripts/memory.py (the peak-memory probe the benchmarks rely on) and a tiny end-to-end run of scripts/bench.py."""

import json

import torch

from scripts import bench
from scripts.memory import peak_bytes

MiB = 2**20


def test_cpu_peak_counts_live_tensors_not_what_existed_before():
    keep = torch.empty(4 * MiB // 4)  # allocated before the call: not counted

    def fn():
        a = torch.empty(MiB // 4)  # 1 MiB
        b = torch.empty(2 * MiB // 4)  # 2 MiB: 3 MiB live
        del a
        c = torch.empty(MiB // 8)  # 0.5 MiB: 2.5 MiB live
        keep.add_(0)  # in place on an old tensor: nothing new
        return b, c

    assert peak_bytes(fn, "cpu") == 3 * MiB


def test_cpu_peak_of_a_training_step():
    """Forward + backward of y = relu(x W) * 2 for x (256, 512): at the peak three 256 × 512 fp32 buffers (0.5 MiB
    each) are live: the relu output kept for backward, the incoming gradient and the next one."""
    x = torch.randn(256, 512, requires_grad=True)
    w = torch.randn(512, 512)

    def step():
        ((x @ w).relu() * 2).sum().backward()

    peak = peak_bytes(step, "cpu")
    assert abs(peak - 1.5 * MiB) < 1024, peak / MiB


def test_bench_writes_table_json_and_cpu_targets(tmp_path):
    bench.main(["--shapes", "64x96", "--tokens", "32", "--repeats", "2", "--warmup", "1", "--op", "gated_lora", "ia3",
                "ia3_ff", "--out-dir", str(tmp_path), "--tag", "test"])
    (js,) = tmp_path.glob("*-test.json")
    rows = json.loads(js.read_text())["rows"]
    cases = {r["case"] for r in rows}
    assert cases == {"base", "peft_lora", "peft_ia3", "peft_ia3_ff", "gated_lora", "ia3", "ia3_ff"}, cases
    for r in rows:
        assert not r.get("error"), r
        assert r["ms"] > 0 and r["x_base"] > 0, r
        # at least the output (32 × 96) and the input gradient (32 × 64), fp32
        assert r["peak_mib"] * MiB >= 32 * (96 + 64) * 4, r
    md = js.with_suffix(".md").read_text()
    for name in ("cpu gated_lora 64x96 32 ≤ 1.10× peft_lora time", "cpu ia3 64x96 32 peak ≤ peft_ia3 peak",
                 "cpu ia3_ff 64x96 32 ≤ 1.00× peft_ia3_ff time"):
        assert name in md, name


def test_cpu_cases_take_turns_repeat_by_repeat():
    """After each case's warm-up, repeat i of every case runs before repeat i + 1 of any: a slow spell of a shared
    machine lands on all cases, not on whichever case was running. Each case gets its own times, in order."""
    import time

    log = []

    def case(k, pause):
        def step(i):
            log.append((k, i))
            time.sleep(pause)
        return step

    times = bench.interleaved_cpu_times([case(0, 0.0), case(1, 0.02), case(2, 0.0)], warmup=2, repeats=3)
    assert log == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)] + [(k, i) for i in range(3) for k in range(3)]
    assert [len(t) for t in times] == [3, 3, 3]
    assert min(times[1]) >= 20 and max(times[0]) < 20 and max(times[2]) < 20
