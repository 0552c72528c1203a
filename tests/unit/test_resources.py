"""resources.py: the context estimate against hand-worked numbers, CPU figures, GPU paths through a fake
NVML/CUDA layer (and the real one where a GPU is present)."""
import types

import psutil
import pytest
import torch
from transformers import Gemma2Config, LlamaConfig, Qwen2Config

from llmws_server import resources

GB = 1024 ** 3
LLAMA_31_8B = LlamaConfig(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, hidden_size=4096,
                          max_position_embeddings=131072)
QWEN_25_7B = Qwen2Config(num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, hidden_size=3584,
                         max_position_embeddings=32768)
SMOLLM2_135M = LlamaConfig(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576,
                           head_dim=64, max_position_embeddings=8192)


@pytest.mark.parametrize("config, element, per_token", [
    (LLAMA_31_8B, 2, 128 * 1024),       # 2 x 32 layers x 8 heads x 128 dims x 2 bytes = 128 KiB
    (QWEN_25_7B, 2, 57344),              # 2 x 28 x 4 x 128 x 2
    (SMOLLM2_135M, 4, 46080),            # 2 x 30 x 3 x 64 x 4 (float32 on a CPU)
])
def test_kv_cache_cost_per_token_matches_the_hand_worked_numbers(config, element, per_token):
    assert resources.kv_cache_cost(config, element) == (per_token, 0)


def test_the_seeds_example_gets_a_sane_context():
    # 18.5 GB free for Llama-3.1-8B in bf16: 0.6 x 18.5 GiB / 128 KiB = 90,931 tokens (the seed's formula: ~700)
    assert resources.estimate_max_context(LLAMA_31_8B, int(18.5 * GB), 2, 128000) == 90931
    assert resources.estimate_max_context(LLAMA_31_8B, 80 * GB, 2, 128000) == 128000  # the configured cap
    assert resources.estimate_max_context(QWEN_25_7B, 80 * GB, 2, 128000) == 32768  # the model's positions
    assert resources.estimate_max_context(SMOLLM2_135M, int(22.9 * GB), 4, 128000) == 8192
    # what a batch may hold in all, past the caps
    assert resources.kv_tokens_that_fit(LLAMA_31_8B, int(18.5 * GB), 2) == 90931
    assert resources.kv_tokens_that_fit(SMOLLM2_135M, int(22.9 * GB), 4) > 8 * 8192


def test_sliding_window_layers_cost_a_fixed_amount():
    config = Gemma2Config(num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                          hidden_size=2304, sliding_window=4096, max_position_embeddings=1_000_000)
    config.layer_types = ["sliding_attention", "full_attention"] * 2
    per_layer = 2 * 4 * 256 * 2
    assert resources.kv_cache_cost(config, 2) == (2 * per_layer, 2 * per_layer * 4096)
    free = 10 * GB
    expected = int((free * 0.6 - 2 * per_layer * 4096) / (2 * per_layer))
    assert resources.estimate_max_context(config, free, 2, 10 ** 9) == expected


def test_configs_without_the_fields_fall_back_to_the_seeds_formula():
    bare = types.SimpleNamespace()
    # 8e9 parameters x 2 / 1000 = 16 MB a token; 0.6 x 18.5 GiB / 16e6 B = 744.9, so 744 tokens
    assert resources.estimate_max_context(bare, int(18.5 * GB), 2, 128000, params=8_000_000_000) == 744


def test_cpu_figures_are_psutils():
    cpu = resources.cpu_info()
    assert cpu["total_gb"] == round(psutil.virtual_memory().total / GB, 2)
    assert cpu["cores"] == psutil.cpu_count() and cpu["processor"]
    assert 0 < cpu["process_rss_gb"] < cpu["total_gb"]
    if not torch.cuda.is_available():
        assert resources.cuda_info() is None
        assert resources.device_summary()["device"] == "cpu"


class FakeCuda:
    """torch.cuda's few calls, for two GPUs."""

    def device_count(self):
        return 2

    def memory_allocated(self, index):
        return 5 * GB

    def memory_reserved(self, index):
        return 6 * GB

    def mem_get_info(self, index):
        return 18 * GB, 24 * GB

    def get_device_capability(self, index):
        return (8, 9)

    def get_device_name(self, index):
        return "NVIDIA GeForce RTX 4090"


class FakeNVML:
    NVML_TEMPERATURE_GPU = 0

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetMemoryInfo(self, handle):
        return types.SimpleNamespace(total=80 * GB, free=(60 - 10 * handle) * GB, used=0)

    def nvmlDeviceGetName(self, handle):
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetCudaComputeCapability(self, handle):
        return (9, 0)

    def nvmlDeviceGetUtilizationRates(self, handle):
        if handle == 1:
            raise RuntimeError("not supported")
        return types.SimpleNamespace(gpu=37, memory=10)

    def nvmlDeviceGetTemperature(self, handle, sensor):
        return 55


def test_gpu_figures_from_nvml_for_every_gpu():
    info = resources.cuda_info(FakeNVML(), FakeCuda())
    assert info["device"] == "NVIDIA H100 80GB HBM3" and info["total_gb"] == 80.0 and info["free_gb"] == 60.0
    assert info["allocated_gb"] == 5.0 and info["compute_capability"] == [9, 0]
    assert info["reserved_gb"] == 6.0 and info["num_gpus"] == 2
    assert [d["free_gb"] for d in info["devices"]] == [60.0, 50.0]
    assert info["devices"][0]["utilization_pct"] == 37 and info["devices"][0]["temperature_c"] == 55
    assert "utilization_pct" not in info["devices"][1]  # a GPU that does not say is still listed
    assert resources.free_memory_bytes(FakeNVML(), FakeCuda()) == 110 * GB
    assert resources.device_summary(FakeNVML(), FakeCuda()) == {
        "device": "NVIDIA H100 80GB HBM3", "total_gb": 80.0, "free_gb": 60.0, "compute_capability": [9, 0]}


def test_gpu_figures_fall_back_to_torch_cuda_without_nvml():
    info = resources.cuda_info(False, FakeCuda())
    assert info["device"] == "NVIDIA GeForce RTX 4090" and info["free_gb"] == 18.0 and info["total_gb"] == 24.0
    assert info["compute_capability"] == [8, 9] and len(info["devices"]) == 2


@pytest.mark.gpu
def test_real_gpu_figures():
    info = resources.cuda_info()
    assert info["total_gb"] > 0 and info["compute_capability"][0] >= 3
    assert info["devices"][0]["device"] == torch.cuda.get_device_name(0)
