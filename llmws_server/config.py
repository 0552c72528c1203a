"""config.json: defaults, loading with precise errors, and generation-setting validation."""
import copy
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from llmws_server.errors import ConfigError, Refused

DEFAULTS: dict[str, dict[str, Any]] = {
    "server": {
        "host": "0.0.0.0",
        "port": 8765,
        "http_port": 8000,
        "max_message_size": 12582912,
        "ping_interval": 30,
        "ping_timeout": 10,
        "allowed_origins": ["http://localhost", "http://127.0.0.1"],
        "allowed_hosts": [],
        "auth_token": None,
        "admin_token": None,
        "admin_origins": [],
        "keep_sessions_over_restart": False,
        "tls_cert": None,
        "tls_key": None,
    },
    "model": {"path": None, "engine": "auto", "gguf_file": None, "use_safetensors": True, "trust_remote_code": False,
              "device_map": "auto", "tool_parser": "auto", "split_reasoning": True},
    "optimization": {"use_flash_attention": True, "dtype": "auto", "compile": False,
                     "max_batch_size": "auto"},
    # What a request gets where neither it, its session, config.json nor the model's generation_config.json
    # says otherwise (generation_defaults()).
    "generation_defaults": {
        "max_new_tokens": 1024,
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 50,
        "repetition_penalty": 1.0,
    },
    "paths": {"models_dir": "models", "var_dir": "var", "sessions_dir": "var/sessions", "logs_dir": "var/logs"},
    "limits": {
        "max_clients": 10,
        "max_clients_per_ip": 8,
        "max_http_requests_per_ip": 32,
        "max_connections": 1024,
        "max_connections_per_ip": 64,
        "max_sessions": 1000,
        "hello_timeout_s": 10,
        "idle_timeout_s": 900,
        "queue_size_per_client": 1024,
        "max_queued_requests": 256,
        "detached_queue_timeout_s": 600,
        "stream_resume_s": 10,
        "max_session_buffer_mb": 64,
        "max_image_bytes": 4194304,
        "max_image_pixels": 40000000,
        "max_request_pixels": 40000000,
        "max_images_per_request": 8,
        "max_embedding_inputs": 256,
        "max_context_length": 128000,
        "timeout_token_generation": 300,
    },
    "download": {"allowed_url_prefixes": ["https://huggingface.co/"], "timeout_s": 3600},
    # Engine replicas as Ray actors behind the one queue (engines/replicas/): off while ray_address is null.
    # "local" starts a Ray cluster on this machine; "auto" or "ray://host:port" joins one. resources: the custom
    # Ray resources each replica asks for (an object for every replica, or a list of one per replica).
    "replicas": {"ray_address": None, "count": 2, "num_cpus": 1, "num_gpus": 0, "max_restarts": 3,
                 "resources": {}},
}

# Keys whose value must be a whole number (the others of numeric default accept any finite number).
INTEGER_KEYS = {"port", "http_port", "max_message_size", "max_clients", "max_clients_per_ip", "max_sessions",
                "max_http_requests_per_ip", "max_connections", "max_connections_per_ip",
                "queue_size_per_client", "max_queued_requests", "max_context_length", "max_new_tokens", "top_k",
                "max_image_bytes", "max_image_pixels", "max_request_pixels", "max_images_per_request",
                "max_embedding_inputs", "seed",
                "count", "max_restarts"}
POSITIVE_KEYS = {"port", "max_message_size", "max_clients", "max_clients_per_ip", "max_sessions",
                 "max_http_requests_per_ip", "max_connections", "max_connections_per_ip",
                 "hello_timeout_s",
                 "idle_timeout_s", "queue_size_per_client", "max_queued_requests", "detached_queue_timeout_s",
                 "max_session_buffer_mb", "max_image_bytes", "max_image_pixels", "max_request_pixels",
                 "max_images_per_request",
                 "max_embedding_inputs", "max_context_length", "timeout_token_generation", "timeout_s",
                 "count", "num_cpus"}
