"""The llama.cpp engine (engines.api.Engine) for GGUF models, through llama-cpp-python: the prompt through
the GGUF's own chat template (with tools where it renders them), streamed generation of one request
(batches: batch.py), the context sized from free memory. It knows nothing about sessions, queues, sockets
or HTTP. With batch.py, the only module that names llama_cpp.

A plain request alone is llama-cpp-python's own generate(); one with a setting it does not take (a seed of
its own, OpenAI's penalties, logprobs, a JSON schema) chooses its tokens with batch.py's Decoding, as it
would in a batch, so its text alone is its text there."""
import codecs
import gc
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, NoReturn, cast

import llama_cpp
import psutil
from llama_cpp import Llama, llama_vocab_is_eog
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from llmws_server import resources
from llmws_server.config import Config, GenerationSettings
from llmws_server.engines.api import Prompt, TokenLogprob, TrainingSettings
from llmws_server.engines.llamacpp.batch import Decoding, LlamaCppBatch, shared_start
from llmws_server.errors import Refused

if TYPE_CHECKING:
    from llama_cpp.llama_types import ChatCompletionRequestMessage, ChatCompletionTool
    from llguidance import LLMatcher, LLTokenizer

log = logging.getLogger("llmws.engine")
KV_BYTES = 2  # llama.cpp keeps its KV cache in float16
# Requests decoded together under max_batch_size "auto": on a CPU, 8 sequences decode nearly twice one's
# tokens/s (docs/benchmarks.md, "The figures behind the engines' rules").
BATCH_SIZE = 8
# general.file_type in a GGUF header -> its name (llama.cpp's LLAMA_FTYPE_*)
FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
              12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
              32: "BF16"}


@contextmanager
def without_amx_buffers() -> Iterator[None]:
    """Models loaded meanwhile keep their weights in plain CPU buffers where llama.cpp would put them in its
    AMX buffers: decoding more than one token from those crashes the process (llama-cpp-python 0.3.36 on a
    Xeon with AMX). Llama() takes no setting for it, so its default model parameters are swapped here."""
    if b"AMX_INT8 = 1" not in llama_cpp.llama_print_system_info():
        yield
        return
    default = llama_cpp.llama_cpp.llama_model_default_params

    def without_extra_buffers() -> llama_cpp.llama_model_params:
        params = default()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_cpp.llama_model_default_params = without_extra_buffers
    try:
        yield
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = default


def gguf_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.glob("*.gguf") if path.is_file())


