import csv
import io
import json
import math
import os
import time
import zipfile
from types import SimpleNamespace

import pytest
import torch

import qjl
from profiling import export, figures, memory, quality
from profiling.__main__ import main


# --- metrics on hand-made logits ------------------------------------------------------------------------------------------
def test_metrics_on_known_logits():
    p = torch.tensor([[0.0, math.log(3.0)], [2.0, 0.0]])  # softmax rows: [1/4, 3/4] and argmax 0
    q = torch.zeros(2, 2)  # uniform; argmax 0 for both rows (ties go to the first)
    assert quality.top1_agreement(p, q).tolist() == [0.0, 1.0]
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert quality.kl_divergence(p, q)[0].item() == pytest.approx(expected, abs=1e-6)
    assert quality.kl_divergence(p, p).abs().max().item() < 1e-6
    assert quality.negative_log_likelihood(p, torch.tensor([1, 1]))[0].item() == pytest.approx(-math.log(0.75))


def step(i, full, compressed, matches, first, lat_full=0.1, lat_comp=0.05):
    return {"step": i, "token_full": full, "token_compressed": compressed, "text_full": "", "text_compressed": "",
            "latency_full_s": lat_full, "latency_compressed_s": lat_comp, "bytes_full": 4000 + i,
            "bytes_compressed": 1000, "fp16_bytes": 4000, "context_tokens": 10 + i, "matches": matches,
            "match_rate": matches / (i + 1), "first_divergence": first, "elapsed_s": 0.2 * i, "finished": {}}


def test_run_summary_on_hand_made_records():
    prefill = {"prompt_tokens": 10, "prefill_s": 0.5, "quantize_s": 0.1, "bytes_full": 4000, "bytes_compressed": 1000,
               "fp16_bytes": 4000}
    steps = [step(0, 5, 5, 1, None), step(1, 6, 7, 1, 1), step(2, 8, 8, 2, 1, lat_comp=None)]
    s = quality.run_summary(prefill, steps)
    assert s["match_rate"] == pytest.approx(2 / 3) and s["first_divergence"] == 1 and s["steps"] == 3
    assert s["tokens_per_s_full"] == pytest.approx(10.0) and s["tokens_per_s_compressed"] == pytest.approx(20.0)
    assert s["speedup"] == pytest.approx(2.0)
    assert s["ratio"] == pytest.approx(4002 / 1000) and s["bits_per_number"] == pytest.approx(4.0)
    assert quality.run_summary(prefill, [])["ratio"] == pytest.approx(4.0)


# --- metrics on models ----------------------------------------------------------------------------------------------------
def test_teacher_forced_full_against_full_agrees_exactly(tiny_llama):
    ids = torch.randint(0, 256, (1, 60), generator=torch.Generator().manual_seed(0))
    result = quality.teacher_forced(tiny_llama, ids, "full", 40, 8)
    assert result["n"] == 8 and result["top1"] == 1.0 and result["kl"] < 1e-6
    assert result["nll_full"] == pytest.approx(result["nll_compressed"], abs=1e-5)
    with pytest.raises(ValueError, match="needs 70 tokens"):
        quality.teacher_forced(tiny_llama, ids, "full", 40, 29)


def test_teacher_forced_compressed_differs(tiny_llama):
    ids = torch.randint(0, 256, (1, 80), generator=torch.Generator().manual_seed(1))
    config = qjl.QJLConfig(sketch_dim=64, buffer_size=32, group_size=32, value_bits=2)
    result = quality.teacher_forced(tiny_llama, ids, config, 64, 8)  # the 64-token prefix is compressed
    assert 0.0 <= result["top1"] <= 1.0 and result["kl"] > 1e-6 and len(result["steps"]) == 8
    ppl = quality.perplexity(tiny_llama, ids, config, 64, 4)
    assert ppl["ppl_full"] > 1 and ppl["ppl_compressed"] > 1


def test_attention_score_error_shrinks_with_the_sketch(tiny_llama):
    ids = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(2))
    errors = {}
    for m in (64, 1024):
        rows = quality.attention_score_error(tiny_llama, ids, qjl.QJLConfig(sketch_dim=m, buffer_size=32), [0, 1],
                                             n_points=100)
        assert [r["layer"] for r in rows] == [0, 1] and all(len(r["exact"]) == 100 for r in rows)
        errors[m] = rows
    for small, large in zip(errors[64], errors[1024]):
        assert large["relative_error"] < small["relative_error"]
        assert large["correlation"] > 0.9
    assert tiny_llama.config._attn_implementation == "qjl"  # restored after capturing the queries


