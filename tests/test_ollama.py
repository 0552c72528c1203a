"""Ollama's API, driven by the real `ollama` package (and httpx where it has no method): on the default model
under transformers and, from its GGUF, under llama.cpp; on the tiny random model (structured output, which
only constrained decoding can make it write; refusals, the tokens and the admin scope, pull from a local
git-lfs repository and delete, a client that leaves); and images on a tiny LLaVA."""
import base64
import io
import json
import shutil

import httpx
import jsonschema
import ollama
import pytest
from conftest import ENGINES, ONE_AT_A_TIME, engine_server, free_port
from git_repos import lfs_repo_of
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

CONFIG = {"optimization": {"max_batch_size": 4}, "limits": {"max_context_length": 2048}}
TOKEN, ADMIN = "ollama-user", "ollama-admin"
GREEDY = {"temperature": 0, "seed": 7}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": WEATHER}}]
CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
CITY_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                                "parameters": CITY}}]
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}
HELLO = [{"role": "user", "content": "Write a sentence about the sea."}]


@pytest.fixture(scope="module", params=ENGINES)
def server(request, start_server, default_model):
    """The default model on each engine, sharing the module."""
    return engine_server(start_server, default_model, request.param, **CONFIG)


@pytest.fixture(scope="module")
def lfs_repo(tiny_model, tmp_path_factory):
    """A bare git repository on disk whose safetensors are LFS objects, as on Hugging Face."""
    base = tmp_path_factory.mktemp("ollama-repos")
    shutil.copytree(tiny_model, base / "work")
    return lfs_repo_of(base / "work", base / "tiny-lfs.git")


@pytest.fixture(scope="module")
def tiny(start_server, tiny_model, lfs_repo):
    """The tiny model behind a token and an admin token, one request at a time, with a spare model in
    var/models/ (installed, not loaded) and downloads allowed from the local repository's folder."""
    return start_server(tiny_model, lambda root: shutil.copytree(tiny_model, root / "var" / "models" / "spare"),
                        server={"http_port": free_port(), "auth_token": TOKEN, "admin_token": ADMIN},
                        download={"allowed_url_prefixes": [f"file://{lfs_repo.parent}/"]}, optimization=ONE_AT_A_TIME)


def client(server, key: str | None = None) -> ollama.AsyncClient:
    return ollama.AsyncClient(host=server.http_url, timeout=120,
                              headers={"Authorization": f"Bearer {key}"} if key else None)


@pytest.fixture()
def api(server):
    return client(server)


@pytest.fixture()
def user(tiny):
    return client(tiny, TOKEN)


async def served_name(api: ollama.AsyncClient) -> str:
    return (await api.list()).models[0].model


def final_fields_hold(final, most: int) -> None:
    """The final chunk's counts and durations, in Ollama's fields."""
    assert final.done and final.done_reason in ("stop", "length")
    assert 0 < final.eval_count <= most and final.prompt_eval_count > 5 and final.load_duration == 0
    assert final.total_duration >= final.prompt_eval_duration + final.eval_duration > 0


# -- the model endpoints -----------------------------------------------------------------------------------

async def test_list_show_and_ps_describe_the_served_model(api, server):
    name = await served_name(api)
    assert name.endswith(":latest")
    shown = await api.show(name)
    assert {"completion", "tools", "embedding"} <= set(shown.capabilities) and "thinking" not in shown.capabilities
    assert "<|im_start|>" in shown.template  # the model's own chat template
    assert shown.details.format == ("gguf" if server.config["model"]["path"] else "safetensors")
    info = shown.modelinfo
    assert info[f"{shown.details.family}.context_length"] == 2048 and info["general.parameter_count"] > 1e8
    running = (await api.ps()).models
    assert [model.model for model in running] == [name] and running[0].context_length == 2048
    with pytest.raises(ollama.ResponseError) as refused:
        await api.show("llama3.2")
    assert refused.value.status_code == 404


