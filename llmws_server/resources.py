"""Memory and device figures, and the context limit they allow."""
import os
import platform

import psutil

GB = 1024 ** 3
ACTIVATION_RESERVE = 0.4  # the seed keeps 40 % of free memory for activations


def _round(value_bytes: float) -> float:
    return round(value_bytes / GB, 2)


def cuda_info() -> dict | None:
    """The seed's `cuda` block for GPU 0, or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info(0)
    props = torch.cuda.get_device_properties(0)
    return {"device": props.name, "total_gb": _round(total), "free_gb": _round(free),
            "allocated_gb": _round(torch.cuda.memory_allocated(0)),
            "compute_capability": [props.major, props.minor]}


def cpu_info() -> dict:
    memory = psutil.virtual_memory()
    return {"processor": _processor_name(), "cores": psutil.cpu_count(logical=True),
            "total_gb": _round(memory.total), "available_gb": _round(memory.available),
            "process_rss_gb": _round(psutil.Process(os.getpid()).memory_info().rss)}


def device_summary() -> dict:
    """The welcome's `resources`: the GPU when there is one, else the CPU's RAM."""
    cuda = cuda_info()
    if cuda:
        return {key: cuda[key] for key in ("device", "total_gb", "free_gb", "compute_capability")}
    cpu = cpu_info()
    return {"device": "cpu", "total_gb": cpu["total_gb"], "free_gb": cpu["available_gb"], "compute_capability": None}


def free_memory_bytes() -> int:
    cuda = cuda_info()
    return int(cuda["free_gb"] * GB) if cuda else psutil.virtual_memory().available


def kv_bytes_per_token(model_config, bytes_per_element: int) -> int | None:
    """K and V for every layer: 2 x layers x key/value heads x head dim x element size."""
    text_config = getattr(model_config, "text_config", None) or model_config
    layers = getattr(text_config, "num_hidden_layers", None)
    heads = getattr(text_config, "num_attention_heads", None)
    hidden = getattr(text_config, "hidden_size", None)
    if not (layers and heads and hidden):
        return None
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or hidden // heads
    return 2 * layers * kv_heads * head_dim * bytes_per_element


def estimate_max_context(model_config, free_bytes: int, bytes_per_element: int, cap: int,
                         params: int | None = None) -> int:
    """How many tokens of KV cache fit in what is free after the activation reserve, capped by the
    model's position limit and the configured maximum. Falls back to the seed's formula."""
    usable = free_bytes * (1 - ACTIVATION_RESERVE)
    per_token = kv_bytes_per_token(model_config, bytes_per_element)
    if per_token is None:
        per_token = (params or 1e9) * 2 / 1000  # the seed's formula
    limit = min(int(usable / per_token), cap)
    positions = getattr(getattr(model_config, "text_config", None) or model_config, "max_position_embeddings", None)
    if positions:
        limit = min(limit, positions)
    return max(limit, 0)


def _processor_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
