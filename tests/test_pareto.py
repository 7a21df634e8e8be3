"""The Pareto study (``profiling.pareto``, ``python -m profiling pareto``)."""

import json

from profiling.pareto import pareto_front


def test_pareto_front_keeps_only_undominated_presets():
    rows = [{"preset": "a", "bits": 3.0, "top1": 0.7, "kl": 0.3}, {"preset": "b", "bits": 3.5, "top1": 0.6, "kl": 0.2},
            {"preset": "c", "bits": 5.0, "top1": 0.9, "kl": 0.05}, {"preset": "d", "bits": 16.0, "top1": 1.0,
                                                                     "kl": 0.0},
            {"preset": "e", "bits": 5.0, "top1": 0.9, "kl": 0.1}]
    assert [r["preset"] for r in pareto_front(rows)] == ["a", "c", "e", "d"]  # b: a has fewer bits, higher top-1
    assert [r["preset"] for r in pareto_front(rows, y="kl", higher_is_better=False)] == ["a", "b", "c", "d"]


def test_pareto_command_end_to_end(tmp_path, embedded):
    from profiling.__main__ import main

    out = tmp_path / "pareto"
    assert main(["pareto", "--presets", "full,kivi-2bit,turboquant-3bit", "--prefix", "160", "--eval-tokens", "3",
                 "--lengths", "200", "--depths", "0.5", "--steps", "2", "--out", str(out), "--no-png"]) == 0
    results = json.loads((out / "results.json").read_text())
    rows = {row["preset"]: row for row in results["results"]}
    assert list(rows) == ["full", "kivi-2bit", "turboquant-3bit"]
    for row in rows.values():
        assert {"bits", "bits_analytic", "top1", "kl", "passkey", "step_s"} <= row.keys()
        assert 0 <= row["top1"] <= 1 and row["kl"] >= 0 and row["step_s"] > 0
    # The full cache against itself is exact; the compressed ones store fewer bits.
    assert rows["full"]["top1"] == 1.0 and rows["full"]["kl"] < 1e-6 and rows["full"]["bits"] == 16.0
    assert rows["kivi-2bit"]["bits_analytic"] < rows["kivi-2bit"]["bits"] < rows["turboquant-3bit"]["bits"] < 16
    assert (out / "pareto.html").exists() and (out / "pareto-kl.html").exists()
    assert results["config"]["front_top1"][0] == "kivi-2bit"  # the fewest bits is never dominated