async def test_the_root_and_version_answer_as_ollama_does(tiny):
    async with httpx.AsyncClient(base_url=tiny.http_url) as http:
        assert (await http.get("/")).text == "Ollama is running"  # clients probe it, with no token
        assert (await http.head("/")).status_code == 200
        assert (await http.get("/api/version")).status_code == 401  # the rest needs the token
        version = await http.get("/api/version", headers={"Authorization": f"Bearer {TOKEN}"})
    assert version.json()["version"].count(".") == 2


# -- chat and generate -------------------------------------------------------------------------------------

async def test_chat_streamed_joins_to_the_whole_answer(api):
    name = await served_name(api)
    options = {**GREEDY, "num_predict": 24}
    whole = await api.chat(name, HELLO, options=options)
    parts = [part async for part in await api.chat(name, HELLO, options=options, stream=True)]
    assert whole.message.role == "assistant" and whole.message.content
    assert "".join(part.message.content for part in parts) == whole.message.content
    assert all(not part.done for part in parts[:-1]) and parts[-1].message.content == ""
    final_fields_hold(whole, 24)
    final_fields_hold(parts[-1], 24)
    assert parts[-1].eval_count == whole.eval_count and parts[-1].prompt_eval_count == whole.prompt_eval_count


async def test_generate_whole_streamed_system_and_raw(api):
    name = await served_name(api)
    options = {**GREEDY, "num_predict": 16}
    whole = await api.generate(name, "The sea is", options=options)
    parts = [part async for part in await api.generate(name, "The sea is", options=options, stream=True)]
    assert whole.response and "".join(part.response for part in parts) == whole.response
    final_fields_hold(whole, 16)
    # through the chat template, as chat's turns are: the system's, then the prompt
    chatted = await api.chat(name, [{"role": "user", "content": "The sea is"}], options=options)
    assert (chatted.message.content, chatted.prompt_eval_count) == (whole.response, whole.prompt_eval_count)
    told = await api.generate(name, "The sea is", system="Answer in French.", options=options)
    chatted = await api.chat(name, [{"role": "system", "content": "Answer in French."},
                                    {"role": "user", "content": "The sea is"}], options=options)
    assert (chatted.message.content, chatted.prompt_eval_count) == (told.response, told.prompt_eval_count)
    assert told.response != whole.response
    raw = await api.generate(name, "The sea is", raw=True, options=options)
    assert raw.prompt_eval_count < whole.prompt_eval_count  # no chat template around it
    loaded = await api.generate(name)  # no prompt: Ollama's way to load the model
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""