def test_passkey_with_exact_caches_answers_alike(embedded):
    model, tokenizer = embedded
    rows = quality.passkey(model, tokenizer, "full", [80], [0.5], max_new_tokens=3)
    assert len(rows) == 1 and rows[0]["length"] == 80
    assert rows[0]["answers"]["full"] == rows[0]["answers"]["compressed"]
    assert rows[0]["found_full"] == rows[0]["found_compressed"] == (rows[0]["passkey"] in rows[0]["answers"]["full"])


# --- memory sampler -------------------------------------------------------------------------------------------------------
def test_sampler_falls_back_to_rss_on_cpu():
    with memory.MemorySampler("cpu", interval_s=0.02) as sampler:
        time.sleep(0.2)
    assert sampler.source == "rss" and sampler.fallback and "cpu" in sampler.fallback_reason
    assert len(sampler.samples) >= 4 and all(s["rss_bytes"] > 0 and s["device_used_bytes"] is None
                                             for s in sampler.samples)
    times = [s["t"] for s in sampler.samples]
    assert times == sorted(times)


def test_sampler_without_nvml(monkeypatch):
    def missing():
        raise ImportError("No module named 'pynvml'")

    monkeypatch.setattr(memory, "load_nvml", missing)
    sampler = memory.MemorySampler("cuda:0")
    assert sampler.source == "rss" and "NVML unavailable" in sampler.fallback_reason
    assert sampler.sample()["rss_bytes"] > 0


class FakeNVML:
    def nvmlDeviceGetHandleByIndex(self, index):
        return f"handle-{index}"

    def nvmlDeviceGetHandleByUUID(self, uuid):
        raise RuntimeError("unknown uuid")

    def nvmlDeviceGetMemoryInfo(self, handle):
        assert handle == "handle-0"
        return SimpleNamespace(used=3 * 2 ** 30)

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return [SimpleNamespace(pid=os.getpid(), usedGpuMemory=2 ** 20), SimpleNamespace(pid=-1, usedGpuMemory=5)]


def test_sampler_with_fake_nvml():
    with memory.MemorySampler("cuda:0", interval_s=0.02, nvml=FakeNVML()) as sampler:
        time.sleep(0.1)
    assert sampler.source == "nvml" and not sampler.fallback and len(sampler.samples) >= 3
    assert all(s["device_used_bytes"] == 3 * 2 ** 30 and s["process_device_bytes"] == 2 ** 20
               for s in sampler.samples)
    assert sampler.info()["n_samples"] == len(sampler.samples)


# --- figures and export ---------------------------------------------------------------------------------------------------
def all_figures():
    steps = [step(0, 5, 5, 1, None), step(1, 6, 7, 1, 1), step(2, 8, 8, 2, 1)]
    prefill = {"prompt_tokens": 10, "prefill_s": 0.5, "quantize_s": 0.1, "bytes_full": 4000,
               "bytes_compressed": 1000, "fp16_bytes": 4000}
    sweep = [{"cache": c, "context_tokens": n, "bytes": b * n, "latency_s": 0.01 * n}
             for c, b in (("full", 4), ("qjl-3bit", 1)) for n in (100, 200)]
    forced = {"qjl-3bit": {"steps": [{"step": 0, "top1": 1.0, "kl": 0.01}, {"step": 1, "top1": 0.0, "kl": 0.3}]}}
    grid = [{"length": n, "depth": d, "found_full": True, "found_compressed": n < 200} for n in (100, 200)
            for d in (0.25, 0.75)]
    scores = [{"layer": 0, "relative_error": 0.2, "correlation": 0.98, "exact": [1.0, 2.0], "estimated": [1.1, 1.8]}]
    samples = [{"t": 0.0, "rss_bytes": 2 ** 20, "device_used_bytes": None}, {"t": 0.05, "rss_bytes": 2 ** 21,
                                                                            "device_used_bytes": None}]
    return {"live-memory": figures.live_memory(steps, prefill), "live-latency": figures.live_latency(steps),
            "live-agreement": figures.live_agreement(steps), "memory": figures.memory_over_time(samples),
            "kv": figures.kv_bytes_vs_context(sweep), "latency": figures.latency_vs_context(sweep),
            "agreement": figures.agreement_over_steps(forced), "passkey": figures.passkey_heatmap(grid),
            "scores": figures.score_scatter(scores)}