NON_NEGATIVE_KEYS = {"stream_resume_s", "num_gpus"}
NULLABLE_KEYS = {"http_port"}  # null or 0 (as --http-port 0): no HTTP API
# Keys the original LLMWS writes into config.json after each load (what it loaded, how it went) and where
# it keeps training datasets: accepted and read past, so its config.json works here unchanged.
ORIGINAL_KEYS = {"model": {"name", "params", "max_context", "last_loaded", "status", "error"},
                 "paths": {"datasets_dir"}}  # null turns it off
ENGINES = ("auto", "transformers", "llama.cpp")
TOOL_PARSERS = ("auto", "hermes", "llama3", "mistral")  # core/output_parsers.STYLES, "json" aside
DTYPES = {"auto", "bfloat16", "float16", "float32"}


MAX_NUMBER = 2 ** 31 - 1  # no setting needs more, and torch takes every one that fits
SESSION_SETTINGS = ("seed", "frequency_penalty", "presence_penalty")  # settable, not in generation_defaults


def is_number(value: object) -> TypeGuard[int | float]:
    """A finite int or float of a size every setting can take (a 400-digit int is not one)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return -MAX_NUMBER <= value <= MAX_NUMBER and (isinstance(value, int) or math.isfinite(value))


@dataclass(frozen=True)
class GenerationSettings:
    """One request's generation settings, validated (validate_generation) and complete."""
    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    # Per request (not in generation_defaults: a session or a request sets them)
    seed: int | None = None  # the same seed and settings give the same text, alone or in a batch
    frequency_penalty: float = 0.0  # OpenAI's: a token's logit minus this times its count in the answer so far
    presence_penalty: float = 0.0  # minus this once the token is in the answer
    logprobs: int | None = None  # None: none; N: each token's log probability and the N likeliest (0 to 20)
    json_schema: dict | None = None  # the answer is JSON matching this schema (constrained decoding)

    @property
    def sampled(self) -> bool:
        """The one rule: temperature 0 or do_sample false is greedy decoding; anything else samples."""
        return self.do_sample and self.temperature > 0

    @property
    def penalized(self) -> bool:
        """repetition_penalty 1 is no penalty."""
        return self.repetition_penalty != 1.0

    @property
    def plain(self) -> bool:
        """Nothing but the settings every engine's fast path takes: no seed, OpenAI penalty, logprobs or schema."""
        return (self.seed is None and not self.frequency_penalty and not self.presence_penalty
                and self.logprobs is None and self.json_schema is None)


def validate_generation(settings: dict) -> dict:
    """Check generation settings (a whole set or an update); raise errors.Refused naming the field."""
    known = [*DEFAULTS["generation_defaults"], *SESSION_SETTINGS]
    for key, value in settings.items():
        if key not in known:
            raise Refused(f"unknown generation setting '{key}' (known: {', '.join(known)})")
        if key == "do_sample":
            if not isinstance(value, bool):
                raise Refused("do_sample must be true or false")
            continue
        if not is_number(value):
            raise Refused(f"{key} must be a number between -{MAX_NUMBER} and {MAX_NUMBER}")
        if key in INTEGER_KEYS and not isinstance(value, int):
            raise Refused(f"{key} must be a whole number")
    _check_range(settings, "temperature", lambda v: v >= 0, "must be >= 0")
    _check_range(settings, "top_p", lambda v: 0 < v <= 1, "must be in (0, 1]")
    _check_range(settings, "top_k", lambda v: v >= 0, "must be >= 0")
    _check_range(settings, "max_new_tokens", lambda v: v >= 1, "must be >= 1")
    _check_range(settings, "repetition_penalty", lambda v: v > 0, "must be > 0")
    _check_range(settings, "seed", lambda v: v >= 0, "must be >= 0")
    for key in ("frequency_penalty", "presence_penalty"):
        _check_range(settings, key, lambda v: -2 <= v <= 2, "must be from -2 to 2")
    return settings


