"""Training over the socket, the part without a model: a `train` message checked into a TrainRequest
(the dataset parsed line by line, every refusal naming its line or field), and the training status the
original LLMWS reports. The training itself is the engine's (engine_training.py)."""
import json
from dataclasses import dataclass

from llmws_server.catalog.folders import check_name
from llmws_server.config import is_number
from llmws_server.errors import Refused

# The original LLMWS's defaults, and the bounds a request must stay within.
DEFAULTS = {"max_steps": 50, "batch_size": 1, "learning_rate": 5e-5, "max_seq_length": 2048, "log_every": 5,
            "save_every": 0, "gradient_accumulation": 1}
BOUNDS = {"max_steps": (1, 100_000), "batch_size": (1, 256), "learning_rate": (1e-8, 1.0),
          "max_seq_length": (8, 131_072), "log_every": (1, 100_000), "save_every": (0, 100_000),
          "gradient_accumulation": (1, 1024)}
MAX_EXAMPLES = 100_000
ROLES = {"system", "user", "assistant"}


@dataclass(frozen=True)
class TrainSettings:
    max_steps: int
    batch_size: int
    learning_rate: float
    max_seq_length: int
    log_every: int
    save_every: int
    gradient_accumulation: int


@dataclass(frozen=True)
class TrainRequest:
    examples: list  # (line number, a list of chat turns or a plain text)
    settings: TrainSettings
    checkpoint_name: str
    save_checkpoint: bool
    request_id: str | None


@dataclass
class TrainStatus:
    """The original LLMWS's train_status."""
    running: bool = False
    request_id: str | None = None
    started_at: float | None = None
    steps_done: int = 0
    max_steps: int = 0
    last_loss: float | None = None
    checkpoint: str | None = None
    error: str | None = None

    def shape(self) -> dict:
        return {"running": self.running, "request_id": self.request_id, "started_at": self.started_at,
                "steps_done": self.steps_done, "max_steps": self.max_steps, "last_loss": self.last_loss,
                "checkpoint": self.checkpoint, "error": self.error}


def train_request(message: dict, cached: dict) -> TrainRequest:
    """A `train` message checked whole. `cached` holds earlier datasets by request_id, for `resume`."""
    request_id = message.get("request_id")
    dataset = message.get("dataset")
    if _flag(message, "resume", False) and not dataset:
        if request_id not in cached:
            raise Refused("resume: no dataset was sent earlier with this request_id; send dataset")
        examples = cached[request_id]
    elif isinstance(dataset, str) and dataset.strip():
        examples = parse_dataset(dataset)
    else:
        raise Refused("dataset must be JSONL text: one {\"messages\": [...]} or {\"text\": \"...\"} per line")
    name = message.get("checkpoint_name") or f"train-{(request_id or 'run')[:24]}"
    try:
        check_name(name)
    except Refused as exc:
        raise Refused(f"checkpoint_name: {exc}") from None
    return TrainRequest(examples, train_settings(message.get("config", {})), name,
                        _flag(message, "save_checkpoint", True), request_id)


def _flag(message: dict, key: str, default: bool) -> bool:
    value = message.get(key, default)
    if not isinstance(value, bool):
        raise Refused(f"{key} must be true or false")
    return value


def train_settings(given: object) -> TrainSettings:
    if not isinstance(given, dict):
        raise Refused("config must be an object")
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise Refused(f"config: unknown training setting(s) {', '.join(unknown)} (known: {', '.join(DEFAULTS)})")
    settings = {**DEFAULTS, **given}
    for key, (low, high) in BOUNDS.items():
        value = settings[key]
        whole = key != "learning_rate"
        if not is_number(value) or (whole and not isinstance(value, int)) or not low <= value <= high:
            kind = "a whole number" if whole else "a number"
            raise Refused(f"config: {key} must be {kind} from {low} to {high} (got {value!r})")
    return TrainSettings(**settings)


def parse_dataset(text: str) -> list:
    """JSONL: each line {"messages": [{"role", "content"}, ...]} or {"text": "..."}; blank lines skipped."""
    examples = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as exc:
            raise Refused(f"dataset line {number}: not JSON ({exc})") from None
        examples.append((number, _example(item, number)))
        if len(examples) > MAX_EXAMPLES:
            raise Refused(f"dataset: more than {MAX_EXAMPLES} examples")
    if not examples:
        raise Refused("dataset has no examples")
    return examples


def _example(item: object, number: int) -> str | list[dict[str, str]]:
    if isinstance(item, dict) and isinstance(item.get("text"), str) and item["text"].strip():
        return item["text"]
    turns = item.get("messages") if isinstance(item, dict) else None
    if (isinstance(turns, list) and turns and all(isinstance(t, dict) and t.get("role") in ROLES
                                                  and isinstance(t.get("content"), str) for t in turns)
            and any(t["role"] == "assistant" for t in turns)):
        return [{"role": t["role"], "content": t["content"]} for t in turns]
    raise Refused(f"dataset line {number}: must be {{\"text\": \"...\"}} or {{\"messages\": [{{\"role\", "
                        f"\"content\"}}, ...]}} with an assistant turn")
