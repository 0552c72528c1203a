"""Token ids to text as they come, for generate() and the batch of the transformers engine:
incremental decoding (tokenizers' DecodeStream), so a token costs the same however long the answer is,
and a character split over tokens waits for its rest."""
from collections.abc import Callable
from typing import cast

import torch
from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerBase
from transformers.generation.streamers import BaseStreamer

from llmws_server.engines.api import TokenLogprob


class TextStream:
    """One answer's tokens in, its new text out."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self.decoder = DecodeStream(skip_special_tokens=True) if tokenizer.is_fast else None
        self.ids: list[int] = []  # every token of the answer so far
        self.shown = ""  # a slow tokenizer's text so far (it has no incremental decoding)
        self.earlier = 0  # tokens generated before the batch's list for this answer begins

    def add(self, new_ids: list[int]) -> str:
        """The text the new tokens complete."""
        self.ids.extend(new_ids)
        if self.decoder is not None:
            backend = self.tokenizer.backend_tokenizer
            return "".join(self.decoder.step(backend, token) or "" for token in new_ids)
        # one flat list of ids decodes to one str (transformers types decode str | list[str], for batches)
        text = cast(str, self.tokenizer.decode(self.ids, skip_special_tokens=True))
        if text.endswith("\ufffd"):  # half a character
            return ""
        new, self.shown = text[len(self.shown):], text
        return new

    def follow(self, generated: list[int]) -> str:
        """The text of the tokens in the batch's list for this answer (which begins after `earlier`
        tokens) not seen before."""
        return self.add(generated[len(self.ids) - self.earlier:])

    def go_on_in_a_batch(self) -> None:
        """The tokens so far become the prompt's end; the batch's list for this answer starts empty."""
        self.earlier = len(self.ids)


class Streamer(BaseStreamer):
    """generate()'s streamer: each token's new text goes to `on_text` on generate()'s own thread (a
    streamer read by a second thread slows generate() itself)."""

    def __init__(self, stream: TextStream, on_text: Callable[[str, tuple[TokenLogprob, ...]], None],
                 take_logprobs: Callable[[], tuple[TokenLogprob, ...]] = tuple):
        self.stream, self.on_text = stream, on_text
        self.take_logprobs = take_logprobs  # the log probabilities of the tokens since the last text
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() hands over the prompt first
            self.prompt_seen = True
            return
        text = self.stream.add(value.reshape(-1).tolist())
        if text:
            self.on_text(text, self.take_logprobs())

    def end(self) -> None:
        logprobs = self.take_logprobs()  # of tokens whose text has not come (a character's first bytes)
        if logprobs:
            self.on_text("", logprobs)
