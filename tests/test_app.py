"""The Gradio app served for real (in this process, on a free port) and driven through ``gradio_client`` and headless
Chromium: streamed outputs, chart data, summary, export, bad input followed by a good run, Stop, two sessions."""

import json
import shutil
import socket
import time
import zipfile
from pathlib import Path

import pytest
import torch

gradio_client = pytest.importorskip("gradio_client")
import app  # noqa: E402

SHORT = "Explain in a few sentences why the sky is blue."


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def url(embedded):
    """The app served on a free port, sharing the test session's embedded model."""
    app.MODEL.name, app.MODEL.pair = app.EMBEDDED, embedded
    port = free_port()
    demo_app, local_url, _ = app.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port,
                                        quiet=True)
    yield local_url
    app.gr.close_all()


@pytest.fixture(scope="module")
def long_prompt(embedded):
    """About 200 tokens of the long document: enough that the compressed side quantizes most of it."""
    import assets

    return assets.truncate_to_tokens(assets.long_text(), embedded[1], 200) + "\n\nWhat is this text about?"


def client(url):
    # A long timeout: on a loaded 2-core machine the server can take more than the default 20 s to answer.
    return gradio_client.Client(url, verbose=False, httpx_kwargs={"timeout": 120})


def compare(c, prompt, method="qjl-3bit", tokens=3, teacher_forcing=False, model=app.EMBEDDED, sketch_dim=128,
            chat=True):
    """Submits a comparison; returns the job (its ``outputs()`` are every streamed update)."""
    return c.submit(prompt, model, method, sketch_dim, 4, 2, 64, 4, True, tokens, teacher_forcing, chat,
                    api_name="/compare")


def summary_of(result) -> dict:
    return {row[0]: row[1] for row in result[7]["data"]}


def plot_data(output) -> list[dict]:
    assert output["type"] == "plotly"
    return json.loads(output["plot"])["data"]


def assert_good_run(c, prompt=SHORT, tokens=1):
    result = compare(c, prompt, tokens=tokens).result(timeout=120)
    assert result[0].startswith("Done"), result[0]
    assert result[1] and result[2]
    return result


def test_compare_streams_charts_summary_and_export(url, long_prompt):
    c = client(url)
    job = compare(c, long_prompt, tokens=4, teacher_forcing=True)
    result = job.result(timeout=240)
    status, text_full, text_compressed = result[:3]
    assert status.startswith("Done"), status
    assert text_full.strip() and text_compressed.strip()
    # Streamed: a prefill message, then text growing step by step.
    streamed = [output[1] for output in job.outputs() if isinstance(output[1], str)]
    assert any(out[0].startswith("Prefilling") for out in job.outputs())
    assert len(streamed) >= 2 and len(streamed[0]) < len(streamed[-1])

    summary = summary_of(result)
    steps = int(summary["steps"])
    assert 1 <= steps <= 4
    assert float(summary["ratio"]) > 2  # most of the 200-token prompt is quantized
    assert 0 <= float(summary["match rate"]) <= 1
    assert 0 <= float(summary["teacher forced top1"]) <= 1 and float(summary["teacher forced kl"]) >= 0
    assert float(summary["bits per number"]) < 16

    memory, device, latency, agreement = (plot_data(output) for output in result[3:7])
    full, compressed = memory[0], memory[1]
    assert len(full["x"]) == steps + 1  # the prefill, then one point per step
    assert full["y"][-1] > compressed["y"][-1] > 0
    assert len(latency[0]["y"]) >= steps - 1 and all(y > 0 for y in latency[0]["y"])
    assert len(agreement[0]["y"]) == steps
    assert device and all(y is None or y > 0 for y in device[0]["y"])

    path = c.predict(api_name="/export")
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        assert {"config.json", "records/steps.csv", "records/steps.json", "charts/kv_memory.html"} <= names
        assert len(archive.read("records/steps.csv").decode().strip().splitlines()) == steps + 1
        assert json.loads(archive.read("config.json"))["prompt_tokens"] > 200
        if shutil.which("chromium"):
            assert "charts/latency.png" in names


def fail_out_of_memory(spec):
    def make_cache(model):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    return make_cache


