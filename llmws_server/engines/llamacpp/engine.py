"""The llama.cpp engine (engines.api.Engine) for GGUF models, through llama-cpp-python: the prompt through
the GGUF's own chat template, streamed generation of one request (batches: batch.py), the context sized
from free memory. It knows nothing about sessions, queues, sockets or HTTP. With batch.py, the only module
that names llama_cpp."""
import codecs
import gc
import logging
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, cast

import psutil
from llama_cpp import Llama, llama_vocab_is_eog
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from llmws_server.core import resources
from llmws_server.engines.api import Prompt
from llmws_server.errors import Refused

if TYPE_CHECKING:
    from llama_cpp.llama_types import ChatCompletionRequestMessage

log = logging.getLogger("llmws.engine")
KV_BYTES = 2  # llama.cpp keeps its KV cache in float16
# Requests decoded together under max_batch_size "auto". On 2 CPU cores (bench/llamacpp_batch.py, Q4_1):
# 1.47x one request's tokens/s at 4 sequences, 1.87x at 8.
BATCH_SIZE = 8
# general.file_type in a GGUF header -> its name (llama.cpp's LLAMA_FTYPE_*)
FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
              12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
              32: "BF16"}


def gguf_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.glob("*.gguf") if path.is_file())


class LlamaCppEngine:  # engines.api.Engine
    vision = False
    device = "cpu"
    llama: "Llama | None"  # the model, None once unloaded

    def __init__(self, model_dir: Path, gguf_file: str | None, max_context_cap: int):
        self.path = Path(model_dir)
        self.name = self.path.name
        files = [self.path / gguf_file] if gguf_file else gguf_files(self.path)
        if len(files) != 1 or not files[0].is_file():
            raise Refused(f"{self.name}: name one of its GGUF files in model.gguf_file "
                             f"({', '.join(path.name for path in gguf_files(self.path)) or 'none found'})")
        self.file = files[0]
        started = time.monotonic()
        probe = Llama(str(self.file), vocab_only=True, verbose=False)  # the header alone: sizes for n_ctx
        self.metadata = dict(probe.metadata)
        probe.close()
        self.max_context = self._context_that_fits(max_context_cap)
        # physical cores
        threads = self.threads = int(os.environ.get("OMP_NUM_THREADS", 0)) or psutil.cpu_count(logical=False) or 1
        self.llama = Llama(str(self.file), n_ctx=self.max_context, n_threads=threads, n_threads_batch=threads,
                           verbose=False)
        self.params = self.llama._model.n_params()
        self.dtype_name = FILE_TYPES.get(int(self.metadata.get("general.file_type", -1)), "unknown")
        self.eos = self.llama.token_eos()
        template = self.metadata.get("tokenizer.chat_template")
        self.formatter = Jinja2ChatFormatter(template, self._token_text(self.eos), self._token_text(
            self.llama.token_bos())) if template else None
        log.info("loaded %s (%s, %s) in %.1f s on llama.cpp: %.1fM parameters, max context %d", self.name,
                 self.file.name, self.dtype_name, time.monotonic() - started, self.params / 1e6, self.max_context)

    def _token_text(self, token: int) -> str:
        assert self.llama is not None
        return self.llama.detokenize([token], special=True).decode("utf-8", errors="replace") if token >= 0 else ""

    def _context_that_fits(self, cap: int) -> int:
        """n_ctx: the KV cache for it must fit in free memory, like the transformers engine's max context."""
        architecture = self.metadata.get("general.architecture", "llama")

        def number(key):
            value = self.metadata.get(f"{architecture}.{key}")
            return int(value) if value is not None else None
        shape = self.shape = SimpleNamespace(
            num_hidden_layers=number("block_count"), num_attention_heads=number("attention.head_count"),
            hidden_size=number("embedding_length"), num_key_value_heads=number("attention.head_count_kv"),
            max_position_embeddings=number("context_length"))
        return resources.estimate_max_context(shape, resources.free_memory_bytes(), KV_BYTES, cap,
                                              self.file.stat().st_size)

    @classmethod
    def for_config(cls, model_dir: Path, config) -> "LlamaCppEngine":
        return cls(model_dir, config.model["gguf_file"], config.limits["max_context_length"])

    def capabilities(self) -> dict:
        return {"vision": False, "flash_attention": False, "compute_capability": None, "max_context": self.max_context,
                "dtype": self.dtype_name, "attention": "llama.cpp", "compile": False, "device": "cpu", "sdpa": False,
                "training": False, "engine": "llama.cpp", "gguf_file": self.file.name, "quantization": self.dtype_name}

    def encode(self, messages: list[dict]) -> Prompt:
        if any(message.get("images") for message in messages):
            raise Refused(f"This model does not take images: {self.name}")
        if self.formatter is None:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
            return self.encode_text(text)
        chat = cast("list[ChatCompletionRequestMessage]", messages)  # {role, content} dicts, as it takes them
        prompt = self.formatter(messages=chat).prompt
        assert self.llama is not None
        return Prompt(self.llama.tokenize(prompt.encode("utf-8"), add_bos=False, special=True))

    def encode_text(self, text: str) -> Prompt:
        assert self.llama is not None
        return Prompt(self.llama.tokenize(text.encode("utf-8"), add_bos=True, special=False))

    def generate(self, prompt: Prompt, settings, max_new_tokens: int, on_text, should_stop):
        """Token by token; text goes out in whole characters (a character split over tokens waits)."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        sampling = {"temp": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k} \
            if settings.sampled else {"temp": 0.0, "top_p": 1.0, "top_k": 1}
        generated, reason = 0, "length"
        assert self.llama is not None
        for token in self.llama.generate(prompt.ids, min_p=0.0, repeat_penalty=settings.repetition_penalty,
                                         reset=True, **sampling):
            if llama_vocab_is_eog(self.llama._model.vocab, token):  # end of sequence, or of the turn
                reason = "stop"
                break
            generated += 1
            text = decoder.decode(self.llama.detokenize([token]))
            if text:
                on_text(text)
            stop = should_stop()
            if stop or generated >= max_new_tokens:
                reason = stop or "length"
                break
        rest = decoder.decode(b"", final=True)
        if rest:
            on_text(rest)
        return generated, reason

    def batchable(self, images: int) -> bool:
        return True  # a request with images is refused when it is encoded

    def batch_size(self) -> int:
        return BATCH_SIZE

    def open_batch(self, slots: int):
        """A context of its own with a full context for each request: as many as free memory holds, at
        least one (more requests than that wait inside the batch for a sequence)."""
        from llmws_server.engines.llamacpp.batch import LlamaCppBatch

        fit = resources.kv_tokens_that_fit(self.shape, resources.free_memory_bytes(), KV_BYTES, self.params)
        return LlamaCppBatch(self, max(1, min(slots, fit // self.max_context)) if fit else slots)

    def trainer(self, examples: list, settings):
        raise Refused("training needs the transformers engine: switch to a safetensors model first")

    def save(self, folder: Path) -> None:
        raise Refused("snapshots need the transformers engine (a GGUF model is already a file: copy it)")

    @staticmethod
    def is_out_of_memory(exc: BaseException) -> bool:
        return isinstance(exc, MemoryError)

    def free_memory(self) -> None:
        gc.collect()

    def lower_max_context(self, failed_at: int) -> None:
        self.max_context = max(1, min(self.max_context, failed_at * 3 // 4))

    def unload(self) -> None:
        assert self.llama is not None  # not unloaded before
        self.llama.close()
        self.llama = None
        gc.collect()
