"""The transformers engine (engines.api.Engine): loading with the right dtype and attention, prompts,
streamed generation of one request; batches are in batching.py. It knows nothing about sessions, queues,
sockets or HTTP: it is given token ids and settings, and gives text. This folder's modules are the only
ones that name transformers (resources.py asks torch for device memory)."""
import contextlib
import functools
import gc
import importlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import llguidance
import llguidance.hf
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from llmws_server import resources
from llmws_server.config import Config, GenerationSettings
from llmws_server.engines.api import Prompt, TokenLogprob
from llmws_server.engines.text import Streamer, TextStream
from llmws_server.engines.transformers import embedding
from llmws_server.engines.transformers.batching import SLOT_TOKENS, TransformersBatch
from llmws_server.engines.transformers.picking import Picker, PickerProcessor
from llmws_server.engines.transformers.training import LoRATrainer, save_model

if TYPE_CHECKING:  # what the Auto classes' from_pretrained gives (a PreTrainedModel that generates)
    from transformers.models.auto.modeling_auto import _BaseModelWithGenerate

log = logging.getLogger("llmws.engine")
# Fault injection for the tests: a prompt containing this text runs out of memory after its first token.
FAULT_OOM_MARKER = os.environ.get("LLMWS_FAULT_OOM")
# Requests a batch takes at once by default: on a CPU too, 32 slots serve 32 clients faster and give them
# their first token far sooner than 16, and cost 8 clients nothing (figures: docs/benchmarks.md, "The
# figures behind the engines' rules").
BATCH_SIZE = {"cpu": 32, "cuda": 32}


def choose_dtype(name: str, compute_capability: list[int] | None) -> torch.dtype:
    """'auto': float32 on a CPU, bfloat16 on CUDA 8.0 or newer, float16 on older CUDA."""
    if name != "auto":
        return getattr(torch, name)
    if compute_capability is None:
        return torch.float32
    return torch.bfloat16 if tuple(compute_capability) >= (8, 0) else torch.float16


def choose_attention(use_flash: bool, compute_capability: list[int] | None) -> str:
    if use_flash and compute_capability is not None and tuple(compute_capability) >= (8, 0):
        try:
            importlib.import_module("flash_attn")
            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def takes_images(model_config: Any) -> bool:
    """An image-text-to-text model (Qwen2-VL, Idefics3/SmolVLM, LLaVA, Gemma 3, ...)."""
    return model_config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and hasattr(model_config,
                                                                                         "vision_config")


class _StopWhen(StoppingCriteria):
    """Ends generation when `check()` returns a reason (cancelled, timeout)."""

    def __init__(self, check: Callable[[], str | None]):
        self.check = check
        self.reason: str | None = None

    def stops(self) -> bool:
        self.reason = self.reason or self.check()
        return self.reason is not None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.stops(), dtype=torch.bool, device=input_ids.device)


class _StoppedReading(Exception):
    """A stop came while generate() read the prompt."""