async def test_num_predict_bounds_the_answer_and_stop_cuts_it(api):
    name = await served_name(api)
    long = await api.chat(name, HELLO, options={**GREEDY, "num_predict": 40})
    short = await api.chat(name, HELLO, options={**GREEDY, "num_predict": 3})
    assert short.eval_count == 3 and short.done_reason == "length"
    assert long.message.content.startswith(short.message.content)
    words = long.message.content.split()
    stop = words[len(words) // 2]
    cut = await api.chat(name, HELLO, options={**GREEDY, "num_predict": 40, "stop": [stop]})
    assert cut.message.content == long.message.content[:long.message.content.index(stop)]
    assert cut.done_reason == "stop"
    unbounded = await api.chat(name, HELLO, options={**GREEDY, "num_predict": -1})
    assert unbounded.eval_count > 3


@pytest.mark.parametrize("shape", ["schema", "json"])
async def test_format_constrains_the_answer(api, shape):
    name = await served_name(api)
    wanted = PERSON if shape == "schema" else "json"
    answer = await api.chat(name, [{"role": "user", "content": "Give a person's name and age as JSON."}], format=wanted,
                            options={**GREEDY, "num_predict": 40})
    person = json.loads(answer.message.content)
    assert isinstance(person, dict)
    if shape == "schema":
        jsonschema.validate(person, PERSON)


async def test_the_tiny_random_model_writes_json_only_by_constrained_decoding(user):
    answer = await user.generate("tiny-llama", "Who?", format=PERSON, options={**GREEDY, "num_predict": 40})
    jsonschema.validate(json.loads(answer.response), PERSON)


async def test_a_required_tool_call_comes_back_in_ollamas_shape(api):
    """The model here calls no tool on its own: tool_choice (this server's extension, which the package does
    not send, so the body goes through its own request machinery) requires one; the package parses it."""
    name = await served_name(api)
    body = {"model": name, "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
            "tools": TOOLS, "tool_choice": "required", "options": {**GREEDY, "num_predict": 40}}
    whole = await api._request(ollama.ChatResponse, "POST", "/api/chat", json={**body, "stream": False})
    call = whole.message.tool_calls[0]
    assert call.function.name == "get_weather" and whole.done_reason == "stop"
    jsonschema.validate(dict(call.function.arguments), WEATHER)
    parts = [part async for part in await api._request(ollama.ChatResponse, "POST", "/api/chat", json=body,
                                                       stream=True)]
    calls = [call for part in parts for call in part.message.tool_calls or []]
    assert calls == [call]  # told once, whole
    # The call and its result go back in Ollama's shape (no ids): the answer comes after them
    turns = [*body["messages"], {"role": "assistant", "content": "", "tool_calls": [{"function": {
        "name": "get_weather", "arguments": dict(call.function.arguments)}}]},
        {"role": "tool", "content": "18 C and sunny", "tool_name": "get_weather"}]
    after = await api.chat(name, turns, tools=TOOLS, options={**GREEDY, "num_predict": 16})
    assert after.message.content and after.prompt_eval_count > whole.prompt_eval_count


async def test_a_model_calls_a_tool_by_itself_and_the_call_comes_back_in_ollamas_shape(api):
    """No tool_choice (Ollama has none): the model decides. After two questions it answered with a call, the
    default model calls get_weather for the third by itself, in its own words (the generic hermes form
    here: its template takes no tools), and the server reads the call out of the text (the parser
    chosen from the template): message.tool_calls, no text, done_reason stop; streamed, the call comes
    once, whole."""
    name = await served_name(api)

    def call(city):
        return {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather",
                                                                              "arguments": {"city": city}}}]}
    turns = [{"role": "user", "content": "What is the weather in London?"}, call("London"),
             {"role": "user", "content": "What is the weather in Berlin?"}, call("Berlin"),
             {"role": "user", "content": "What is the weather in Paris?"}]
    options = {**GREEDY, "num_predict": 40}
    whole = await api.chat(name, turns, tools=CITY_TOOLS, options=options)
    assert [(c.function.name, dict(c.function.arguments)) for c in whole.message.tool_calls or []] == [
        ("get_weather", {"city": "Paris"})], whole.message
    assert whole.message.content == "" and whole.done_reason == "stop"
    parts = [part async for part in await api.chat(name, turns, tools=CITY_TOOLS, options=options, stream=True)]
    assert [c for part in parts for c in part.message.tool_calls or []] == whole.message.tool_calls
    assert "".join(part.message.content for part in parts) == ""  # the call's text is not told as text
    assert parts[-1].done
    plain = await api.chat(name, turns, options=options)  # no tools offered: the same words stay text
    assert not plain.message.tool_calls


# -- refusals, tokens and scope ----------------------------------------------------------------------------

