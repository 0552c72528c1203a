"""The transformers engine's training: LoRA adapters (peft) on the loaded model, one optimizer step at a
time, and trained models saved merged into a folder of their own. The served model's weights never
change: the adapters come out again when training ends, however it ends."""
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from llmws_server.engines.api import TrainingSettings
from llmws_server.errors import Refused

if TYPE_CHECKING:
    from llmws_server.engines.transformers.engine import Engine  # which imports this module

LORA = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def token_sequences(engine: "Engine", examples: list, max_length: int) -> list[list[int]]:
    """Each (line, example) as the token ids the model learns: a chat through the chat template, a text as
    it is followed by the end token. errors.Refused names a line that does not fit max_seq_length."""
    tokenizer, sequences = engine.tokenizer, []
    for line, example in examples:
        if isinstance(example, str):
            end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
            ids = tokenizer(example)["input_ids"] + end
        else:
            ids = engine.chat_ids(example, add_generation_prompt=False)
        if len(ids) > max_length:
            raise Refused(f"dataset line {line}: {len(ids)} tokens, more than max_seq_length {max_length}")
        sequences.append(ids)
    return sequences


class LoRATrainer:
    """Used as `with engine.trainer(examples, settings) as trainer:` by the worker thread."""

    order: list[int]
    optimizer: torch.optim.AdamW | None  # set while training (__enter__ to __exit__), as is the model

    def __init__(self, engine: "Engine", examples: list, settings: TrainingSettings):
        if engine.vision:
            raise Refused("training takes text-only models for now")
        self.engine, self.settings = engine, settings
        self.sequences = token_sequences(engine, examples, settings.max_seq_length)
        self.pad = engine.tokenizer.pad_token_id if engine.tokenizer.pad_token_id is not None else 0
        self.order, self.steps, self.pending = [], 0, 0
        self.generator = torch.Generator().manual_seed(0)
        self.model: PeftModel | None = None

    def __enter__(self) -> "LoRATrainer":
        assert self.engine.model is not None  # a loaded model
        self.model = get_peft_model(self.engine.model, LORA)
        self.model.config.use_cache = False
        self.model.train()
        trainable = [parameter for parameter in self.model.parameters() if parameter.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=self.settings.learning_rate)
        return self

    def __exit__(self, *exc_info: object) -> None:
        """The adapters come out; the served model is as it was."""
        assert self.model is not None
        self.model.eval()
        self.engine.model = self.model.unload()
        self.engine.model.config.use_cache = True
        self.model = self.optimizer = None
        self.engine.free_memory()

    def step(self) -> tuple[float, int]:
        """One batch forward and back (an optimizer step every gradient_accumulation batches): (loss, tokens)."""
        batch = [self.sequences[index] for index in self._next_batch()]
        longest = max(map(len, batch))
        assert self.model is not None
        ids = torch.tensor([seq + [self.pad] * (longest - len(seq)) for seq in batch], device=self.model.device)
        mask = torch.tensor([[1] * len(seq) + [0] * (longest - len(seq)) for seq in batch], device=self.model.device)
        labels = ids.masked_fill(mask == 0, -100)
        with torch.enable_grad():
            loss = self.model(input_ids=ids, attention_mask=mask, labels=labels).loss
            (loss / self.settings.gradient_accumulation).backward()
        self.steps, self.pending = self.steps + 1, self.pending + 1
        if self.pending == self.settings.gradient_accumulation:
            self._apply()
        return float(loss.item()), int(mask.sum())

    def _next_batch(self) -> list[int]:
        if len(self.order) < self.settings.batch_size:  # a new pass over the data, shuffled
            self.order += torch.randperm(len(self.sequences), generator=self.generator).tolist()
        batch, self.order = self.order[:self.settings.batch_size], self.order[self.settings.batch_size:]
        return batch

    def _apply(self) -> None:
        if self.pending:
            assert self.optimizer is not None
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.pending = 0

    def save(self, folder: Path) -> None:
        """The model as trained so far, merged, as a model folder: a fresh copy of the base from disk takes
        the adapters, so the served model is not touched."""
        self._apply()
        with tempfile.TemporaryDirectory(prefix=".adapter-", dir=folder.parent) as adapter:
            assert self.model is not None
            self.model.save_pretrained(adapter)
            base = AutoModelForCausalLM.from_pretrained(self.engine.path, dtype=self.engine.dtype,
                                                        trust_remote_code=self.engine.trust_remote_code)
            merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
            merged.save_pretrained(folder)
            self.engine.tokenizer.save_pretrained(folder)
            del base, merged


def save_model(engine: "Engine", folder: Path) -> None:
    """The served model as it is, as a model folder."""
    assert engine.model is not None  # a loaded model
    engine.model.save_pretrained(folder)
    (engine.processor or engine.tokenizer).save_pretrained(folder)