BAD_INPUTS = {
    "empty prompt": (dict(prompt="   "), "prompt is empty"),
    "prompt longer than the context": (dict(prompt=None), "exceeds the model's context"),
    "invalid settings": (dict(method=app.CUSTOM, sketch_dim=100), "sketch_dim=100 is invalid"),
    "no new tokens": (dict(tokens=0), "less than minimum value 1"),  # the slider's own check
    "model that cannot be loaded": (dict(model="EMPTY_FOLDER"), "could not load model"),
    "out of memory": (dict(), "Out of memory"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_shows_message_then_next_run_works(url, case, tmp_path, monkeypatch):
    import assets

    kwargs, message = BAD_INPUTS[case]
    kwargs = dict(kwargs)
    if kwargs.get("prompt", "") is None:
        kwargs["prompt"] = assets.long_text() * 2  # about 15k tokens, the model reads 8k
    if kwargs.get("model") == "EMPTY_FOLDER":
        kwargs["model"] = str(tmp_path)
    if case == "out of memory":
        monkeypatch.setattr(app, "factory", fail_out_of_memory)
    c = client(url)
    try:  # the app's own checks answer in the status line, Gradio's input checks as an error
        shown = compare(c, **{"prompt": SHORT, **kwargs}).result(timeout=120)[0]
    except gradio_client.exceptions.AppError as error:
        shown = str(error)
    assert message in shown
    monkeypatch.undo()
    assert_good_run(c)


def test_uploads(url, tmp_path):
    from gradio_client import handle_file

    c = client(url)
    good = tmp_path / "good.txt"
    good.write_text("A short document.\n", encoding="utf-8")
    assert c.predict(handle_file(str(good)), api_name="/upload") == "A short document.\n"
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00\x80" * 100)
    with pytest.raises(Exception, match="not UTF-8"):
        c.predict(handle_file(str(binary)), api_name="/upload")
    oversized = tmp_path / "big.txt"
    oversized.write_text("x" * (app.MAX_UPLOAD_BYTES + 1))
    with pytest.raises(Exception):
        c.predict(handle_file(str(oversized)), api_name="/upload")
    assert_good_run(c)


def test_stop_cancels_the_run_and_frees_it(url, long_prompt, monkeypatch):
    freed = []
    monkeypatch.setattr(app, "free_memory", lambda: freed.append(time.time()))
    c = client(url)
    job = compare(c, long_prompt, tokens=200)
    deadline = time.time() + 120
    while not any(output[0].startswith("Decoding") for output in job.outputs()):
        assert time.time() < deadline and not job.done(), "the run never started decoding"
        time.sleep(0.2)
    job.cancel()
    while not freed:  # the run's `finally` closed the runner (dropping both caches) and freed memory
        assert time.time() < deadline, "the cancelled run was never cleaned up"
        time.sleep(0.1)
    steps = len([o for o in job.outputs() if o[0].startswith("Decoding")])
    assert steps < 200
    monkeypatch.undo()
    assert_good_run(c)


def test_two_sessions_queue_and_keep_their_own_state(url, monkeypatch):
    import functools

    monkeypatch.setattr(app, "export_run", functools.partial(app.export_run, png=False))  # only the state matters
    first, second = client(url), client(url)
    jobs = [compare(first, SHORT, tokens=1), compare(second, "Name three colours of the rainbow. " * 3, tokens=1)]
    results = [job.result(timeout=120) for job in jobs]
    assert all(result[0].startswith("Done") for result in results)
    tokens = []
    for c in (first, second):
        with zipfile.ZipFile(c.predict(api_name="/export")) as archive:
            tokens.append(json.loads(archive.read("config.json"))["prompt_tokens"])
    assert tokens[0] != tokens[1]


def test_browser_run_and_screenshot(url, tmp_path):
    pytest.importorskip("playwright")
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from browser_run import run_in_browser

    shot = tmp_path / "screenshot.png"
    result = run_in_browser(url, str(shot), prompt=SHORT, tokens=3, timeout_s=120)
    assert result["status"].startswith("Done"), result["status"]
    assert result["text_full"] and result["text_compressed"]
    assert shot.stat().st_size > 20_000