def _check_range(settings: dict, key: str, ok: Callable[[float], bool], text: str) -> None:
    if key in settings and not ok(settings[key]):
        raise Refused(f"{key} {text} (got {settings[key]})")


class Config:
    """The merged configuration; `paths` values are absolute Paths resolved against the config's folder."""

    # The sections of DEFAULTS, set by __init__'s loop.
    server: dict
    model: dict
    optimization: dict
    generation_defaults: dict
    paths: dict[str, Path]
    limits: dict
    download: dict
    replicas: dict

    def __init__(self, data: dict, file: Path, ignored: list | None = None, pinned: dict | None = None):
        self.data = data
        self.pinned_generation = pinned or {}  # the generation_defaults config.json itself sets
        self.file = file
        self.ignored = ignored or []  # the original LLMWS's keys this server reads past (ORIGINAL_KEYS)
        self.root = file.parent
        for section in DEFAULTS:
            setattr(self, section, data[section])
        self.paths = {name: (self.root / value).resolve() for name, value in data["paths"].items()}

    def resolve(self, value: str) -> Path:
        return (self.root / value).resolve()


def load_config(path: str | Path) -> Config:
    """Read config.json (writing the defaults if it is missing) and merge it over the defaults."""
    file = Path(path).resolve()
    if not file.exists():  # generation settings left to the model (generation_defaults())
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(json.dumps({**DEFAULTS, "generation_defaults": {}}, indent=2) + "\n")
    text = file.read_text(encoding="utf-8")
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{file}, line {exc.lineno}, column {exc.colno}: invalid JSON: {exc.msg}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{file}, line 1: the top level must be a JSON object")
    data, ignored = copy.deepcopy(DEFAULTS), []
    for section, values in loaded.items():
        where = lambda key: f"{file}, line {_line_of(text, key)}, key '{section}.{key}'"  # noqa: E731
        if section not in DEFAULTS:
            raise ConfigError(f"{file}, line {_line_of(text, section)}, key '{section}': unknown section")
        if not isinstance(values, dict):
            raise ConfigError(f"{file}, line {_line_of(text, section)}, key '{section}': must be an object")
        for key, value in values.items():
            if key in ORIGINAL_KEYS.get(section, ()):
                ignored.append(f"{section}.{key}")
                continue
            if key not in DEFAULTS[section]:
                raise ConfigError(f"{where(key)}: unknown key")
            problem = _type_problem(key, DEFAULTS[section][key], value)
            if problem:
                raise ConfigError(f"{where(key)}: {problem}")
            data[section][key] = value
    try:
        validate_generation(data["generation_defaults"])
    except Refused as exc:
        key = str(exc).split()[0]
        raise ConfigError(f"{file}, line {_line_of(text, key)}, key 'generation_defaults.{key}': {exc}") from None
    if data["server"]["http_port"] == 0:  # as --http-port 0: the HTTP API is off
        data["server"]["http_port"] = None
    for key in ("port", "http_port"):
        if data["server"][key] is not None and not 1 <= data["server"][key] <= 65535:
            off = " (or 0 or null for no HTTP API)" if key == "http_port" else ""
            raise ConfigError(f"{file}, line {_line_of(text, key)}, key 'server.{key}': must be 1 to 65535{off}")
    if data["model"]["engine"] not in ENGINES:
        raise ConfigError(f"{file}, line {_line_of(text, 'engine')}, key 'model.engine': "
                          f"must be one of {', '.join(ENGINES)}")
    if data["model"]["tool_parser"] not in TOOL_PARSERS:
        raise ConfigError(f"{file}, line {_line_of(text, 'tool_parser')}, key 'model.tool_parser': "
                          f"must be one of {', '.join(TOOL_PARSERS)}")
    batch = data["optimization"]["max_batch_size"]
    if batch != "auto" and (not is_number(batch) or not isinstance(batch, int) or batch < 1):
        raise ConfigError(f"{file}, line {_line_of(text, 'max_batch_size')}, key 'optimization.max_batch_size': "
                          "must be \"auto\" or a whole number from 1")
    address = data["replicas"]["ray_address"]
    if address is not None and (not isinstance(address, str) or not address):
        raise ConfigError(f"{file}, line {_line_of(text, 'ray_address')}, key 'replicas.ray_address': must be null, "
                          "\"local\", \"auto\" or a Ray address such as \"ray://host:10001\"")
    for key in ("num_gpus", "max_restarts"):
        if data["replicas"][key] < 0:
            raise ConfigError(f"{file}, line {_line_of(text, key)}, key 'replicas.{key}': must be 0 or more")
    problem = _resources_problem(data["replicas"]["resources"], data["replicas"]["count"])
    if problem:
        raise ConfigError(f"{file}, line {_line_of(text, 'resources')}, key 'replicas.resources': {problem}")
    if data["optimization"]["dtype"] not in DTYPES:
        raise ConfigError(f"{file}, line {_line_of(text, 'dtype')}, key 'optimization.dtype': "
                          f"must be one of {', '.join(sorted(DTYPES))}")
    return Config(data, file, ignored, loaded.get("generation_defaults"))


