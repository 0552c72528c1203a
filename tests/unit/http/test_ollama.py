"""http/ollama.py without a server: the shapes, event by event, read back by the real `ollama` package."""
import ollama

from llmws_server.core.events import (
    DownloadDone,
    Failed,
    FinishReason,
    Log,
    Reasoning,
    Stamped,
    Text,
    ToolCallArguments,
    ToolCallStarted,
)
from llmws_server.http import ollama as ollama_api
from llmws_server.http.ollama_shapes import Reply, Timing, pull_source
from llmws_server.http.runs import Finished
from llmws_server.sessions.store import StreamSession


def test_reasoning_is_thinking_and_a_cut_call_is_text():
    answer = ollama_api.Answer(Reply(True, "m"), Timing.now())
    lines = [line for told in (Reasoning("hmm"), Text("Hi"), ToolCallStarted(0, "call_1", "f"),
                               ToolCallArguments(0, '{"a": '), ToolCallArguments(0, "1}"),
                               ToolCallStarted(1, "call_2", "g"), ToolCallArguments(1, '{"b": '),
                               Finished(FinishReason.LENGTH, 5, 9))
             for line in answer.take(told)]
    messages = [ollama.ChatResponse(**line).message for line in lines]
    assert messages[0].thinking == "hmm" and messages[1].content == "Hi"
    assert messages[2].tool_calls[0].function.arguments == {"a": 1} and messages[3].content == '{"b": '
    whole = ollama.ChatResponse(**answer.whole())
    assert whole.message.thinking == "hmm" and whole.message.content == 'Hi{"b": '
    assert whole.done_reason == "length" and whole.prompt_eval_count == 5 and whole.eval_count == 9


async def test_pull_progress_maps_the_downloads_events():
    session = StreamSession()
    for event in (Log("Starting download..."), Log("LFS objects: 1.5/3.0 MB (50%)"), DownloadDone({})):
        session.emit(Stamped(event))
    shapes = [shape async for shape in ollama_api.pulled(session)]
    assert shapes[1] == {"status": "LFS objects: 1.5/3.0 MB (50%)", "digest": "lfs", "completed": 1572864,
                         "total": 3145728}
    assert [ollama.ProgressResponse(**shape).status for shape in shapes] == [
        "Starting download...", "LFS objects: 1.5/3.0 MB (50%)", "success"]
    failed = StreamSession()
    failed.emit(Stamped(Failed("Download failed: no such repository")))
    assert [shape async for shape in ollama_api.pulled(failed)] == [{"error": "Download failed: no such repository"}]
    assert pull_source("hf.co/org/name") == "https://huggingface.co/org/name"
    assert pull_source("org/name:latest") == "https://huggingface.co/org/name"
