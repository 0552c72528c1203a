"""engines/transformers/engine.py: the dtype and attention it chooses for a GPU (or none), what it runs on CUDA
(where one is present), and, in-process on the tiny random model, a stop while a prompt is read."""
import sys
import types

import pytest
import torch
from conftest import PROMPTS, REPO

from llmws_server.config import DEFAULTS
from llmws_server.engines.api import Prompt
from llmws_server.engines.transformers.batching import GREEDY
from llmws_server.engines.transformers.engine import Engine, choose_attention, choose_dtype

from .shared import GREEDY_12


@pytest.mark.parametrize("capability, dtype", [(None, torch.float32), ([7, 5], torch.float16), ([8, 0], torch.bfloat16),
                                               ([8, 6], torch.bfloat16), ([8, 9], torch.bfloat16),
                                               ([10, 0], torch.bfloat16)])
def test_auto_dtype_follows_the_architecture(capability, dtype):
    assert choose_dtype("auto", capability) == dtype
    assert choose_dtype("float16", capability) == torch.float16


def test_flash_attention_only_where_it_can_run():
    assert choose_attention(True, None) == "sdpa"
    assert choose_attention(True, [7, 5]) == "sdpa"
    assert choose_attention(False, [9, 0]) == "sdpa"


def test_flash_attention_2_where_flash_attn_imports_on_sm_8_or_newer(monkeypatch):
    # flash_attn builds only against CUDA: an importable stand-in shows the choice (the gpu tests load it for real)
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    assert choose_attention(True, [8, 0]) == choose_attention(True, [9, 0]) == "flash_attention_2"
    assert choose_attention(True, [7, 5]) == choose_attention(False, [8, 0]) == choose_attention(True, None) == "sdpa"


@pytest.mark.gpu
def test_generating_on_cuda_runs_no_cudnn_attention(tiny_model):
    # cuDNN's attention builds a plan for every new key length, i.e. for every generated token
    from torch.profiler import ProfilerActivity, profile

    engine = Engine(tiny_model, DEFAULTS["model"], DEFAULTS["optimization"], 4096)
    with profile(activities=[ProfilerActivity.CUDA]) as profiled:
        tokens, _ = engine.generate(Prompt([1, 2, 3, 4]), GREEDY, 8, lambda text, logprobs: None, lambda: None)
    kernels = {event.name for event in profiled.events() if event.device_type == torch.autograd.DeviceType.CUDA}
    assert tokens == 8 and kernels
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    assert not [name for name in kernels if "cudnn" in name.lower()]


def test_a_stop_while_a_prompt_is_read_takes_effect_within_a_layer(tiny_model):
    """generate() asks should_stop before each decoder layer while it reads the prompt (a cancel during a
    long prompt's read, a batch taking over a solo run): stopped at the second layer, one layer ran and no
    token came. The layers' hooks go with the call: the next generate() runs in full."""
    from llmws_server.config import GenerationSettings, load_config
    from llmws_server.engines.transformers.engine import Engine

    config = load_config(REPO / "config.json")
    engine = Engine.for_config(tiny_model, config)
    assert len(engine.layers) >= 2
    ran, texts, asks = [], [], iter([None])

    def keep(text, logprobs):
        texts.append(text)
    hooks = [layer.register_forward_hook(lambda module, args, output: ran.append(module)) for layer in engine.layers]
    try:
        greedy = GenerationSettings(**GREEDY_12)
        result = engine.generate(engine.encode_text(PROMPTS[1]), greedy, 12, keep,
                                 lambda: next(asks, "cancelled"))
        assert (result, texts, ran) == ((0, "cancelled"), [], engine.layers[:1])
        assert engine.generate(engine.encode_text(PROMPTS[1]), greedy, 12, keep, lambda: None) == (12, "length")
    finally:
        for hook in hooks:
            hook.remove()
