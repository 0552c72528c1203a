"""http/anthropic.py without a server: a stream's events as the core tells them (pings while it waits,
message_start, the error event), and content blocks opened one at a time."""
import json


async def test_a_stream_waits_with_pings_starts_with_its_prompts_tokens_and_ends_at_its_error_event():
    """While a streamed request waits it gets pings; message_start comes when it starts, with the prompt's
    tokens as the engine read them; a failure is Anthropic's error event, which ends the stream: one queued
    whose prompt proves too long once tokenized, or one that fails after its first text. (Told here by the
    core's events, which a server orders so only under load.)"""
    from llmws_server.core.events import Failed, Queued, Started, Text
    from llmws_server.http.anthropic import message_events

    async def told(*items):
        for item in items:
            yield item

    too_long = Failed("Context too long (631 tokens). Max: 512.", {"max_context": 512, "input_length": 631})
    events = [(event.event, json.loads(event.data))
              async for event in message_events(told(Queued(2), Queued(1), too_long), "msg_1", "m")]
    assert [name for name, _ in events] == ["ping", "ping", "error"]
    assert events[-1][1] == {"type": "error", "error": {"type": "invalid_request_error", "max_context": 512,
                                                        "input_length": 631,
                                                        "message": "Context too long (631 tokens). Max: 512."}}
    failed = told(Queued(1), Started(30, 64, 0, False), Text("Rivers"), Failed("Generation failed: out of memory"))
    events = [(event.event, json.loads(event.data)) async for event in message_events(failed, "msg_2", "m")]
    assert [name for name, _ in events] == ["ping", "message_start", "ping", "content_block_start",
                                            "content_block_delta", "error"]
    assert all(name == data["type"] for name, data in events)
    assert events[1][1]["message"]["usage"]["input_tokens"] == 30
    assert events[-1][1]["error"]["type"] == "api_error"


def test_content_blocks_open_one_at_a_time_and_make_the_whole_message():
    """Thinking, text and a tool call as the core tells them: the stream's block events in order, and the
    whole message's blocks (the call's input parsed from its pieces)."""
    from llmws_server.core.events import Reasoning, Text, ToolCallArguments, ToolCallStarted
    from llmws_server.http.anthropic import Content

    content = Content()
    told = [Reasoning("Paris, "), Reasoning("so weather."), Text("Let me look."), ToolCallStarted(0, "call_7", "w"),
            ToolCallArguments(0, '{"city": '), ToolCallArguments(0, '"Paris"}')]
    events = [event for item in told for event in content.take(item)] + content.close()
    assert [(event["type"], event["index"]) for event in events] == [
        ("content_block_start", 0), ("content_block_delta", 0), ("content_block_delta", 0), ("content_block_stop", 0),
        ("content_block_start", 1), ("content_block_delta", 1), ("content_block_stop", 1),
        ("content_block_start", 2), ("content_block_delta", 2), ("content_block_delta", 2), ("content_block_stop", 2)]
    assert [event["delta"]["type"] for event in events if "delta" in event] == \
        ["thinking_delta", "thinking_delta", "text_delta", "input_json_delta", "input_json_delta"]
    assert events[0]["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}
    assert events[7]["content_block"] == {"type": "tool_use", "id": "toolu_7", "name": "w", "input": {}}
    assert content.content() == [{"type": "thinking", "thinking": "Paris, so weather.", "signature": ""},
                                 {"type": "text", "text": "Let me look."},
                                 {"type": "tool_use", "id": "toolu_7", "name": "w", "input": {"city": "Paris"}}]