class LlamaCppEngine:  # engines.api.Engine
    vision = False
    device = "cpu"
    llama: "Llama | None"  # the model, None once unloaded
    chat_template: str | None  # the GGUF's (tokenizer.chat_template), None where it has none

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
        with without_amx_buffers():
            self.llama = Llama(str(self.file), n_ctx=self.max_context, n_threads=threads, n_threads_batch=threads,
                               verbose=False)
        self.params = self.llama._model.n_params()
        self.dtype_name = FILE_TYPES.get(int(self.metadata.get("general.file_type", -1)), "unknown")
        self.eos = self.llama.token_eos()
        template = self.chat_template = self.metadata.get("tokenizer.chat_template")
        self.formatter = Jinja2ChatFormatter(template, self._token_text(self.eos), self._token_text(
            self.llama.token_bos())) if template else None
        self.renders_tools = "tools" in (template or "")
        self.pieces: dict[int, str] = {}  # token id -> its text, for logprobs
        # llguidance's view of the vocabulary, made at the first json_schema
        self.guidance_tokenizer: "LLTokenizer | None" = None
        self.embedder: Llama | None = None  # the same file in llama.cpp's embedding mode, made at the first embed
        log.info("loaded %s (%s, %s) in %.1f s on llama.cpp: %.1fM parameters, max context %d", self.name,
                 self.file.name, self.dtype_name, time.monotonic() - started, self.params / 1e6, self.max_context)

    def _token_text(self, token: int) -> str:
        assert self.llama is not None
        return self.llama.detokenize([token], special=True).decode("utf-8", errors="replace") if token >= 0 else ""

    def _context_that_fits(self, cap: int) -> int:
        """n_ctx: the KV cache for it must fit in free memory, like the transformers engine's max context."""
        architecture = self.shape_name = self.metadata.get("general.architecture", "llama")

        def number(key: str) -> int | None:
            value = self.metadata.get(f"{architecture}.{key}")
            return int(value) if value is not None else None
        shape = self.shape = SimpleNamespace(
            num_hidden_layers=number("block_count"), num_attention_heads=number("attention.head_count"),
            hidden_size=number("embedding_length"), num_key_value_heads=number("attention.head_count_kv"),
            max_position_embeddings=number("context_length"))
        return resources.estimate_max_context(shape, resources.free_memory_bytes(), KV_BYTES, cap,
                                              self.file.stat().st_size)

    def piece(self, token: int) -> str:
        """A token's text alone (a character split over tokens shows as U+FFFD)."""
        if token not in self.pieces:
            assert self.llama is not None
            self.pieces[token] = self.llama.detokenize([token]).decode("utf-8", errors="replace")
        return self.pieces[token]

    def json_matcher(self, schema: dict) -> "LLMatcher":
        """llguidance's matcher of the JSON that `schema` describes (llmws_server.grammar's, the grammar the
        core checked), fresh for one request; errors.Refused for a schema no JSON can match. Only the worker
        thread calls it."""
        try:
            import llguidance
            import llguidance.llamacpp

            from llmws_server.grammar import grammar
        except ImportError:
            raise Refused("json_schema needs the llguidance package on the llama.cpp engine (pip install llguidance)")
        if self.guidance_tokenizer is None:  # about a second: once per model
            assert self.llama is not None
            with warnings.catch_warnings():  # it calls a deprecated binding once per token
                warnings.simplefilter("ignore", DeprecationWarning)
                self.guidance_tokenizer = llguidance.llamacpp.lltokenizer_from_vocab(self.llama._model.vocab,
                                                                                     n_vocab=self.llama.n_vocab())
        try:
            matcher = llguidance.LLMatcher(self.guidance_tokenizer, grammar(schema), log_level=0)
        except (ValueError, RuntimeError) as exc:
            raise Refused(f"json_schema cannot be used for constrained decoding: {exc}") from exc
        if matcher.is_error():
            raise Refused(f"json_schema cannot be used for constrained decoding: {matcher.get_error()}")
        return matcher

    @classmethod
    def for_config(cls, model_dir: Path, config: Config) -> "LlamaCppEngine":
        return cls(model_dir, config.model["gguf_file"], config.limits["max_context_length"])

    def capabilities(self) -> dict:
        return {"vision": False, "flash_attention": False, "compute_capability": None, "max_context": self.max_context,
                "dtype": self.dtype_name, "attention": "llama.cpp", "compile": False, "device": "cpu", "sdpa": False,
                "training": False, "engine": "llama.cpp", "gguf_file": self.file.name, "quantization": self.dtype_name}

    def encode(self, messages: list[dict], tools: list[dict] | None = None) -> Prompt:
        """Through the GGUF's chat template: the turns as they are (an assistant's "tool_calls", a tool's
        "tool_call_id" included), and the tools when the template renders them (else the core has put them
        in the turns)."""
        if any(message.get("images") for message in messages):
            raise Refused(f"This model does not take images: {self.name}")
        if self.formatter is None:
            text = "".join(f"{m['role']}: {m.get('content') or ''}\n" for m in messages) + "assistant:"
            return self.encode_text(text)
        chat = cast("list[ChatCompletionRequestMessage]", messages)  # {role, content, ...} dicts, as it takes them
        offered = cast("list[ChatCompletionTool] | None", tools if self.renders_tools else None)
        prompt = self.formatter(messages=chat, tools=offered).prompt
        assert self.llama is not None
        return Prompt(self.llama.tokenize(prompt.encode("utf-8"), add_bos=False, special=True))

    def encode_text(self, text: str) -> Prompt:
        assert self.llama is not None
        return Prompt(self.llama.tokenize(text.encode("utf-8"), add_bos=True, special=False))

    def generate(self, prompt: Prompt, settings: GenerationSettings, max_new_tokens: int,
                 on_text: Callable[[str, tuple[TokenLogprob, ...]], None],
                 should_stop: Callable[[], str | None]) -> tuple[int, str]:
        """Token by token; text goes out in whole characters (a character split over tokens waits)."""
        if not settings.plain:
            return self._generate_decoding(prompt, settings, max_new_tokens, on_text, should_stop)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        temp, top_p, top_k = (settings.temperature, settings.top_p, settings.top_k) if settings.sampled \
            else (0.0, 1.0, 1)
        generated, reason = 0, "length"
        assert self.llama is not None
        for token in self.llama.generate(prompt.ids, min_p=0.0, repeat_penalty=settings.repetition_penalty,
                                         reset=True, temp=temp, top_p=top_p, top_k=top_k):
            if llama_vocab_is_eog(self.llama._model.vocab, token):  # end of sequence, or of the turn
                reason = "stop"
                break
            generated += 1
            text = decoder.decode(self.llama.detokenize([token]))
            if text:
                on_text(text, ())
            stop = should_stop()
            if stop or generated >= max_new_tokens:
                reason = stop or "length"
                break
        rest = decoder.decode(b"", final=True)
        if rest:
            on_text(rest, ())
        return generated, reason

    def _generate_decoding(self, prompt: Prompt, settings: GenerationSettings, max_new_tokens: int,
                           on_text: Callable[[str, tuple[TokenLogprob, ...]], None],
                           should_stop: Callable[[], str | None]) -> tuple[int, str]:
        """generate() with batch.py's Decoding on this model's own context: the request's seed, penalties,
        logprobs (each piece of text with those of its tokens) and schema (it ends once the JSON is whole)."""
        assert self.llama is not None
        llama, decoding = self.llama, Decoding(self, settings, max_new_tokens)  # Refused for an impossible schema
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending: list[TokenLogprob] = []  # of the tokens whose text has not gone out yet
        generated, reason = 0, "length"
        try:
            self._decode_prompt(prompt.ids)
            while True:
                token, logprob = decoding.choose(llama.ctx, -1)
                if llama_vocab_is_eog(llama._model.vocab, token):
                    reason = "stop"
                    break
                generated += 1
                pending += [logprob] if logprob is not None else []
                text = decoder.decode(llama.detokenize([token]))
                if text:
                    on_text(text, tuple(pending))
                    pending.clear()
                stop = should_stop()
                if stop or generated >= max_new_tokens or decoding.grammar_complete:
                    reason = stop or ("length" if generated >= max_new_tokens else "stop")
                    break
                llama.eval([token])
        finally:
            decoding.free()
        rest = decoder.decode(b"", final=True)
        if rest or pending:
            on_text(rest, tuple(pending))
        return generated, reason

    def _decode_prompt(self, ids: list[int]) -> None:
        """The prompt into the context after the start of it the context holds already (as llama-cpp-python's
        generate() keeps it): at least its last token, whose logits give the first token."""
        assert self.llama is not None
        llama = self.llama
        kept = min(shared_start(llama._input_ids.tolist(), ids), len(ids) - 1)
        if kept and not llama._ctx.kv_cache_seq_rm(-1, kept, -1):
            kept = 0  # a memory that cannot drop its end (a recurrent model's): all of it again
        llama.n_tokens = kept  # eval() drops the cells from here on
        llama.eval(ids[kept:])

    def batchable(self, images: int) -> bool:
        return True  # a request with images is refused when it is encoded

    def batch_size(self) -> int:
        return BATCH_SIZE

    def open_batch(self, slots: int) -> LlamaCppBatch:
        """A context of its own with a full context for each request: as many as free memory holds, at
        least one (more requests than that wait inside the batch for a sequence)."""
        fit = resources.kv_tokens_that_fit(self.shape, resources.free_memory_bytes(), KV_BYTES, self.params)
        return LlamaCppBatch(self, max(1, min(slots, fit // self.max_context)) if fit else slots)

    def trainer(self, examples: list, settings: TrainingSettings) -> NoReturn:
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

    def embed(self, inputs: list[str] | list[list[int]]) -> tuple[list[list[float]], int]:
        """llama.cpp's own embeddings: the GGUF's pooling (mean where it names none), normalised. Token ids
        are read back as their text. A second context of the same mapped file: the weights are not copied."""
        if self.embedder is None:
            with without_amx_buffers():
                self.embedder = Llama(str(self.file), embedding=True, n_ctx=self.max_context,
                                      n_batch=self.max_context, n_ubatch=self.max_context, n_threads=self.threads,
                                      n_threads_batch=self.threads, verbose=False,
                                      pooling_type=int(self.metadata.get(f"{self.shape_name}.pooling_type",
                                                                         llama_cpp.LLAMA_POOLING_TYPE_MEAN)))
        embedder = self.embedder
        texts = [text if isinstance(text, str) else embedder.detokenize(text).decode("utf-8", errors="replace")
                 for text in inputs]
        for index, text in enumerate(texts):
            tokens = len(embedder.tokenize(text.encode("utf-8")))
            if tokens > self.max_context:
                raise Refused(f"input[{index}] has {tokens} tokens; the model takes at most {self.max_context}",
                              "input", tokens=tokens, max_context=self.max_context)
        vectors, tokens = embedder.embed(texts, normalize=True, truncate=False, return_count=True)
        return vectors, tokens

    def unload(self) -> None:
        assert self.llama is not None  # not unloaded before
        self.guidance_tokenizer = None  # it points into the model's vocabulary
        self.llama.close()
        self.llama = None
        if self.embedder is not None:
            self.embedder.close()
            self.embedder = None
        gc.collect()
