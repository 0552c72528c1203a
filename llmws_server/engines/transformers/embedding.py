"""Embeddings from the loaded transformers model: its last hidden states pooled as its folder says
(sentence-transformers' modules.json and Pooling config: mean, cls or last token, and whether the vectors
are normalised), else the normalised mean, as llama.cpp and Ollama give for a causal LM.

Inputs go through the model in groups of similar length (less padding), at most FORWARD_TOKENS padded
tokens a forward pass; they are padded on the right, so under a causal mask an input's vector is the
same alone and in a group."""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from llmws_server.errors import Refused

FORWARD_TOKENS = 8192  # padded tokens in one forward pass at most
POOLING_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_lasttoken": "last", "pooling_mode_mean_tokens": "mean"}


@dataclass(frozen=True)
class Pooling:
    mode: str  # "mean", "cls" (the first token) or "last" (the last token)
    normalize: bool


def pooling_of(folder: Path) -> Pooling:
    """The folder's sentence-transformers pooling, if it has one; else the normalised mean."""
    try:
        modules = json.loads((folder / "modules.json").read_text())
    except (OSError, ValueError):
        return Pooling("mean", True)
    kinds = {entry.get("type", "").rsplit(".", 1)[-1]: entry for entry in modules if isinstance(entry, dict)}
    mode = "mean"
    if "Pooling" in kinds:
        try:
            settings = json.loads((folder / kinds["Pooling"].get("path", "") / "config.json").read_text())
        except (OSError, ValueError):
            settings = {}
        mode = next((ours for key, ours in POOLING_MODES.items() if settings.get(key)), "mean")
    return Pooling(mode, "Normalize" in kinds)


def token_ids(tokenizer: PreTrainedTokenizerBase, inputs: list[str] | list[list[int]], max_context: int,
              vocabulary: int) -> list[list[int]]:
    """Each input's token ids; errors.Refused for one over the context or an id outside the vocabulary."""
    ids = [tokenizer(text)["input_ids"] if isinstance(text, str) else text for text in inputs]
    for index, one in enumerate(ids):
        if len(one) > max_context:
            raise Refused(f"input[{index}] has {len(one)} tokens; the model takes at most {max_context}",
                          "input", tokens=len(one), max_context=max_context)
        if any(token >= vocabulary for token in one):
            raise Refused(f"input[{index}] holds a token id outside the vocabulary (0 to {vocabulary - 1})", "input")
    return ids


def groups(ids: list[list[int]]) -> list[list[int]]:
    """Input indexes by length, cut so that no group pads past FORWARD_TOKENS."""
    found: list[list[int]] = []
    for index in sorted(range(len(ids)), key=lambda i: len(ids[i])):
        group = found[-1] if found else None
        if group is None or len(ids[index]) * (len(group) + 1) > FORWARD_TOKENS:
            found.append([index])
        else:
            group.append(index)
    return found


def pooled(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """One vector per row of last hidden states, over the tokens the mask keeps (padded on the right)."""
    if pooling.mode == "cls":
        vectors = hidden[:, 0]
    elif pooling.mode == "last":
        vectors = hidden[torch.arange(hidden.shape[0]), mask.sum(dim=1) - 1]
    else:
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        vectors = (hidden * weights).sum(dim=1) / weights.sum(dim=1)
    return torch.nn.functional.normalize(vectors, dim=-1) if pooling.normalize else vectors


def embed(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pooling: Pooling,
          inputs: list[str] | list[list[int]], max_context: int) -> tuple[list[list[float]], int]:
    """(a vector per input, in order; the inputs' tokens)."""
    # the input embeddings are an nn.Embedding (or a subclass); transformers types them nn.Module
    vocabulary = cast(torch.nn.Embedding, model.get_input_embeddings()).num_embeddings
    ids = token_ids(tokenizer, inputs, max_context, vocabulary)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    vectors: list[list[float]] = [[] for _ in ids]
    for group in groups(ids):
        width = max(len(ids[index]) for index in group)
        rows = torch.tensor([ids[index] + [pad] * (width - len(ids[index])) for index in group], device=model.device)
        mask = torch.tensor([[1] * len(ids[index]) + [0] * (width - len(ids[index])) for index in group],
                            device=model.device)
        with torch.inference_mode():
            output = model(input_ids=rows, attention_mask=mask, output_hidden_states=True, use_cache=False,
                           logits_to_keep=1)
        for index, vector in zip(group, pooled(output.hidden_states[-1].float(), mask, pooling).tolist()):
            vectors[index] = vector
    return vectors, sum(map(len, ids))
