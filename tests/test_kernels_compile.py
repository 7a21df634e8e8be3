"""The real Triton compiler (not the interpreter) accepts the kernels for sm_90 and they do not spill."""

import json

import pytest

pytest.importorskip("triton")


def test_kernels_compile_for_hopper_without_spills(tmp_path):
    from profiling.__main__ import main

    code = main(["kernels-compile", "--quick", "--arch", "90", "--only", "quantize_values", "--only",
                 "combine_splits", "--out", str(tmp_path)])
    kernels = json.loads((tmp_path / "results.json").read_text())["kernels"]
    assert {k["name"] for k in kernels} == {"quantize_values", "combine_splits"}
    assert all(k["registers"] > 0 and k["arch"] == 90 and k["spill_bytes"] == 0 for k in kernels)
    assert code == 0