def decoder_layers(model: Any) -> list:
    """The layers a prompt's read may stop between (none found: it runs to its end)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    return list(getattr(decoder, "layers", None) or [])


class Engine:  # engines.api.Engine
    def __init__(self, model_dir: Path, model_options: dict, optimization: dict, max_context_cap: int):
        self.path = Path(model_dir)
        self.name = self.path.name
        cuda = torch.cuda.is_available()
        self.compute_capability = list(torch.cuda.get_device_capability(0)) if cuda else None
        self.dtype = choose_dtype(optimization["dtype"], self.compute_capability)
        self.attention = choose_attention(optimization["use_flash_attention"], self.compute_capability)
        if cuda:
            avoid_cudnn_attention()
        else:
            use_grouped_query_sdpa()
        trust = self.trust_remote_code = model_options["trust_remote_code"]
        started = time.monotonic()
        self.config = AutoConfig.from_pretrained(self.path, trust_remote_code=trust)
        self.vision = takes_images(self.config)
        if self.vision:  # the processor turns images into pixels and the prompt's image tokens
            self.processor = AutoProcessor.from_pretrained(self.path, trust_remote_code=trust)
            self.tokenizer = self.processor.tokenizer
        else:
            self.processor = None
            self.tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=trust)
        resources.check_weights_fit(self.path, self.dtype.itemsize, hasattr(self.config, "quantization_config"))
        model_class = AutoModelForImageTextToText if self.vision else AutoModelForCausalLM
        self.model: "_BaseModelWithGenerate | None" = model_class.from_pretrained(
            self.path, dtype=self.dtype, attn_implementation=self.attention, trust_remote_code=trust,
            use_safetensors=model_options["use_safetensors"],
            device_map=model_options["device_map"] if cuda else None)
        self.model.eval()
        self.compiled = optimization["compile"]
        if self.compiled:  # compiles on the first requests of each new shape; dynamic=True keeps that rare
            self.model.forward = torch.compile(self.model.forward, dynamic=True)
        self.layers = [] if self.compiled else decoder_layers(self.model)  # a hook would break the graph
        self._grammar_tokenizer: llguidance.LLTokenizer | None = None
        self.device = str(self.model.device)
        self.params = self.model.num_parameters()  # the vision tower's too: it is in memory like the rest
        free = resources.free_memory_bytes()
        self.max_context = resources.estimate_max_context(self.config, free, self.dtype.itemsize, max_context_cap,
                                                          self.params)
        # All the KV cache memory allows, for requests together (a batch); None: no limit
        self.kv_token_budget = resources.kv_tokens_that_fit(self.config, free, self.dtype.itemsize, self.params)
        log.info("loaded %s in %.1f s: %.1fM parameters, device %s, dtype %s, attention %s, compile %s, "
                 "max context %d", self.name, time.monotonic() - started, self.params / 1e6, self.device,
                 self.dtype_name, self.attention, self.compiled, self.max_context)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def capabilities(self) -> dict:
        """The welcome's capabilities: the seed's four, the original's sdpa and training, and how the model
        runs (added)."""
        return {"vision": self.vision, "flash_attention": self.attention == "flash_attention_2",
                "compute_capability": self.compute_capability, "max_context": self.max_context,
                "dtype": self.dtype_name, "attention": self.attention, "compile": self.compiled,
                "device": self.device, "sdpa": self.attention == "sdpa", "training": not self.vision}

    @classmethod
    def for_config(cls, model_dir: Path, config: Config) -> "Engine":
        return cls(model_dir, config.model, config.optimization, config.limits["max_context_length"])

    @property
    def chat_template(self) -> str | None:
        template = self.tokenizer.chat_template
        return template if isinstance(template, str) else None

    def encode(self, messages: list[dict], tools: list[dict] | None = None) -> Prompt:
        """A conversation through the model's chat template (when it has one); a turn's "images" are PIL
        images, which only a vision model's processor takes."""
        if self.vision:
            return self._encode_with_images(messages)
        return Prompt(self.chat_ids(messages, tools=tools))

    def encode_text(self, text: str) -> Prompt:
        return Prompt(self.tokenizer(text)["input_ids"])

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = True,
                 tools: list[dict] | None = None) -> list[int]:
        """A text-only conversation through the chat template (a plain "role: text" layout without one)."""
        if self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, tools=tools or None,
                                                      add_generation_prompt=add_generation_prompt)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + ("assistant:" * add_generation_prompt)
        return self.tokenizer(text)["input_ids"]

    def _encode_with_images(self, messages: list[dict]) -> Prompt:
        """Vision chat templates take a list of parts per turn: the turn's images, then its text."""
        images = [image for message in messages for image in message.get("images", ())]
        turns = [{"role": m["role"], "content": [{"type": "image"} for _ in m.get("images", ())]
                  + [{"type": "text", "text": m["content"]}]} for m in messages]
        text = self.processor.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        inputs = self.processor(text=[text], images=[images] if images else None, add_special_tokens=False,
                                return_tensors="pt")
        extra = {key: value for key, value in inputs.items() if key not in ("input_ids", "attention_mask")}
        return Prompt(inputs["input_ids"][0].tolist(), len(images), extra)

    def picker(self, settings: GenerationSettings) -> Picker:
        """The token picker of a request whose settings are not plain (picking.py)."""
        return Picker(settings, self.grammar_tokenizer, self.token_text, self.eos_ids)

    def grammar_tokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's view of the tokenizer, made on the first constrained request (0.4 s)."""
        if self._grammar_tokenizer is None:
            self._grammar_tokenizer = llguidance.hf.from_tokenizer(self.tokenizer)
        return self._grammar_tokenizer

    # one cache for the engine's life (it holds the engine: flake8-bugbear's B019 would say so)
    @functools.lru_cache(maxsize=65536)
    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    @property
    def eos_ids(self) -> set[int]:
        assert self.model is not None
        eos = self.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        return ids | ({self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set())

    def generate(self, prompt: Prompt, settings: GenerationSettings, max_new_tokens: int,
                 on_text: Callable[[str, tuple[TokenLogprob, ...]], None], should_stop: Callable[[], str | None],
                 stream: TextStream | None = None, picker: Picker | None = None) -> tuple[int, str]:
        """Stream text pieces to `on_text` on this thread; return (tokens generated, finish reason).
        `stream` (engines.text.TextStream) may be given to keep the tokens, for a batch to go on from; a
        request whose settings are not plain picks its tokens with its `picker` (made here if not given)."""
        stream = stream or TextStream(self.tokenizer)
        arguments = sampling_arguments(settings)
        if not settings.plain:
            picker = picker or self.picker(settings)
            arguments = {**sampling_arguments(replace(settings, do_sample=False)),
                         "logits_processor": LogitsProcessorList([PickerProcessor(picker)])}
            should_stop = _until_done(picker, should_stop)
        reading = _StopWhen(should_stop)
        if FAULT_OOM_MARKER and FAULT_OOM_MARKER in self.tokenizer.decode(prompt.ids):
            should_stop = _injected_oom
        stopper = _StopWhen(should_stop)
        assert self.model is not None  # None only after unload(), and nothing generates after that
        inputs = torch.tensor([prompt.ids], device=self.model.device)
        with torch.inference_mode(), self._stoppable_read(reading, stream):
            self.model.generate(input_ids=inputs, **self._on_device(prompt.extra),
                                attention_mask=torch.ones_like(inputs), max_new_tokens=max_new_tokens,
                                streamer=Streamer(stream, on_text, picker.take_logprobs if picker else tuple),
                                stopping_criteria=StoppingCriteriaList([stopper]),
                                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
                                **arguments)
        generated = len(stream.ids) - stream.earlier
        return generated, stopper.reason or reading.reason or ("length" if generated >= max_new_tokens else "stop")

    @contextlib.contextmanager
    def _stoppable_read(self, reading: _StopWhen, stream: TextStream) -> Iterator[None]:
        """While generate() reads the prompt (its first step, and its longest: 0.1 s for a short chat
        prompt on a CPU, seconds for a long one), each decoder layer first asks `reading`, so a stop (a
        cancel, a batch taking over) ends the read within a layer, not after it. On this thread only:
        a batch's thread runs the same model."""
        thread, before = threading.get_ident(), len(stream.ids)

        def ask(module: torch.nn.Module, args: tuple) -> None:
            if len(stream.ids) == before and threading.get_ident() == thread and reading.stops():
                raise _StoppedReading
        hooks = [layer.register_forward_pre_hook(ask) for layer in self.layers]
        try:
            yield
        except _StoppedReading:
            pass
        finally:
            for hook in hooks:
                hook.remove()

    def _on_device(self, tensors: dict) -> dict:
        """The processor's tensors on the model's device, pixel values in the model's dtype."""
        assert self.model is not None
        return {key: value.to(self.model.device, dtype=self.dtype if value.is_floating_point() else None)
                for key, value in tensors.items()}

    @property
    def device_kind(self) -> str:
        """What the per-device choices (BATCH_SIZE, batching.STEP_TOKENS and threads) go by."""
        return "cuda" if self.device.startswith("cuda") else "cpu"

    def embed(self, inputs: list[str] | list[list[int]]) -> tuple[list[list[float]], int]:
        assert self.model is not None
        return embedding.embed(self.model, self.tokenizer, embedding.pooling_of(self.path), inputs, self.max_context)

    def batchable(self, images: int) -> bool:
        """Every text request shares the batch, whatever its settings (sampling.py); continuous
        batching takes token ids only, so a request with images runs alone. Incremental decoding needs a
        fast (tokenizers) tokenizer."""
        return not images and self.tokenizer.is_fast

    def batch_size(self) -> int:
        """The requests a batch takes at once when config.json does not say: what the device gains from
        (BATCH_SIZE), as far as free memory holds SLOT_TOKENS of KV cache for each."""
        most = BATCH_SIZE[self.device_kind]
        if self.kv_token_budget is None:
            return most
        return max(1, min(most, self.kv_token_budget // SLOT_TOKENS))

    def open_batch(self, slots: int) -> TransformersBatch:
        return TransformersBatch(self, slots)

    def trainer(self, examples: list, settings: Any) -> LoRATrainer:  # core.training.TrainSettings
        return LoRATrainer(self, examples, settings)

    def save(self, folder: Path) -> None:
        save_model(self, folder)

    @staticmethod
    def is_out_of_memory(exc: BaseException | None) -> bool:
        return isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError))

    def free_memory(self) -> None:
        gc.unfreeze()  # the batch froze what lived with the model: it may be garbage now
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def unload(self) -> None:
        self.model = None
        self.free_memory()

    def lower_max_context(self, failed_at: int) -> None:
        """After running out of memory at `failed_at` tokens, keep well below that for the rest of the run."""
        self.max_context = max(1, min(self.max_context, failed_at * 3 // 4))
        if self.kv_token_budget is not None:
            self.kv_token_budget = min(self.kv_token_budget, failed_at * 3 // 4)
        log.warning("out of memory at %d tokens: max context lowered to %d", failed_at, self.max_context)


def use_grouped_query_sdpa() -> None:
    """On a CPU, let SDPA share key/value heads itself (enable_gqa) even with an attention mask, instead of
    transformers copying them per query head first. Continuous batching always passes a mask; the same
    text comes out, faster (docs/benchmarks.md, "The figures behind the engines' rules"). On CUDA a mask with
    GQA would fall back to the slow math kernel, so this is for CPUs only."""
    os.environ.setdefault("TRANSFORMERS_SDPA_FORCE_GQA", "1")


def avoid_cudnn_attention() -> None:
    """On CUDA, SDPA runs the flash or memory-efficient kernels, never cuDNN's: cuDNN builds a plan for each
    new shape, and the keys grow by one at every generated token, so each step of a new length would pay
    for a plan (docs/benchmarks.md, "The figures behind the engines' rules")."""
    torch.backends.cuda.enable_cudnn_sdp(False)


def _until_done(picker: Picker, should_stop: Callable[[], str | None]) -> Callable[[], str | None]:
    """should_stop, and "stop" once the request's schema is complete (a model may have no end token)."""
    def check() -> str | None:
        return "stop" if picker.done else should_stop()
    return check


def _injected_oom() -> str | None:
    raise torch.cuda.OutOfMemoryError("injected by LLMWS_FAULT_OOM")


def sampling_arguments(settings: GenerationSettings) -> dict:
    """generate() arguments for GenerationSettings: every one, so that none comes from the model's
    generation_config.json instead (the session's settings already took it in)."""
    arguments: dict = {}
    if settings.sampled:
        arguments.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p,
                         top_k=settings.top_k)
    else:
        arguments.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    arguments["repetition_penalty"] = settings.repetition_penalty  # 1.0: none
    return arguments


def convert_gguf(gguf: Path, out: Path, name: str,
                 step: Callable[[str], contextlib.AbstractContextManager] = lambda label: contextlib.nullcontext()
                 ) -> None:
    """A GGUF model as a transformers folder of float32 safetensors. A GGUF-loaded model refuses
    save_pretrained, so it is rebuilt from a clean config with the weights copied in. `step(label)` is a
    context manager around each of the four steps (to show progress)."""
    with step("reading the tokenizer from the GGUF (1/4)"):
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with step("reading and de-quantising the weights (2/4)"):
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    with step("building the float32 model (3/4)"):
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.name_or_path = name
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(loaded.state_dict())
        fresh.generation_config = loaded.generation_config
    with step("writing safetensors (4/4)"):
        fresh.save_pretrained(out)
        tokenizer.save_pretrained(out)