@pytest.mark.parametrize("request_body, status, message", [
    ({"options": {"temperature": "hot"}}, 400, "options.temperature must be a number"),
    ({"options": {"num_predict": 0}}, 400, "options.num_predict must be >= 1"),
    ({"options": {"top_p": 2}}, 400, "options.top_p must be in (0, 1]"),
    ({"options": {"mirostat": 2}}, 400, "options.mirostat is not supported by this server"),
    ({"options": {"stop": "x" * 300}}, 400, "options.stop must be a string or a list"),
    ({"options": {"num_ctx": "big"}}, 400, "options.num_ctx must be a whole number"),
    ({"think": True}, 400, '"tiny-llama:latest" does not support thinking'),
    ({"format": "yaml"}, 400, 'format must be "json" or a JSON schema object'),
    ({"template": "{{ .Prompt }}"}, 400, "template is not supported by this server"),
    ({"context": [1, 2]}, 400, "context is not supported by this server"),
    ({"suffix": "end"}, 400, "suffix is not supported by this server"),
    ({"raw": True, "images": ["aGVsbG8="]}, 400, "images need the chat template"),
    ({"images": ["aGVsbG8="]}, 400, "This model does not take images"),
    ({"model": "spare"}, 404, "model 'spare' is installed but not loaded"),
    ({"model": "llama3.2"}, 404, "model 'llama3.2' not found"),
], ids=lambda value: str(value)[:24])
async def test_refusals_come_as_ollamas_errors(user, request_body, status, message):
    body = {"model": "tiny-llama:latest", "prompt": "Hi", "stream": False, **request_body}
    with pytest.raises(ollama.ResponseError) as refused:
        await user._request(ollama.GenerateResponse, "POST", "/api/generate", json=body)
    assert refused.value.status_code == status and refused.value.error.startswith(message), refused.value.error


async def test_the_package_sends_the_options_and_the_token(tiny, user):
    with pytest.raises(ollama.ResponseError) as refused:
        await user.chat("tiny-llama", HELLO, options={"temperature": "hot"})
    assert refused.value.status_code == 400 and "options.temperature" in refused.value.error
    with pytest.raises(ollama.ResponseError) as unauthorized:
        await client(tiny).list()
    assert unauthorized.value.status_code == 401


async def test_num_ctx_below_the_models_context_caps_prompt_and_answer(user):
    asked = await user.generate("tiny-llama", "Count the waves", options={**GREEDY, "num_predict": 30})
    assert asked.eval_count == 30  # the tiny model writes to its limit
    prompt = asked.prompt_eval_count
    capped = await user.generate("tiny-llama", "Count the waves", options={**GREEDY, "num_predict": 30,
                                                                           "num_ctx": prompt + 4})
    assert capped.eval_count == 4 and capped.done_reason == "length"
    assert asked.response.startswith(capped.response)
    roomy = await user.generate("tiny-llama", "Count the waves", options={**GREEDY, "num_predict": 30,
                                                                          "num_ctx": 10 ** 6})
    assert roomy.response == asked.response  # above the model's context, that is the cap
    with pytest.raises(ollama.ResponseError) as refused:
        await user.generate("tiny-llama", "Count the waves", options={"num_ctx": prompt})
    assert refused.value.status_code == 400 and "leaves no room" in refused.value.error


async def test_pull_from_a_git_lfs_repository_and_delete_need_the_admin_scope(tiny, user, lfs_repo):
    url = f"file://{lfs_repo}"
    with pytest.raises(ollama.ResponseError) as refused:
        await user.pull(url)
    assert refused.value.status_code == 403 and "admin" in refused.value.error
    admin = client(tiny, ADMIN)
    statuses = [part async for part in await admin.pull(url, stream=True)]
    texts = [part.status for part in statuses]
    assert texts[0] == "Starting download..." and "Using git + git-lfs" in texts and texts[-1] == "success"
    assert any(text.startswith("Downloading LFS objects (") for text in texts)
    names = [model.model for model in (await admin.list()).models]
    assert names[0] == "tiny-llama:latest" and {"tiny-lfs:latest", "spare:latest"} <= set(names)
    assert (await admin.show("tiny-lfs")).details.family == "llama"
    with pytest.raises(ollama.ResponseError) as again:
        await admin.pull(url)
    assert again.value.status_code == 400 and "models/tiny-lfs exists already" in again.value.error
    with pytest.raises(ollama.ResponseError) as outside:
        await admin.pull("https://example.com/org/model")
    assert outside.value.status_code == 400 and "repo must start with one of" in outside.value.error
    with pytest.raises(ollama.ResponseError) as library:
        await admin.pull("llama3.2:1b")
    assert library.value.status_code == 400 and "tags are not supported" in library.value.error
    # delete: var/models/ only, as delete_model
    with pytest.raises(ollama.ResponseError) as operators:
        await admin.delete("tiny-lfs")
    assert operators.value.status_code == 400 and "must be deleted manually" in operators.value.error
    with pytest.raises(ollama.ResponseError) as scoped:
        await user.delete("spare")
    assert scoped.value.status_code == 403
    assert (await admin.delete("spare:latest")).status == "success"
    assert not (tiny.root / "var" / "models" / "spare").exists()
    assert "spare:latest" not in [model.model for model in (await admin.list()).models]
    with pytest.raises(ollama.ResponseError) as gone:
        await admin.delete("spare")
    assert gone.value.status_code == 404


