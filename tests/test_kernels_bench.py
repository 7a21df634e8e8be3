"""The decode benchmark runs on the CPU: bytes model for every context, torch reference timed on the small ones."""

import json


def test_bench_kernels_cpu_bytes_model(tmp_path):
    from profiling.__main__ import main

    assert main(["bench-kernels", "--contexts", "256,65536", "--batches", "1", "--out", str(tmp_path),
                 "--cpu-max-context", "256", "--prefill-max-context", "256"]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    small, large = result["rows"]
    assert small["qjl_torch_ms"] > 0 and small["sdpa_ms"] > 0 and "sdpa_ms" not in large
    assert 4 < large["bytes"]["full"] / large["bytes"]["qjl"] < 8  # 3-bit preset: ~5x fewer bytes
    assert result["largest_context"]["qjl"] > 4 * result["largest_context"]["bf16"]
