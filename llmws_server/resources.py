"""Memory and device figures, and the context limit they allow.

GPU figures come from NVML (nvidia-ml-py) with torch.cuda as the fallback; both are passed in as
modules, so tests can hand in a fake where a machine has no GPU. None of this may run on the event loop:
callers use asyncio.to_thread.
"""
import json
import math
import os
import platform
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import psutil

from llmws_server.errors import Refused

GB = 1024 ** 3
ACTIVATION_RESERVE = 0.4  # the seed keeps 40 % of free memory for activations


def _gb(value_bytes: float) -> float:
    return round(value_bytes / GB, 2)


class CudaDevices(Protocol):
    """The few calls of torch.cuda read here (tests hand in a fake)."""

    def device_count(self) -> int: ...

    def memory_allocated(self, device: int, /) -> int: ...

    def memory_reserved(self, device: int, /) -> int: ...

    def mem_get_info(self, device: int, /) -> tuple[int, int]: ...

    def get_device_capability(self, device: int, /) -> tuple[int, int]: ...

    def get_device_name(self, device: int, /) -> str: ...


# `nvml` parameters below are Any: the pynvml module (no type stubs), a test's fake, or False (no NVML).


def load_nvml() -> ModuleType | None:
    """pynvml, initialised, or None where the package or the driver is missing."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # ImportError, or NVMLError when there is no driver
        return None


def _torch_cuda() -> CudaDevices | None:
    import torch

    return torch.cuda if torch.cuda.is_available() else None


def gpus(nvml: Any = None, cuda: CudaDevices | None = None) -> list[dict]:
    """Every visible GPU: name, memory, compute capability, and utilisation/temperature when NVML has them.
    nvml=False means: do not use NVML (the torch.cuda fallback)."""
    cuda = cuda if cuda is not None else _torch_cuda()
    if cuda is None:
        return []
    nvml = nvml if nvml is not None else _NVML
    devices = []
    for index in range(cuda.device_count()):
        allocated = {"allocated_gb": _gb(cuda.memory_allocated(index)), "reserved_gb": _gb(cuda.memory_reserved(index))}
        if nvml:
            devices.append({**_nvml_figures(nvml, index), **allocated})
        else:
            free, total = cuda.mem_get_info(index)
            major, minor = cuda.get_device_capability(index)
            devices.append({"index": index, "device": cuda.get_device_name(index), "total_gb": _gb(total),
                            "free_gb": _gb(free), **allocated, "compute_capability": [major, minor]})
    return devices


def _nvml_figures(nvml: Any, index: int) -> dict:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    name = nvml.nvmlDeviceGetName(handle)
    figures = {"index": index, "device": name.decode() if isinstance(name, bytes) else name,
               "total_gb": _gb(memory.total), "free_gb": _gb(memory.free),
               "compute_capability": list(nvml.nvmlDeviceGetCudaComputeCapability(handle))}
    try:
        figures["utilization_pct"] = nvml.nvmlDeviceGetUtilizationRates(handle).gpu
        figures["temperature_c"] = nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
    except Exception:  # not every GPU reports these
        pass
    return figures


def cuda_info(nvml: Any = None, cuda: CudaDevices | None = None) -> dict | None:
    """The seed's `cuda` block (GPU 0, and the original's reserved_gb and num_gpus) with every GPU under
    `devices`, or None without CUDA."""
    devices = gpus(nvml, cuda)
    if not devices:
        return None
    first = devices[0]
    keys = ("device", "total_gb", "free_gb", "allocated_gb", "reserved_gb", "compute_capability")
    return {key: first[key] for key in keys} | {"num_gpus": len(devices), "devices": devices}


def cpu_info() -> dict:
    memory = psutil.virtual_memory()
    return {"processor": _processor_name(), "cores": psutil.cpu_count(logical=True),
            "total_gb": _gb(memory.total), "available_gb": _gb(memory.available),
            "process_rss_gb": _gb(psutil.Process(os.getpid()).memory_info().rss)}


def device_summary(nvml: Any = None, cuda: CudaDevices | None = None) -> dict:
    """The welcome's `resources`: the GPU when there is one, else the CPU's RAM."""
    gpu = cuda_info(nvml, cuda)
    if gpu:
        return {key: gpu[key] for key in ("device", "total_gb", "free_gb", "compute_capability")}
    cpu = cpu_info()
    return {"device": "cpu", "total_gb": cpu["total_gb"], "free_gb": cpu["available_gb"], "compute_capability": None}


def free_memory_bytes(nvml: Any = None, cuda: CudaDevices | None = None) -> int:
    """Free memory where the model's KV cache will live: all GPUs together, else available RAM."""
    devices = gpus(nvml, cuda)
    if devices:
        return int(sum(device["free_gb"] for device in devices) * GB)
    return psutil.virtual_memory().available


