"""The real Triton compiler (not the interpreter) accepts every kernel for sm_90 and sm_80 at the configurations the
launchers use (head dims 64, 128 and 256; sketches 128 to 512, with outliers sketched or exact and centred keys),
without spills and within each architecture's shared memory per program."""

import json

import pytest

pytest.importorskip("triton")

KERNEL_NAMES = {"quantize_keys", "quantize_values", "scores", "decode_split", "combine_splits"}


def test_every_kernel_compiles_for_hopper_and_ampere_without_spills(tmp_path):
    from profiling.__main__ import main

    code = main(["kernels-compile", "--quick", "--arch", "90", "--arch", "80", "--out", str(tmp_path)])
    kernels = json.loads((tmp_path / "results.json").read_text())["kernels"]
    for arch in (90, 80):
        compiled = [k for k in kernels if k["arch"] == arch]
        assert {k["name"] for k in compiled} == KERNEL_NAMES
        assert {k["config"]["D"] for k in compiled if k["name"] == "decode_split"} == {64, 128, 256}
        assert max(k["config"]["SKETCH"] for k in compiled if k["name"] == "scores") == 512
        for name in ("quantize_keys", "scores", "decode_split"):  # outliers sketched and exact, at every head dim
            variants = {(k["config"]["D"], k["config"]["EXACT"]) for k in compiled if k["name"] == name
                        and k["config"]["K"]}
            assert variants == {(d, exact) for d in (64, 128, 256) for exact in (False, True)}, name
    for k in kernels:
        assert k["registers"] > 0, k
        assert k["spill_bytes"] == 0, k
        assert k["shared_bytes"] <= {90: 227 * 1024, 80: 163 * 1024}[k["arch"]], k
    assert code == 0


def test_kernels_compile_fails_over_the_shared_memory_limit(tmp_path, monkeypatch):
    """The check can fail: a kernel over the architecture's shared memory is reported and sets the exit code."""
    from profiling import cmd_kernels_compile
    from profiling.__main__ import main

    monkeypatch.setitem(cmd_kernels_compile.SHARED_LIMITS, 80, 64)
    code = main(["kernels-compile", "--quick", "--arch", "80", "--only", "quantize_values", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "results.json").read_text())["kernels"]
    assert code == 1 and rows and all(k["shared_bytes"] > k["shared_limit"] == 64 for k in rows)
