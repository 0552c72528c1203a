"""The llama.cpp engine on the default model's shipped Q4_1 GGUF: what a client sees is what it sees on
transformers, and the text is llama.cpp's own. Skipped where llama-cpp-python is not installed."""
import shutil

import pytest
from conftest import Client, inference, text_of

llama_cpp = pytest.importorskip("llama_cpp")
PROMPT = "What is the capital of France?"


@pytest.fixture(scope="module")
def gguf_model(default_model):
    return default_model.parent / "SmolLM2-135M-Instruct-GGUF"


@pytest.fixture(scope="module")
def gguf_server(start_server, gguf_model, tiny_model):
    def populate(root):
        shutil.copytree(gguf_model, root / "models" / "smol-gguf")
        shutil.copytree(tiny_model, root / "models" / "tiny")
    return start_server(None, populate, model={"path": "models/smol-gguf"}, limits={"max_context_length": 1024})


@pytest.fixture(scope="module")
def binding(gguf_model):
    """llama-cpp-python itself, with the GGUF's own chat template: the reference."""
    from llmws_server.engines.llamacpp.engine import without_amx_buffers
    with without_amx_buffers():  # as the server loads it
        llama = llama_cpp.Llama(str(next(gguf_model.glob("*.gguf"))), n_ctx=1024, n_threads=1, verbose=False,
                                chat_format="chat_template.default")
    yield llama
    llama.close()


def binding_answer(binding, prompt, max_tokens):
    reply = binding.create_chat_completion([{"role": "user", "content": prompt}], temperature=0, max_tokens=max_tokens)
    return reply["choices"][0]["message"]["content"]


async def test_the_welcome_and_the_list_say_which_engine_and_quantisation(gguf_server):
    client = await Client.open(gguf_server.url)
    capabilities = client.welcome["capabilities"]
    assert (capabilities["engine"], capabilities["quantization"]) == ("llama.cpp", "Q4_1")
    assert capabilities["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and capabilities["max_context"] == 1024
    models = {m["name"]: m for m in (await client.request({"type": "list_models"}))["models"]}
    assert models["smol-gguf"]["engine"] == "llama.cpp" and models["smol-gguf"]["quantization"] == "Q4_1"
    assert models["tiny"]["engine"] == "transformers" and "quantization" not in models["tiny"]
    await client.close()


async def test_a_greedy_answer_is_llama_cpps_own(gguf_server, binding):
    client = await Client.open(gguf_server.url)
    messages = await client.until_done(inference(PROMPT, max_new_tokens=24, repetition_penalty=1.0))
    assert text_of(messages) == binding_answer(binding, PROMPT, 24)
    assert messages[-1]["finish_reason"] in ("stop", "length") and messages[-1]["total_tokens"] <= 24
    top_k_one = await client.until_done(inference(PROMPT, max_new_tokens=24, repetition_penalty=1.0,
                                                  temperature=0.8, top_k=1))
    assert text_of(top_k_one) == text_of(messages)  # sampling from one candidate is greedy
    hot = {text_of(await client.until_done(inference("Write a poem", max_new_tokens=16, temperature=1.5)))
           for _ in range(3)}
    assert len(hot) > 1  # sampling samples
    await client.close()


async def test_cancel_resume_and_the_context_limit(gguf_server, binding):
    client = await Client.open(gguf_server.url)
    await client.send(inference("Tell me a long story about rivers", max_new_tokens=400, request_id="long"))
    await client.until("token")
    await client.send({"type": "cancel", "request_id": "long"})
    done = (await client.until("done"))[-1]
    assert done["finish_reason"] == "cancelled" and done["total_tokens"] < 400

    await client.send(inference(PROMPT, max_new_tokens=40, repetition_penalty=1.0))
    first = await client.until("token")
    session_id, seen = client.session_id, first[-1]["seq"]
    await client.ws.close()  # dropped mid-answer
    back = await Client.open(gguf_server.url, {"session_id": session_id, "last_seq": seen})
    rest = await back.until("done")
    assert text_of(first) + text_of(rest) == binding_answer(binding, PROMPT, 40)

    refused = (await back.until_done(inference("river " * 1100, max_new_tokens=8)))[-1]
    assert refused["type"] == "error" and refused["max_context"] == 1024 and refused["input_length"] > 1024
    await back.close()


async def test_switching_between_gguf_and_transformers_both_ways(gguf_server, binding):
    client = await Client.open(gguf_server.url)
    for path, engine in [("models/tiny", "transformers"), ("models/smol-gguf", "llama.cpp")]:
        await client.send({"type": "switch_model", "model_path": path})
        assert (await client.until("model_switched"))[-1]["model"] == path.split("/")[1]
        status = await client.request({"type": "get_status"})
        assert status["model"]["path"] == path
        answer = await client.until_done(inference(PROMPT, max_new_tokens=8, repetition_penalty=1.0))
        assert answer[-1]["type"] == "done"
    assert text_of(answer) == binding_answer(binding, PROMPT, 8)
    trained = await client.request({"type": "train", "dataset": '{"text": "x"}', "checkpoint_name": "no"})
    trained = trained if trained["type"] == "error" else (await client.until("error"))[-1]
    assert "needs the transformers engine" in trained["message"]
    await client.close()


async def test_several_requests_decode_together_each_as_llama_cpp_alone(gguf_server, binding):
    """llama.cpp's multi-sequence decoding (a sequence per request): the requests overlap, and each greedy
    text is the binding's own for its prompt alone, token for token; a sampled one and a cancelled one
    share the batch."""
    from test_batching import generated_together, together

    prompts = ["What is the capital of France?", "Name a river in Europe.", "Write a haiku about rain.",
               "What is 2 + 2?"]
    results, events = await together(gguf_server, [inference(prompt, 24, repetition_penalty=1.0) for prompt in prompts]
                                     + [inference("Write a poem", 24, temperature=1.0)])
    assert generated_together(events, len(results))
    assert not [message for _, message in events if message["type"] == "queued"]
    for prompt, received in zip(prompts, results):
        assert text_of(received) == binding_answer(binding, prompt, 24)
    assert results[-1][-1]["type"] == "done" and results[-1][-1]["total_tokens"] > 0
    stopped, kept = await Client.open(gguf_server.url), await Client.open(gguf_server.url)
    await stopped.send(inference("Tell me a very long story", 400, request_id="long"))
    await kept.send(inference(prompts[0], 24, repetition_penalty=1.0))
    await stopped.until("token")
    await stopped.send({"type": "cancel", "request_id": "long"})
    assert (await stopped.until("done"))[-1]["finish_reason"] == "cancelled"
    assert text_of(await kept.until("done")) == binding_answer(binding, prompts[0], 24)
    await stopped.close()
    await kept.close()
