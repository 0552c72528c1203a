"""Model control: status, resources, the model list, switching, rechecking, downloading, deleting,
training and snapshots. A switch, training and a snapshot are jobs in the one queue; what they tell goes
to the asking session as events (core.events), and a refusal is errors.Refused."""
import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

from llmws_server import resources
from llmws_server.catalog import folders as catalog
from llmws_server.catalog.downloads import Downloads
from llmws_server.config import Config, generation_defaults
from llmws_server.core.events import DownloadDone, Event, Failed, Log, ModelLoaded, ModelStatus, Stamped
from llmws_server.core.jobs import SnapshotJob, SwitchJob, TrainJob
from llmws_server.core.metrics import Metrics
from llmws_server.core.replicas import ReplicaPool
from llmws_server.core.training import TrainRequest, TrainStatus
from llmws_server.core.worker import Worker
from llmws_server.engines.api import Engine
from llmws_server.engines.registry import load_engine
from llmws_server.errors import Refused
from llmws_server.sessions.store import Session, SessionStore

KEPT_DATASETS = 4  # datasets kept (by request_id) for a `train` with resume: true

log = logging.getLogger("llmws.server")


class ModelControl:
    def __init__(self, config: Config, worker: Worker, sessions: SessionStore, metrics: Metrics,
                 defaults: dict):
        self.config, self.worker, self.sessions, self.metrics = config, worker, sessions, metrics
        self.generation_defaults = defaults  # the service's, updated in place by a switch
        self.downloads = Downloads(config)
        self.loaded_fingerprint = catalog.fingerprint(worker.engine.path)  # what recheck compares with
        self.switch_error: str | None = None  # why the last switch failed (the old model is back), until one works
        self.training: TrainJob | None = None  # the last one
        self.datasets: dict[str, list] = {}  # train datasets by request_id, for a `train` with resume: true

    @property
    def engine(self) -> Engine:
        return self.worker.engine

    def status(self, engine: Engine | None = None) -> dict:
        """The original LLMWS's model status: loaded, status (OK, LOADING), name, path, error, params, max_context."""
        loading = engine is None and isinstance(self.worker.running, SwitchJob)  # a given engine has just loaded
        engine = engine or self.engine
        return {"loaded": True, "status": (ModelStatus.LOADING if loading else ModelStatus.OK).value,
                "name": engine.name, "path": catalog.relative_path(engine.path, self.config.root),
                "error": self.switch_error, "params": f"{engine.params / 1e9:.2f}B", "max_context": engine.max_context}

    def ready(self) -> bool:
        """A model is loaded and the worker runs (not while a switch unloads and loads)."""
        return self.worker.alive() and self.status()["status"] == ModelStatus.OK.value

    async def resources(self) -> tuple[dict | None, dict, dict, list]:
        """(CUDA figures, CPU figures, the loaded model, the models there are)."""
        engine = self.engine
        cuda, cpu, models = await asyncio.to_thread(
            lambda: (resources.cuda_info(), resources.cpu_info(), catalog.scan(self.config, engine.path)))
        model = {"name": engine.name, "path": str(engine.path), "vision": engine.vision}
        if isinstance(self.worker, ReplicaPool):
            model["replicas"] = self.worker.status()
        return cuda, cpu, model, models

    async def memory(self) -> dict | None:
        return await asyncio.to_thread(resources.cuda_info)

    async def models(self) -> list:
        return await asyncio.to_thread(catalog.scan, self.config, self.engine.path)

    def _one_engine(self, what: str) -> None:
        """Refused while replicas serve: a switch, a reload, training and snapshots act on one engine here."""
        if isinstance(self.worker, ReplicaPool):
            raise Refused(f"{what} is not available while {len(self.worker.replicas)} engine replicas serve "
                          "(replicas.ray_address): set model.path in config.json and restart the server instead")

    def switch(self, session: Session, model_path: object, request_id: str | None) -> None:
        self._one_engine("A model switch")
        _, path = catalog.find_model(self.config, model_path)
        self._load(session, path, lambda engine: ModelLoaded(engine.name, self.status(engine)), request_id)

    async def recheck(self, session: Session) -> dict | None:
        """Look at the loaded model's folder again: the status when it is unchanged, else None and a
        reload queued (its ModelLoaded says it is done)."""
        path = self.engine.path
        changed = await asyncio.to_thread(lambda: catalog.fingerprint(path) != self.loaded_fingerprint)
        if not changed:
            return self.status()
        self._one_engine("Reloading a changed model")
        self._load(session, path, lambda engine: ModelLoaded(engine.name, self.status(engine), reloaded=True))
        return None

    def _load(self, session: Session, path: Path, announce: Callable[[Engine], ModelLoaded],
              request_id: str | None = None) -> None:
        """Queue a switch to the model in `path` (the loaded one again, for a recheck)."""
        problem = catalog.weights_problem(path)
        if problem:
            raise Refused(f"Model {path.name} cannot be loaded yet: {problem}", "model_path")
        job = SwitchJob(session, asyncio.get_running_loop(), path, lambda folder: load_engine(folder, self.config),
                        announce, lambda engine, failure: self._switched(engine, failure, session), request_id)
        job.observer = self.metrics.observe
        self.worker.submit(job)

    def _switched(self, engine: Engine, failure: str | None, switcher: Session) -> None:
        """After a switch (on the event loop): remember how it went; tell every other session what answers now."""
        self.switch_error = failure
        self.loaded_fingerprint = catalog.fingerprint(engine.path)
        if failure:
            return
        self.generation_defaults.clear()
        self.generation_defaults.update(generation_defaults(self.config, engine.path))
        for session in self.sessions.sessions.values():
            if session is not switcher and session.connection is not None:
                session.emit(Stamped(Log(f"Model switched to {engine.name} (max context {engine.max_context})")))

    def download(self, session: Session, repo: object, target_dir: object, file: object,
                 request_id: str | None) -> None:
        """Check the download and start it in the background; its log lines and end go to the session."""
        url, destination, chosen = self.downloads.check(repo, target_dir, file)

        def emit(event: Event) -> None:
            session.emit(Stamped(event, request_id))

        asyncio.create_task(self._download(emit, url, destination, chosen))

    async def _download(self, emit: Callable[[Event], None], url: str, destination: Path, file: str | None) -> None:
        emit(Log("Starting download..."))
        try:
            entry = await self.downloads.download(url, destination, lambda text: emit(Log(text)), file)
        except Exception as exc:  # git's or the network's failure: the client is told, the server goes on
            log.warning("download of %s failed: %s", url, exc)
            emit(Failed(f"Download failed: {exc}"))
            return
        emit(Log("Download complete!"))
        emit(DownloadDone(entry))

    async def delete(self, name: object) -> str:
        return await asyncio.to_thread(catalog.delete, self.config, name, self.engine.path)

    # -- training --------------------------------------------------------------------------------------------

    def train_status(self) -> dict:
        return (self.training.status if self.training else TrainStatus()).shape()

    def _new_model_folder(self, name: str) -> tuple[Path, str]:
        """(folder, shown path) for a model to be saved in var/models/; refused if it exists."""
        folder = self.config.paths["var_dir"] / "models" / catalog.check_name(name)
        shown = catalog.relative_path(folder, self.config.root)
        if folder.exists():
            raise Refused(f"{shown} exists already: choose another name", "name")
        return folder, shown

    def train(self, session: Session, request: TrainRequest, most_queued: int) -> None:
        self._one_engine("Training")
        folder, _ = self._new_model_folder(request.checkpoint_name)
        job = TrainJob(session, asyncio.get_running_loop(), request, folder.parent,
                       catalog.relative_path(folder.parent, self.config.root))
        job.observer = self.metrics.observe
        session.add_job(job, most_queued)
        if request.request_id:
            self.datasets[request.request_id] = request.examples
            while len(self.datasets) > KEPT_DATASETS:
                self.datasets.pop(next(iter(self.datasets)))
        self.training = job
        self.worker.submit(job)

    def snapshot(self, session: Session, name: str | None, request_id: str | None, most_queued: int) -> None:
        self._one_engine("A snapshot")
        folder, shown = self._new_model_folder(name or f"snapshot-{int(time.time())}")
        job = SnapshotJob(session, asyncio.get_running_loop(), folder, shown, request_id)
        session.add_job(job, most_queued)
        self.worker.submit(job)