def weights_bytes(folder: Path, bytes_per_element: int, quantized: bool) -> int | None:
    """What the folder's safetensors weights take in memory at that element size, or None where it has
    none. Only the files' headers are read (8 bytes of length, then JSON: each tensor's shape). Quantized
    weights stay as stored: their files' size."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    if quantized:
        return sum(file.stat().st_size for file in files)
    elements = 0
    try:
        for file in files:
            with file.open("rb") as weights:
                header = json.loads(weights.read(int.from_bytes(weights.read(8), "little")))
            elements += sum(math.prod(tensor["shape"]) for name, tensor in header.items() if name != "__metadata__")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None  # not a safetensors file: the loader says so
    return elements * bytes_per_element


def check_weights_fit(folder: Path, bytes_per_element: int, quantized: bool) -> None:
    """Refuse, before loading, weights that free memory cannot hold (on a GPU, device_map may also
    place layers in RAM)."""
    needed = weights_bytes(folder, bytes_per_element, quantized)
    free = free_memory_bytes()
    if gpus():
        free += psutil.virtual_memory().available
    if needed is not None and needed > free:
        raise Refused(f"{folder.name} needs about {_gb(needed):.1f} GB for its weights, but only "
                         f"{_gb(free):.1f} GB is free: pick a smaller model, a smaller dtype "
                         "(optimization.dtype), or free memory")


def _text_config(model_config: object) -> object:
    return getattr(model_config, "text_config", None) or model_config


def kv_cache_cost(model_config: object, bytes_per_element: int) -> tuple[int, int] | None:
    """(bytes per token, fixed bytes): K and V = 2 x layers x key/value heads x head dim x element size.
    Sliding-window layers hold at most `sliding_window` tokens, so they cost a fixed amount instead."""
    config = _text_config(model_config)
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if not (layers and heads and hidden):
        return None
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    per_layer = 2 * kv_heads * head_dim * bytes_per_element
    layer_types = getattr(config, "layer_types", None) or []
    window = getattr(config, "sliding_window", None)
    sliding = sum(1 for kind in layer_types if kind == "sliding_attention") if window else 0
    return (layers - sliding) * per_layer, sliding * per_layer * (window or 0)


def kv_tokens_that_fit(model_config: object, free_bytes: int, bytes_per_element: int,
                       params: int | None = None) -> int | None:
    """How many tokens of KV cache fit in 60 % of what is free; None when the cache never grows past the
    sliding windows. Falls back to the seed's formula when the config lacks the fields."""
    usable = free_bytes * (1 - ACTIVATION_RESERVE)
    cost = kv_cache_cost(model_config, bytes_per_element)
    per_token, fixed = cost if cost else ((params or 1e9) * 2 / 1000, 0)  # the seed's formula
    if per_token == 0:
        return None
    return int(max(usable - fixed, 0) / per_token)


def estimate_max_context(model_config: object, free_bytes: int, bytes_per_element: int, cap: int,
                         params: int | None = None) -> int:
    """The tokens that fit (kv_tokens_that_fit), capped by the model's position limit and the configured maximum."""
    fitting = kv_tokens_that_fit(model_config, free_bytes, bytes_per_element, params)
    limit = cap if fitting is None else min(fitting, cap)
    positions = getattr(_text_config(model_config), "max_position_embeddings", None)
    return max(min(limit, positions) if positions else limit, 0)


def _processor_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_NVML = load_nvml()
