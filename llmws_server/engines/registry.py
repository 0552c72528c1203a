"""A model folder loaded by the engine that serves it: model.engine, "auto" by default (catalog.engine_for:
GGUF weights without safetensors run on llama.cpp, everything else on transformers)."""
from pathlib import Path

from llmws_server.catalog.folders import engine_for
from llmws_server.config import Config
from llmws_server.engines import api
from llmws_server.engines.transformers.engine import Engine
from llmws_server.errors import Refused

LLAMA_CPP_MISSING = ("{name} is a GGUF model, and the llama.cpp engine needs llama-cpp-python: "
                     "pip install -r requirements-llamacpp.txt (it builds llama.cpp, about 8 minutes on 2 cores)")


def load_engine(folder: Path, config: Config) -> api.Engine:
    """The engines.api.Engine for `folder`; errors.Refused says why it cannot be."""
    if engine_for(folder, config.model["engine"]) == "llama.cpp":
        try:
            from llmws_server.engines.llamacpp.engine import LlamaCppEngine  # an optional dependency
        except ImportError:
            raise Refused(LLAMA_CPP_MISSING.format(name=folder.name)) from None
        return LlamaCppEngine.for_config(folder, config)
    return Engine.for_config(folder, config)


def load_engines(folder: Path, config: Config) -> list[api.Engine]:
    """The engine in this process, or with replicas.ray_address set, the replicas on a Ray cluster
    (engines/replicas/: Ray is imported only then)."""
    if config.replicas["ray_address"] is None:
        return [load_engine(folder, config)]
    try:
        from llmws_server.engines.replicas.cluster import start_replicas
    except ModuleNotFoundError as exc:
        if exc.name != "ray":
            raise
        raise Refused("replicas.ray_address is set, and engine replicas need Ray: "
                      "pip install -r requirements-ray.txt") from None
    return [*start_replicas(folder, config)]
