"""The core's events as the seed protocol's messages, and back (sessions.store.Codec): the one place
where an event becomes JSON with a "type". A buffered record is the message exactly as it was sent, so
a replay sends the same bytes."""
from collections.abc import Callable

from llmws_server.core import events as ev
from llmws_server.core.events import Stamped
from llmws_server.engines.api import TokenLogprob
from llmws_server.ws import protocol

TO_MESSAGE: dict[type, Callable] = {
    ev.Queued: lambda e: protocol.queued(e.position),
    ev.Started: lambda e: protocol.start(e.tokens_in, e.max_tokens, e.images_in, e.sampled),
    ev.Text: lambda e: protocol.token(e.text, [_logprob(each) for each in e.logprobs]),
    ev.Reasoning: lambda e: protocol.reasoning(e.text),
    ev.ToolCallStarted: lambda e: protocol.tool_call(e.index, "", e.id, e.name),
    ev.ToolCallArguments: lambda e: protocol.tool_call(e.index, e.text),
    ev.Done: lambda e: protocol.done(e.tokens, e.reason.value, e.tokens_per_s),
    ev.Failed: lambda e: protocol.error(e.message, **e.fields),
    ev.Log: lambda e: protocol.log(e.text),
    ev.ModelLoaded: lambda e: (protocol.recheck_complete(True, e.status, "reloaded") if e.reloaded
                               else protocol.model_switched(e.name, e.status)),
    ev.TrainStarted: lambda e: protocol.train_started(e.settings, e.examples, e.checkpoint_name),
    ev.TrainProgress: lambda e: protocol.train_progress(e.step, e.max_steps, e.loss, e.learning_rate, e.tokens_per_s),
    ev.TrainCheckpoint: lambda e: protocol.train_checkpoint(e.step, e.path),
    ev.TrainDone: lambda e: protocol.train_done(e.steps, e.checkpoint, e.reason, e.loss),
    ev.SnapshotSaved: lambda e: protocol.snapshot_saved(e.path),
    ev.DownloadDone: lambda e: protocol.download_done(e.model),
}
ENVELOPE = {"type", "request_id", "seq"}
FROM_MESSAGE: dict[str, Callable[[dict], ev.Event]] = {
    "queued": lambda m: ev.Queued(m["position"]),
    "start": lambda m: ev.Started(m["tokens_in"], m["max_tokens"], m["images_in"], m["do_sample"]),
    "token": lambda m: ev.Text(m["data"], tuple(_token_logprob(each) for each in m.get("logprobs", ()))),
    "reasoning": lambda m: ev.Reasoning(m["data"]),
    "tool_call": lambda m: (ev.ToolCallStarted(m["index"], m["id"], m["name"]) if "id" in m
                            else ev.ToolCallArguments(m["index"], m["arguments"])),
    "done": lambda m: ev.Done(m["total_tokens"], ev.FinishReason(m["finish_reason"]), m["tokens_per_s"]),
    "error": lambda m: ev.Failed(m["message"], {k: v for k, v in m.items() if k not in ENVELOPE | {"message"}}),
    "log": lambda m: ev.Log(m["message"]),
    "model_switched": lambda m: ev.ModelLoaded(m["model"], m["status"]),
    "recheck_complete": lambda m: ev.ModelLoaded(m["status"]["name"], m["status"], reloaded=True),
    "train_started": lambda m: ev.TrainStarted(m["config"], m["examples"], m["checkpoint_name"]),
    "train_progress": lambda m: ev.TrainProgress(m["step"], m["max_steps"], m["loss"], m["learning_rate"],
                                                 m["tokens_per_s"]),
    "train_checkpoint": lambda m: ev.TrainCheckpoint(m["step"], m["path"]),
    "train_done": lambda m: ev.TrainDone(m["steps"], m["checkpoint"], m["finish_reason"], m["loss"]),
    "snapshot_saved": lambda m: ev.SnapshotSaved(m["path"]),
    "download_done": lambda m: ev.DownloadDone(m["model"]),
}


def _logprob(each: TokenLogprob) -> dict:
    return {"token": each.token, "logprob": each.logprob, "top_logprobs": [list(best) for best in each.top]}


def _token_logprob(shown: dict) -> TokenLogprob:
    return TokenLogprob(shown["token"], shown["logprob"], tuple(tuple(best) for best in shown["top_logprobs"]))


def message(event: ev.Event) -> dict:
    """An event as a message, without request_id or seq (an unnumbered notice)."""
    return TO_MESSAGE[type(event)](event)


class SeedCodec:
    def encode(self, stamped: Stamped) -> dict:
        record = message(stamped.event)
        if stamped.request_id is not None:
            record["request_id"] = stamped.request_id
        if stamped.seq is not None:
            record["seq"] = stamped.seq
        return record

    def decode(self, record: dict) -> Stamped:
        return Stamped(FROM_MESSAGE[record["type"]](record), record.get("request_id"), record.get("seq"))


CODEC = SeedCodec()
