"""Background memory sampler: device memory through NVML (the ``nvidia-ml-py`` package), torch's allocator, and the
process's resident memory as the fallback where there is no GPU or no NVML.

``with MemorySampler() as sampler: ...`` then ``sampler.samples`` (one dict per tick, ~20 a second) and
``sampler.source`` (``"nvml"`` or ``"rss"``) with ``sampler.fallback_reason`` saying why NVML is not used.
"""

from __future__ import annotations

import os
import threading
import time

import psutil
import torch


def load_nvml():
    """The ``pynvml`` module of ``nvidia-ml-py``, initialised, or raises why it cannot be used."""
    import pynvml

    pynvml.nvmlInit()
    return pynvml


class MemorySampler:
    """Samples memory every ``interval_s`` seconds on a background thread between ``start()`` and ``stop()``.

    Each sample: ``t`` (seconds since start), ``device_used_bytes`` (the whole GPU, NVML), ``process_device_bytes``
    (this process on the GPU, NVML), ``torch_allocated_bytes`` and ``torch_reserved_bytes`` (torch's CUDA caching
    allocator), ``rss_bytes`` (this process's resident memory). Fields that do not apply are None.
    """

    def __init__(self, device: str | torch.device | None = None, interval_s: float = 0.05, nvml=None):
        self.device = torch.device(device) if device is not None else (
            torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        self.interval_s = interval_s
        self.samples: list[dict] = []
        self.process = psutil.Process(os.getpid())
        self.nvml, self.handle, self.fallback_reason = None, None, None
        if self.device.type != "cuda":
            self.fallback_reason = f"device is {self.device.type}: no GPU memory to sample, using process RSS"
        else:
            try:
                self.nvml = nvml if nvml is not None else load_nvml()
                self.handle = self._handle()
            except Exception as error:  # NVML missing, driver absent, or no permission
                self.nvml = None
                self.fallback_reason = f"NVML unavailable ({type(error).__name__}: {error}), using process RSS"
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._start_time = 0.0

    @property
    def source(self) -> str:
        return "nvml" if self.nvml is not None else "rss"

    @property
    def fallback(self) -> bool:
        return self.nvml is None

    def _handle(self):
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        # NVML counts every GPU while CUDA may see a subset (CUDA_VISIBLE_DEVICES): match by UUID where possible.
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None) if torch.cuda.is_available() else None
        if uuid is not None:
            try:
                return self.nvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
            except Exception:
                pass
        return self.nvml.nvmlDeviceGetHandleByIndex(index)

    def sample(self) -> dict:
        """One sample now (also what the background thread records)."""
        record = {"t": time.perf_counter() - self._start_time, "device_used_bytes": None,
                  "process_device_bytes": None, "torch_allocated_bytes": None, "torch_reserved_bytes": None,
                  "rss_bytes": self.process.memory_info().rss}
        if self.nvml is not None:
            record["device_used_bytes"] = int(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used)
            pid = os.getpid()
            try:
                processes = self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
                record["process_device_bytes"] = sum(int(p.usedGpuMemory or 0) for p in processes if p.pid == pid)
            except Exception:  # some drivers refuse per-process queries in containers
                pass
        if self.device.type == "cuda" and torch.cuda.is_available():
            record["torch_allocated_bytes"] = torch.cuda.memory_allocated(self.device)
            record["torch_reserved_bytes"] = torch.cuda.memory_reserved(self.device)
        return record

    def _loop(self):
        while not self._stop.is_set():
            self.samples.append(self.sample())
            self._stop.wait(self.interval_s)

    def start(self) -> "MemorySampler":
        if self._thread is not None:
            raise RuntimeError("the sampler is already running")
        self.samples = []
        self._stop.clear()
        self._start_time = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[dict]:
        """Stops sampling (taking one last sample) and returns the samples."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.samples.append(self.sample())
        return self.samples

    def __enter__(self) -> "MemorySampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def info(self) -> dict:
        """What was sampled and how, for results files."""
        return {"source": self.source, "fallback": self.fallback, "fallback_reason": self.fallback_reason,
                "device": str(self.device), "interval_s": self.interval_s, "n_samples": len(self.samples)}