async def metrics(server) -> dict:
    async with httpx.AsyncClient(base_url=server.http_url, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        text = (await http.get("/metrics")).text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


async def test_a_client_that_drops_a_stream_cancels_the_job(tiny, user):
    before = await metrics(tiny)
    stream = await user.generate("tiny-llama", "Go on", options={**GREEDY, "num_predict": 1500}, stream=True)
    async for part in stream:
        if part.response:
            break
    await stream.aclose()
    await tiny.wait_for_output("cancelled: its HTTP client left")
    # one at a time: this one starts once the one before has ended
    assert (await user.generate("tiny-llama", "Go on", options={"num_predict": 4})).eval_count == 4
    after = await metrics(tiny)
    cancelled = ("llmws_requests_total", (("outcome", "cancelled"),))
    assert after[cancelled] - before.get(cancelled, 0) == 1
    generated = ("llmws_generated_tokens_total", ())
    assert after[generated] - before.get(generated, 0) < 1500 + 4


# -- embeddings --------------------------------------------------------------------------------------------

async def test_embed_and_the_older_embeddings(api):
    name = await served_name(api)
    texts = ["The cat sat on the mat.", "Stock prices fell sharply today."]
    together = await api.embed(name, [*texts, texts[0]])
    vectors = together.embeddings
    assert len(vectors) == 3 and len(vectors[0]) == 576 and together.prompt_eval_count > 10
    assert vectors[2] == pytest.approx(vectors[0], abs=1e-6) and vectors[1] != pytest.approx(vectors[0], abs=1e-2)
    alone = (await api.embed(name, texts[1])).embeddings[0]
    assert max(abs(x - y) for x, y in zip(alone, vectors[1])) < 1e-4
    older = (await api.embeddings(name, texts[1])).embedding
    assert older == pytest.approx(alone, abs=1e-6)
    with pytest.raises(ollama.ResponseError) as refused:
        await api.embed(name, texts[0], dimensions=3)
    assert refused.value.status_code == 400 and "576 dimensions" in refused.value.error


# -- images ------------------------------------------------------------------------------------------------

def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(out, "PNG")
    return out.getvalue()


async def test_images_go_to_a_vision_model(start_server, vision_models):
    server = start_server(vision_models["llava"], server={"http_port": free_port()})
    api = client(server)
    name = await served_name(api)
    assert "vision" in (await api.show(name)).capabilities
    options = {**GREEDY, "num_predict": 8}
    plain = await api.chat(name, [{"role": "user", "content": "What is this?"}], options=options)
    seen = await api.chat(name, [{"role": "user", "content": "What is this?", "images": [png()]}], options=options)
    told = await api.generate(name, "What is this?", images=[base64.b64encode(png()).decode()], options=options)
    assert seen.prompt_eval_count > plain.prompt_eval_count and told.prompt_eval_count > plain.prompt_eval_count
    assert seen.eval_count == told.eval_count == 8