def test_figures_from_records():
    figs = all_figures()
    live = figs["live-memory"]
    assert list(live.data[0].x) == [10, 10, 11, 12] and live.data[1].y[0] == pytest.approx(1000 / 2 ** 20)
    assert live.data[2].y[0] == pytest.approx(4.0)  # the ratio
    assert list(figs["live-latency"].data[1].y) == pytest.approx([10.0, 10.0, 10.0])  # tokens/s of the full side
    assert list(figs["live-agreement"].data[0].y) == pytest.approx([1.0, 0.5, 2 / 3])
    assert [t.name for t in figs["kv"].data] == ["full", "qjl-3bit"]
    assert list(figs["agreement"].data[0].y) == [1.0, 0.5]
    assert figs["passkey"].data[0].z == ((1.0, 0.0), (1.0, 0.0)) or list(map(list, figs["passkey"].data[0].z)) == [
        [1.0, 0.0], [1.0, 0.0]]
    assert [t.name for t in figs["memory"].data] == ["process RSS"]


def test_export_html_png_csv_json(tmp_path):
    figure = all_figures()["kv"]
    html = export.write_html(figure, tmp_path / "kv.html").read_text()
    assert "<html>" in html and html.rstrip().endswith("</html>") and "plotly.min.js" in html and "qjl-3bit" in html
    assert (tmp_path / "plotly.min.js").stat().st_size > 100_000  # offline: the library sits beside the page
    png = export.write_png(figure, tmp_path / "kv.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    records = [step(0, 5, 5, 1, None), step(1, 6, 7, 1, 1)]
    rows = list(csv.DictReader(io.StringIO(export.write_csv(records, tmp_path / "r.csv").read_text())))
    assert [r["token_compressed"] for r in rows] == ["5", "7"] and json.loads(rows[0]["finished"]) == {}
    back = json.loads(export.write_json({"x": float("nan"), "records": records}, tmp_path / "r.json").read_text())
    assert back["x"] is None and back["records"][1]["first_divergence"] == 1


def test_png_unavailable_says_how_to_fix(monkeypatch):
    monkeypatch.delenv("BROWSER_PATH", raising=False)
    monkeypatch.setattr(export.shutil, "which", lambda name: None)
    with pytest.raises(export.PNGUnavailable, match="apt-get install -y chromium"):
        export.png_bytes(all_figures()["kv"])


def test_export_run_zip(tmp_path):
    figs = all_figures()
    path, notes = export.export_run(tmp_path / "run.zip", {"kv": figs["kv"]}, {"steps": [step(0, 5, 5, 1, None)]},
                                    {"preset": "qjl-3bit"})
    names = set(zipfile.ZipFile(path).namelist())
    assert notes == [] and {"charts/kv.html", "charts/kv.png", "charts/plotly.min.js", "records/steps.csv",
                            "records/steps.json", "config.json"} <= names
    assert json.loads(zipfile.ZipFile(path).read("config.json")) == {"preset": "qjl-3bit"}


# --- command line ---------------------------------------------------------------------------------------------------------
def read_results(folder):
    results = json.loads((folder / "results.json").read_text())
    assert results["environment"]["device"] == "cpu" and results["environment"]["torch"] == torch.__version__
    for entry in results["figures"].values():
        assert (folder / entry["html"]).exists() and entry["plotly"]["data"]
    return results


def test_cli_end_to_end(tmp_path, embedded):
    common = ["--device", "cpu", "--preset", "qjl-3bit", "--no-png", "--out"]
    assert main(["sweep", "--lengths", "300", "--steps", "1", *common, str(tmp_path / "sweep")]) == 0
    rows = read_results(tmp_path / "sweep")["results"]
    assert [r["cache"] for r in rows] == ["full", "qjl-3bit"] and rows[1]["bytes"] < rows[0]["bytes"]
    assert main(["compare", "--prompt", "Hello there.", "--max-new-tokens", "2", *common, str(tmp_path / "cmp")]) == 0
    summary = read_results(tmp_path / "cmp")["results"]["qjl-3bit"]["summary"]
    assert summary["steps"] == 2 and summary["bytes_compressed"] > 0
    assert main(["agreement", "--prefix", "200", "--eval-tokens", "2", "--layers", "0", "--score-tokens", "300",
                 *common, str(tmp_path / "agr")]) == 0
    results = read_results(tmp_path / "agr")["results"]
    assert results["teacher_forced"]["qjl-3bit"]["n"] == 2 and results["attention_scores"]["qjl-3bit"][0]["layer"] == 0
    assert main(["table", "--memory-tokens", "300", "--prefix", "200", "--eval-tokens", "2", "--lengths", "300",
                 "--depths", "0.5", *common, str(tmp_path / "table")]) == 0
    (row,) = read_results(tmp_path / "table")["results"]["rows"]
    # 300 tokens: 4 sinks and 8 exact buffer tokens beside 288 compressed ones, all counted.
    assert row["preset"] == "qjl-3bit" and 2.88 < row["bits_per_number"] < 16 / 4
    assert row["reduction_vs_fp16"] == pytest.approx(16 / row["bits_per_number"])
