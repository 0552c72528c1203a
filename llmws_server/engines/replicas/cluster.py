"""Engine replicas on a Ray cluster: replicas.count actors (replica.Replica), each loading the model on
the CPUs and GPUs Ray gives it (replicas.num_cpus, replicas.num_gpus) on a node that offers the custom
resources it asks for (replicas.resources), restarted by Ray after a crash up to replicas.max_restarts
times. Ray is imported only here, and only when replicas.ray_address is set.
"""
import logging
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError

import llmws_server
from llmws_server.config import Config
from llmws_server.engines.api import ReplicaState
from llmws_server.engines.replicas.remote import RemoteEngine
from llmws_server.engines.replicas.replica import Replica
from llmws_server.errors import Refused

log = logging.getLogger("llmws.replicas")
MAX_CONCURRENCY = 8  # threads per actor: its streams run while add, cancel and stop calls come in


def start_replicas(folder: Path, config: Config) -> list[RemoteEngine]:
    """The replicas, those that loaded first (the server reads the model from the first); one that fails to
    load is logged and kept as dead (resources shows it)."""
    settings = config.replicas
    address = settings["ray_address"]
    local = address == "local"
    # The package travels to the cluster's workers (Ray's py_modules), so no node needs it installed.
    ray.init(address=None if local else address, include_dashboard=False, log_to_driver=True,
             num_cpus=settings["count"] * settings["num_cpus"] if local else None,
             runtime_env={"py_modules": [str(Path(llmws_server.__file__).parent)]})
    log.info("Ray cluster at %s: %s", address, ray.cluster_resources())
    actor_class = ray.remote(Replica)
    options = {"num_cpus": settings["num_cpus"], "num_gpus": settings["num_gpus"],
               "max_restarts": settings["max_restarts"], "max_task_retries": 0, "max_concurrency": MAX_CONCURRENCY}
    actors: list[Any] = [actor_class.options(**options, resources=resources).remote(folder, config)
                         for resources in replica_resources(settings)]
    engines = []
    for index, actor in enumerate(actors):
        try:
            engine = RemoteEngine(index, actor, ray.get(actor.describe.remote()))
        except Exception as exc:
            cause = load_failure(exc)
            log.error("replica %d could not load %s: %s", index, folder.name, cause)
            engine = RemoteEngine(index, actor, None)
            engine.state, engine.cause = ReplicaState.DEAD, f"it could not load the model: {cause}"
            ray.kill(actor, no_restart=True)
        else:
            log.info("%s serves %s on %s", engine.label, engine.name, engine.device)
        engines.append(engine)
    if all(engine.state is ReplicaState.DEAD for engine in engines):
        raise Refused(f"No engine replica could load {folder.name}: {engines[0].cause}")
    return sorted(engines, key=lambda engine: engine.state is ReplicaState.DEAD)


def replica_resources(settings: dict) -> list[dict]:
    """The custom Ray resources each replica asks for: replicas.resources, one object for every replica or
    a list of one per replica (replica i goes to a node that offers the i-th; ray start --resources)."""
    resources = settings["resources"]
    return list(resources) if isinstance(resources, list) else [resources] * settings["count"]


def load_failure(exc: BaseException) -> str:
    """Why a replica could not load, in one line: what its constructor raised (the last line of the
    traceback Ray hands on), else the first line of Ray's own error."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return lines[-1] if isinstance(exc, RayActorError) and exc.actor_init_failed else lines[0]