def generation_defaults(config: Config, model_folder: Path) -> dict:
    """The settings a request gets unless it or its session says otherwise: config.json's
    generation_defaults where it sets them, else what the model's generation_config.json recommends, else
    DEFAULTS."""
    return {**DEFAULTS["generation_defaults"], **model_recommends(model_folder), **config.pinned_generation}


def model_recommends(model_folder: Path) -> dict:
    """The generation settings a model folder's generation_config.json gives (those this server knows and
    accepts; max_length is a whole-sequence cap, not a default answer length)."""
    try:
        found = json.loads((Path(model_folder) / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    recommended = {}
    for key in DEFAULTS["generation_defaults"]:
        try:
            if isinstance(found, dict) and found.get(key) is not None:
                recommended.update(validate_generation({key: found[key]}))
        except Refused:
            continue
    return recommended


def _type_problem(key: str, default: object, value: object) -> str | None:
    if value is None and key in NULLABLE_KEYS or key in ("max_batch_size", "resources"):  # checked in load_config
        return None
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "must be true or false"
    if isinstance(default, (int, float)):
        if not is_number(value):
            return f"must be a number between -{MAX_NUMBER} and {MAX_NUMBER}"
        if key in INTEGER_KEYS and not isinstance(value, int):
            return "must be a whole number"
        if key in POSITIVE_KEYS and value <= 0:
            return "must be greater than 0"
        if value < 0 and key in NON_NEGATIVE_KEYS:
            return "must be 0 or more"
        return None
    if isinstance(default, list):
        ok = isinstance(value, list) and all(isinstance(item, str) for item in value)
        return None if ok else "must be a list of strings"
    if default is None:
        return None if value is None or isinstance(value, str) else "must be a string or null"
    return None if isinstance(value, str) else "must be a string"


def _resources_problem(resources: object, count: int) -> str | None:
    """replicas.resources: an object of custom Ray resources (name: amount greater than 0) that every replica
    asks for, or a list of replicas.count such objects, replica i asking for the i-th."""
    if isinstance(resources, list) and len(resources) != count:
        return f"a list needs one object per replica: {count} (replicas.count), not {len(resources)}"
    for each in resources if isinstance(resources, list) else [resources]:
        if not isinstance(each, dict) or not all(isinstance(name, str) and name and is_number(amount) and amount > 0
                                                 for name, amount in each.items()):
            return ('must be an object of custom Ray resources and amounts greater than 0, such as {"llmws": 1}, '
                    "or a list of one such object per replica")
        if {"CPU", "GPU"} & set(each):
            return "CPU and GPU are replicas.num_cpus and replicas.num_gpus"
    return None


def _line_of(text: str, key: str) -> int:
    match = re.search(r'"%s"\s*:' % re.escape(key), text)
    return text.count("\n", 0, match.start()) + 1 if match else 1
