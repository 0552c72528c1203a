"""The messages about the model and the machine: resources, status, the model list, switching, rechecking,
downloading and deleting models. LLMWSServer takes these handlers in (a mixin: one method per message
type, as in server.py)."""
import asyncio
import logging
import time

from . import catalog, protocol, resources
from .config import generation_defaults
from .engines import load_engine
from .jobs import SnapshotJob, SwitchJob, TrainJob
from .training import TrainStatus, train_request

KEPT_DATASETS = 4  # datasets kept (by request_id) for a `train` with resume: true

log = logging.getLogger("llmws.server")


class ModelMessages:
    """Needs from the server: config, engine, worker, sessions, metrics."""

    switch_error = None  # why the last switch failed (the old model was loaded back), until one succeeds
    training = None  # the last TrainJob
    datasets: dict  # the server's: train datasets by request_id, for a `train` with resume: true

    def model_status(self, engine=None) -> dict:
        """The original LLMWS's model status: loaded, status (OK, LOADING), name, path, error, params, max_context."""
        loading = engine is None and isinstance(self.worker.running, SwitchJob)  # a given engine has just loaded
        engine = engine or self.engine
        return {"loaded": True, "status": "LOADING" if loading else "OK", "name": engine.name,
                "path": catalog.relative_path(engine.path, self.config.root), "error": self.switch_error,
                "params": f"{engine.params / 1e9:.2f}B", "max_context": engine.max_context}

    async def on_get_resources(self, session, message):
        engine = self.engine
        cuda, cpu, models = await asyncio.to_thread(
            lambda: (resources.cuda_info(), resources.cpu_info(), catalog.scan(self.config, engine.path)))
        model = {"name": engine.name, "path": str(engine.path), "vision": engine.vision}
        session.reply(protocol.resources(cuda, cpu, model, models))

    async def on_get_status(self, session, message):
        memory = await asyncio.to_thread(resources.cuda_info)
        session.reply(protocol.status(self.model_status(), memory, len(self.sessions.sessions), self.train_status()))

    async def on_list_models(self, session, message):
        models = await asyncio.to_thread(catalog.scan, self.config, self.engine.path)
        session.reply(protocol.models_list(models))

    async def on_switch_model(self, session, message):
        _, path = catalog.find_model(self.config, message.get("model_path"))
        self._load(session, path, lambda engine: protocol.model_switched(engine.name, self.model_status(engine)),
                   message.get("request_id"))

    async def on_recheck_model(self, session, message):
        """Look at the loaded model's folder again: reload it if its files changed since it was loaded."""
        path = self.engine.path
        changed = await asyncio.to_thread(lambda: catalog.fingerprint(path) != self.loaded_fingerprint)
        if not changed:
            session.reply(protocol.recheck_complete(True, self.model_status(), "unchanged"))
            return
        self._load(session, path, lambda engine: protocol.recheck_complete(True, self.model_status(engine), "reloaded"))

    def _load(self, session, path, announce, request_id: str | None = None) -> None:
        """Queue a switch to the model in `path` (the loaded one again, for a recheck)."""
        problem = catalog.weights_problem(path)
        if problem:
            raise ValueError(f"Model {path.name} cannot be loaded yet: {problem}")
        job = SwitchJob(session, asyncio.get_running_loop(), path, lambda folder: load_engine(folder, self.config),
                        announce, lambda engine, failure: self._switched(engine, failure, session), request_id)
        job.observer = self.metrics.observe
        self.worker.submit(job)

    def _switched(self, engine, failure, switcher) -> None:
        """After a switch (on the event loop): remember how it went; tell every other session what answers now."""
        self.switch_error = failure
        self.loaded_fingerprint = catalog.fingerprint(engine.path)
        if failure:
            return
        self.generation_defaults.clear()
        self.generation_defaults.update(generation_defaults(self.config, engine.path))
        for session in self.sessions.sessions.values():
            if session is not switcher and session.connection is not None:
                session.emit(protocol.log(f"Model switched to {engine.name} (max context {engine.max_context})"))

    async def on_download_model(self, session, message):
        url, destination, file = self.downloads.check(message.get("repo"), message.get("target_dir"),
                                                      message.get("file"))
        tag = {"request_id": message["request_id"]} if message.get("request_id") else {}  # on every answer
        session.reply({**protocol.download_started(), **tag})
        asyncio.create_task(self._download(lambda answer: session.emit({**answer, **tag}), url, destination, file))

    async def _download(self, emit, url, destination, file) -> None:
        def log_line(text):
            emit(protocol.log(text))

        log_line("Starting download...")
        try:
            entry = await self.downloads.download(url, destination, log_line, file)
        except Exception as exc:
            log.warning("download of %s failed: %s", url, exc)
            emit(protocol.error(f"Download failed: {exc}"))
            return
        log_line("Download complete!")
        emit(protocol.download_done(entry))

    async def on_delete_model(self, session, message):
        name = await asyncio.to_thread(catalog.delete, self.config, message.get("model_name"), self.engine.path)
        session.reply(protocol.model_deleted(name))

    # -- training --------------------------------------------------------------------------------------------

    def train_status(self) -> dict:
        return (self.training.status if self.training else TrainStatus()).shape()

    def _new_model_folder(self, name: str):
        """(folder, shown path) for a model to be saved in var/models/; ValueError if it exists."""
        folder = self.config.paths["var_dir"] / "models" / catalog.check_name(name)
        shown = catalog.relative_path(folder, self.config.root)
        if folder.exists():
            raise ValueError(f"{shown} exists already: choose another name")
        return folder, shown

    async def on_train(self, session, message):
        datasets = self.datasets
        request = train_request(message, datasets)
        folder, _ = self._new_model_folder(request.checkpoint_name)
        job = TrainJob(session, asyncio.get_running_loop(), request, folder.parent,
                       catalog.relative_path(folder.parent, self.config.root))
        job.observer = self.metrics.observe
        session.add_job(job, self.limits["queue_size_per_client"])
        if request.request_id:
            datasets[request.request_id] = request.examples
            while len(datasets) > KEPT_DATASETS:
                datasets.pop(next(iter(datasets)))
        self.training = job
        self.worker.submit(job)

    async def on_train_status(self, session, message):
        session.reply(protocol.train_status(self.train_status()))

    async def on_save_snapshot(self, session, message):
        folder, shown = self._new_model_folder(message.get("name") or f"snapshot-{int(time.time())}")
        job = SnapshotJob(session, asyncio.get_running_loop(), folder, shown, message.get("request_id"))
        session.add_job(job, self.limits["queue_size_per_client"])
        self.worker.submit(job)
