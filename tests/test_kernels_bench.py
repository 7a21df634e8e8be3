"""The decode benchmark runs on the CPU: bytes model for every context, torch reference timed on the small ones."""

import json

import pytest


def test_bench_kernels_cpu_bytes_model(tmp_path):
    from profiling.__main__ import main

    assert main(["bench-kernels", "--contexts", "256,65536", "--batches", "1", "--out", str(tmp_path),
                 "--cpu-max-context", "256", "--prefill-max-context", "256"]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    small, large = result["rows"]
    assert small["qjl_torch_ms"] > 0 and small["sdpa_ms"] > 0 and "sdpa_ms" not in large
    from qjl.presets import quanto_available

    assert ("quantized_cache_ms" in small) == quanto_available() and "quantized_cache_ms" not in large
    assert 4 < large["bytes"]["full"] / large["bytes"]["qjl"] < 8  # 3-bit preset: ~5x fewer bytes
    assert result["largest_context"]["qjl"] > 4 * result["largest_context"]["bf16"]


def test_bench_kernels_runs_without_plotly_and_draws_later(tmp_path):
    """A bare GPU box has no plotly or gradio: the benchmark still runs there, the other subcommands say what is
    missing, and the figure is drawn afterwards from the JSON."""
    import subprocess
    import sys
    from pathlib import Path

    from profiling.__main__ import main

    blocked = "import sys; [sys.modules.__setitem__(m, None) for m in ('plotly', 'gradio', 'kaleido')]; "
    run = "from profiling.__main__ import main; sys.exit(main(sys.argv[1:]))"
    root = Path(__file__).resolve().parents[1]

    def without_plotly(*argv):
        return subprocess.run([sys.executable, "-c", blocked + run, *argv], cwd=root, capture_output=True, text=True,
                              timeout=300)

    bench = without_plotly("bench-kernels", "--contexts", "256", "--batches", "1", "--out", str(tmp_path / "gpu"),
                           "--cpu-max-context", "0")
    assert bench.returncode == 0, bench.stderr
    assert "plotly absent: no figure" in bench.stdout and not (tmp_path / "gpu" / "figure.html").exists()
    compare = without_plotly("compare", "--max-new-tokens", "2")
    assert compare.returncode == 2 and "needs the package 'plotly'" in compare.stderr
    pytest.importorskip("plotly")
    assert main(["bench-kernels", "--figure-from", str(tmp_path / "gpu" / "results.json"),
                 "--out", str(tmp_path / "drawn")]) == 0
    assert "<html>" in (tmp_path / "drawn" / "figure.html").read_text()[:500].lower()


def test_bench_kernels_reports_a_failing_quantized_cache_and_goes_on(tmp_path, monkeypatch):
    """On a GPU box quanto's CUDA extension may not build (no ninja or nvcc): the row says why, the rest is timed."""
    pytest.importorskip("optimum.quanto")
    from profiling import cmd_bench_kernels
    from profiling.__main__ import main

    def unbuildable(*args):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cmd_bench_kernels, "quantized_cache_step_ms", unbuildable)
    assert main(["bench-kernels", "--contexts", "256", "--batches", "1", "--out", str(tmp_path),
                 "--cpu-max-context", "256", "--prefill-max-context", "0"]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    row = result["rows"][0]
    assert row["qjl_torch_ms"] > 0 and "quantized_cache_ms" not in row
    assert row["quantized_cache_error"] == "RuntimeError: Ninja is required to load C++ extensions"
    assert result["quantized_cache"].startswith("failed in 1 of 1 rows: RuntimeError: Ninja")


def test_graph_timings_take_copies_in_turn_enough_to_leave_the_l2_cold(monkeypatch):
    """Each graph-timed call reads its own copy of the inputs, the copies in turn, and there are enough of them that
    between two reads of one, three L2 caches' worth is read (50 MB off a GPU): a layer's cache is cold in a decoding
    step, and one copy replayed would be read from L2 wherever it fits. Each runs once before the timing, so that
    what a copy makes on its first call is not captured in the graph."""
    import torch
    import triton.testing

    from profiling.cmd_bench_kernels import COLD_L2, cold_copies, cold_inputs, graph_ms

    cpu, l2 = torch.device("cpu"), 50 * 2 ** 20
    for nbytes in (10 ** 5, 23 * 10 ** 6, 134 * 10 ** 6, 4 * 10 ** 9):
        copies = cold_copies(nbytes, cpu)
        assert copies * nbytes >= COLD_L2 * l2 > (copies - 1) * nbytes or copies == 1 and nbytes >= COLD_L2 * l2
    assert cold_inputs(lambda: "made", 23 * 10 ** 6, cpu, first="own") == ["own"] + ["made"] * 6
    assert cold_inputs(lambda: "made", 4 * 10 ** 9, cpu) == ["made"]
    called = []
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", lambda fn, rep: [fn() for _ in range(7)] and 0.5)
    assert graph_ms([lambda i=i: called.append(i) for i in range(3)]) == 0.5
    assert called == [0, 1, 2] + [0, 1, 2, 0, 1, 2, 0]  # each once before the timing


@pytest.mark.parametrize("sliding", [False, True])
def test_decode_bytes_count_what_the_timed_layer_holds(sliding):
    """The bytes model (bytes, GB/s) counts the tokens a layer holds after the prompt and the tokens decoded after
    it, as ``flush`` leaves them: a remainder of the group exact after the prompt, not of the buffer (at 32k, 4 sink
    and 28 buffered tokens, not 128), and a buffer that flushes when decoding fills it. Where a step reads every
    tensor the layer holds (some tokens compressed) the bytes are ``nbytes``' to the byte; below a full buffer only the
    exact tokens are read (the layer also holds the keys' mean). Around the sink, the buffer's size and the group's
    size, batch 2, decoded tokens that fill the sink, flush and refill the buffer; and a sliding buffer
    (``buffer_keep``)."""
    import torch

    from profiling.cmd_bench_kernels import HEAD_DIM, KV_HEADS, decode_bytes, qjl_layer
    from qjl.config import QJLConfig

    config = QJLConfig.preset("3bit", head_dim=HEAD_DIM)
    config = config.sliding() if sliding else config
    for context, decoded in ((3, 0), (4, 0), (100, 0), (131, 0), (132, 0), (133, 0), (163, 0), (164, 0), (1024, 0),
                             (2077, 0), (2, 3), (100, 40), (1024, 99), (1024, 100), (1024, 260), (133, 131)):
        keys = torch.randn(2, KV_HEADS, context, HEAD_DIM, generator=torch.Generator().manual_seed(context))
        layer = qjl_layer(config, keys.bfloat16(), keys.flip(-1).bfloat16(), decoded)
        model = decode_bytes(config, 2, context, decoded)
        exact = layer.sink_keys.shape[2] + layer.buffer_keys.shape[2]
        assert (model["compressed_tokens"], model["exact_tokens"]) == (layer.n_compressed, exact), (context, decoded)
        exact_bytes = 2 * KV_HEADS * exact * HEAD_DIM * 2 * 2  # batch 2, keys and values, bf16
        held = layer.nbytes() if layer.n_compressed else exact_bytes
        assert model["qjl"] == held, (context, decoded)
        assert model["full"] == 2 * KV_HEADS * (context + decoded) * HEAD_DIM * 2 * 2
    assert decode_bytes(QJLConfig.preset("3bit", head_dim=HEAD_DIM), 1, 32768)["exact_tokens"] == 32


@pytest.mark.parametrize("context", [2, 1024, 2077])
def test_buffer_filling_leaves_the_buffer_one_short_of_a_flush(context):
    """The sweep's heaviest decode state: after ``buffer_filling`` decoded tokens the sink is full and the buffer
    holds ``buffer_size - 1`` tokens, and one token more flushes it."""
    import torch

    from profiling.cmd_bench_kernels import HEAD_DIM, buffer_filling, qjl_layer
    from qjl.config import QJLConfig

    config = QJLConfig.preset("3bit", head_dim=HEAD_DIM)
    keys = torch.randn(1, 2, context, HEAD_DIM, generator=torch.Generator().manual_seed(context)).bfloat16()
    layer = qjl_layer(config, keys, keys, buffer_filling(config, context))
    assert (layer.sink_keys.shape[2], layer.buffer_keys.shape[2]) == (config.sink_tokens, config.buffer_size - 1)
    compressed = layer.n_compressed
    layer.update(keys[:, :, :1], keys[:, :, :1])
    assert layer.n_compressed > compressed and layer.buffer_keys.shape[2] < config.buffer_size - 1


def test_quanto_extension_counts_as_built_for_this_torch_only(tmp_path, monkeypatch):
    """``--quanto-built-only`` reads quanto's build folder: built where it holds this torch's version, not where it is
    missing or names another torch (quanto would build again); and the results' note says in how many rows
    QuantizedCache was timed."""
    import importlib.util

    import torch

    import qjl.presets
    from profiling import cmd_bench_kernels as bench

    package = tmp_path / "optimum" / "quanto"
    build = package / "library" / "extensions" / "cuda" / "build"
    build.mkdir(parents=True)
    spec = importlib.util.spec_from_file_location("optimum.quanto", package / "__init__.py")
    built = []
    with monkeypatch.context() as patched:
        patched.setattr(importlib.util, "find_spec", lambda name: spec)
        built.append(bench.quanto_extension_built())
        (build / "pytorch_version.txt").write_text("2.0.0\n")
        built.append(bench.quanto_extension_built())
        (build / "pytorch_version.txt").write_text(torch.__version__ + "\n")
        built.append(bench.quanto_extension_built())
    assert built == [False, False, True]
    monkeypatch.setattr(qjl.presets, "quanto_available", lambda: True)
    note = bench.quantized_cache_note([{"quantized_cache_ms": 1.0}, {"quantized_cache_skipped": "not built yet"}])
    assert note.endswith("in 1 of 2 rows: the others ran before optimum-quanto's CUDA extension was built "
                         "(--quanto-built-only)")
    assert bench.quantized_cache_note([{"quantized_cache_ms": 1.0}]).endswith("4 bits")


def test_layer_copies_each_draw_their_own_sketch():
    """The timed calls' copies of a layer are at layer indices of their own, so each reads its own sketch (cold, as
    a model's layers read theirs once a step); all past the initial layers, so the sketch's width is the one a
    step at the benchmark's shapes takes. Copies at one index shared one matrix (``qjl.sketch`` keeps one per seed)
    and its tables stayed in L2."""
    import torch

    from profiling.cmd_bench_kernels import HEAD_DIM, layer_copies, qjl_layer
    from qjl.config import QJLConfig

    config = QJLConfig.preset("3bit", head_dim=HEAD_DIM)
    keys = torch.randn(1, 2, 200, HEAD_DIM, generator=torch.Generator().manual_seed(0)).bfloat16()
    first = qjl_layer(config, keys, keys)
    layers = layer_copies(config, keys, keys, 40 * 2 ** 20, torch.device("cpu"), first=first)  # 4 copies of 40 MB
    assert len(layers) == 4 and layers[0] is first
    matrices = [layer.sketch.matrix for layer in layers]
    assert all(m.shape == (config.sketch_dim, HEAD_DIM) for m in matrices)
    assert all(not torch.equal(a, b) for i, a in enumerate(matrices) for b in matrices[i + 1:])
    assert all(layer.n_compressed == first.n_compressed for layer in layers)
