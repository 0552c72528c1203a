"""Images: tiny Idefics3 and LLaVA models answer requests with images in every shape the protocol takes,
bad images are refused cleanly, image streams resume, and the CLI sends images."""
import asyncio
import base64
import io
import json
import os
import random
import shutil
import sys

import openai
import pexpect
import pytest
from conftest import BLOCKER, REPO, Client, free_port, inference, text_of
from PIL import Image

FAMILIES = ["idefics3", "llava"]


def png(width=40, height=30, colour=(200, 30, 30), noise=False) -> bytes:
    image = Image.new("RGB", (width, height), colour)
    if noise:
        image = Image.frombytes("RGB", (width, height), random.Random(0).randbytes(width * height * 3))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def data_url(data: bytes, kind="png") -> str:
    return f"data:image/{kind};base64,{base64.b64encode(data).decode()}"


RED, BLUE = data_url(png()), data_url(png(colour=(20, 20, 220)))


@pytest.fixture(scope="module")
def vision_servers(start_server, vision_models, tiny_model):
    """One server per family, with the tiny text model and its own model in models/ for switching."""
    def populate_for(family):
        def populate(root):
            shutil.copytree(tiny_model, root / "models" / "tiny-text")
            shutil.copytree(vision_models[family], root / "models" / f"tiny-{family}")
        return populate
    return {family: start_server(vision_models[family], populate_for(family),
                                 limits={"max_image_bytes": 30000, "max_image_pixels": 1_000_000,
                                         "max_request_pixels": 1_500_000, "max_images_per_request": 3})
            for family in FAMILIES}


def with_images(images, user="What is in the picture?", max_new_tokens=8, **fields):
    message = inference(user, max_new_tokens=max_new_tokens)
    message["prompt"]["images"] = images
    message.update(fields)
    return message


@pytest.mark.parametrize("family", FAMILIES)
async def test_one_and_two_images_are_answered_and_counted(vision_servers, family):
    client = await Client.open(vision_servers[family].url)
    assert client.welcome["capabilities"]["vision"] is True
    starts = {}
    for count, images in [(0, []), (1, [RED]), (2, [RED, BLUE])]:
        messages = await client.until_done(with_images(images))
        start = next(m for m in messages if m["type"] == "start")
        assert start["images_in"] == count and messages[-1]["total_tokens"] == 8 and text_of(messages)
        starts[count] = start["tokens_in"]
    assert starts[0] < starts[1] < starts[2]  # an image's tokens count in tokens_in
    await client.close()


@pytest.mark.parametrize("shape", ["prompt.images", "images", "content parts", "bare base64"])
async def test_every_shape_of_image_gives_the_same_answer(vision_servers, shape):
    client = await Client.open(vision_servers["idefics3"].url)
    reference = text_of(await client.until_done(with_images([RED])))
    message = inference("What is in the picture?", max_new_tokens=8)
    if shape == "images":
        message["images"] = [RED]
    elif shape == "bare base64":
        message["prompt"]["images"] = [RED.split(",", 1)[1]]
    elif shape == "content parts":
        del message["prompt"]
        message["messages"] = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": RED}},
                                                             {"type": "text", "text": "What is in the picture?"}]}]
    else:
        message["prompt"]["images"] = [RED]
    assert text_of(await client.until_done(message)) == reference
    await client.close()


@pytest.mark.parametrize("family", FAMILIES)
async def test_the_answer_depends_on_the_images_pixels(vision_servers, family):
    """The model sees the pixels sent: two images that differ only in colour get different answers, the same
    image the same answer."""
    client = await Client.open(vision_servers[family].url)
    red, blue, red_again = [text_of(await client.until_done(with_images([image]))) for image in (RED, BLUE, RED)]
    assert red == red_again != blue
    await client.close()


def encoded(image_png: bytes, kind: str) -> bytes:
    """The same picture in another format (WebP lossless); GIF's palette holds a plain colour exactly."""
    out = io.BytesIO()
    Image.open(io.BytesIO(image_png)).save(out, kind.upper(), **({"lossless": True} if kind == "webp" else {}))
    return out.getvalue()


@pytest.mark.parametrize("kind", ["jpeg", "gif", "webp", "bmp"])
async def test_jpeg_gif_webp_and_bmp_images_are_decoded_to_their_pixels(vision_servers, kind):
    """Each format the README names is taken and decoded: its answer is that of a PNG of the pixels it
    decodes to (Pillow's reading, the same as the server's), and it differs from another colour's."""
    image = encoded(png(), kind)
    assert Image.open(io.BytesIO(image)).format == kind.upper()
    decoded = io.BytesIO()
    Image.open(io.BytesIO(image)).convert("RGB").save(decoded, "PNG")
    client = await Client.open(vision_servers["idefics3"].url)
    messages = await client.until_done(with_images([data_url(image, kind)]))
    assert next(m for m in messages if m["type"] == "start")["images_in"] == 1 and messages[-1]["type"] == "done"
    as_png = text_of(await client.until_done(with_images([data_url(decoded.getvalue())])))
    other_colour = text_of(await client.until_done(with_images([BLUE])))
    assert text_of(messages) == as_png != other_colour
    await client.close()


def chat(turns: list[dict], **fields) -> dict:
    return {"type": "inference", "messages": turns, "config": {"temperature": 0, "max_new_tokens": 8}, **fields}


def conversation(image_in_turn: int | None = None) -> list[dict]:
    """Two user turns and an answer between; `image_in_turn` (an index) gives that turn RED as a content part."""
    turns = [{"role": "user", "content": "Look at this."}, {"role": "assistant", "content": "I see it."},
             {"role": "user", "content": "What is in the picture?"}]
    if image_in_turn is not None:
        turn = turns[image_in_turn]
        turn["content"] = [{"type": "image_url", "image_url": {"url": RED}}, {"type": "text", "text": turn["content"]}]
    return turns


async def test_top_level_images_go_with_the_last_user_turn(vision_servers):
    """The original server's top-level `images` belong to the conversation's last user turn: the answer is that
    of the same image given in that turn's content parts, not in the first user turn's."""
    client = await Client.open(vision_servers["idefics3"].url)
    top_level = text_of(await client.until_done(chat(conversation(), images=[RED])))
    in_the_last_turn = text_of(await client.until_done(chat(conversation(image_in_turn=2))))
    in_the_first_turn = text_of(await client.until_done(chat(conversation(image_in_turn=0))))
    assert top_level == in_the_last_turn != in_the_first_turn
    await client.close()


def template_in_fixed_order(images_first: bool) -> str:
    """CHAT_TEMPLATE, but a turn's images go before its text (images_first) or after it, whatever the order of
    the parts it is given."""
    images = "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>{% endif %}{% endfor %}"
    text = ("{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
            "{% endfor %}")
    return ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
            "{{ message['content'] }}{% else %}" + (images + text if images_first else text + images)
            + "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


async def test_a_turn_s_images_reach_the_model_before_its_text(start_server, vision_models):
    """The server gives the chat template a turn's images, then its text (as SmolVLM's family expects): the
    model, whose template takes the parts in the order given, answers as the same model does with a template
    that puts images first, and not as with one that puts them after the text."""
    def populate(root):
        for name, images_first in (("images-first", True), ("images-last", False)):
            folder = shutil.copytree(vision_models["idefics3"], root / "models" / name)
            (folder / "chat_template.jinja").write_text(template_in_fixed_order(images_first))
    server = start_server(vision_models["idefics3"], populate)
    client = await Client.open(server.url)
    answers = {"as given": text_of(await client.until_done(with_images([RED])))}
    for name in ("images-first", "images-last"):
        switched = await client.until_done({"type": "switch_model", "model_path": f"models/{name}"}, "model_switched")
        assert switched[-1]["type"] == "model_switched", switched[-1]
        answers[name] = text_of(await client.until_done(with_images([RED])))
    assert answers["as given"] == answers["images-first"] != answers["images-last"], answers
    await client.close()


def tiff() -> str:
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, "TIFF")
    return base64.b64encode(out.getvalue()).decode()


@pytest.mark.parametrize("images, problem", [
    (["not base64 at all!"], "images[0] is not valid base64"),
    ([base64.b64encode(b"just some text").decode()], "images[0] is not an image Pillow can read"),
    ([tiff()], "images[0]: TIFF images are not supported"),
    ([RED, data_url(png(120, 120, noise=True))], "images[1] is over limits.max_image_bytes (30000 bytes)"),
    ([data_url(png(2000, 1000))], "images[0] is 2000x1000: over limits.max_image_pixels (1000000)"),
    ([data_url(png(1000, 1000))] * 2, "2 images of 2000000 pixels in all: over limits.max_request_pixels (1500000)"),
    ([data_url(png(400, 300)[:200])], "images[0] is not an image Pillow can read"),  # a whole header, cut data
    ([RED] * 4, "4 images: at most 3 a request"),
    (["https://example.com/cat.png"], "the server fetches no URL and reads no file"),
    (["/etc/passwd"], "the server fetches no URL and reads no file"),
    (["data:text/plain;base64,aGVsbG8="], "a data URL must be data:image/<format>;base64,<data>"),
    ([42], "prompt.images must be a list of images"),
])
async def test_bad_images_are_refused_and_the_next_request_is_served(vision_servers, images, problem):
    client = await Client.open(vision_servers["llava"].url)
    refused = await client.request(with_images(images))
    assert refused["type"] == "error" and problem in refused["message"], refused
    assert (await client.until_done(with_images([RED])))[-1]["total_tokens"] == 8
    await client.close()


async def test_image_tokens_that_overflow_the_context_are_refused_with_the_fields(vision_servers):
    client = await Client.open(vision_servers["idefics3"].url)
    max_context = client.welcome["capabilities"]["max_context"]
    text = " ".join(["word"] * (max_context - 12))  # fits alone, not with two images' tokens
    assert (await client.until_done(with_images([], user=text, max_new_tokens=1)))[-1]["type"] == "done"
    refused = (await client.until_done(with_images([RED, BLUE], user=text)))[-1]
    assert refused["type"] == "error" and refused["message"].startswith("Context too long")
    assert refused["max_context"] == max_context and refused["input_length"] > max_context - 12
    await client.close()


async def test_an_image_request_resumes_mid_answer_byte_for_byte(vision_servers):
    url = vision_servers["llava"].url
    client = await Client.open(url)
    whole = await client.until_done(with_images([RED, BLUE], max_new_tokens=300, request_id="whole"))
    await client.send(with_images([RED, BLUE], max_new_tokens=300, request_id="cut"))
    seen = [await client.recv() for _ in range(6)]
    await client.ws.close()  # the line drops mid-answer
    back = await Client.open(url, {"session_id": client.session_id, "last_seq": seen[-1]["seq"]})
    assert back.welcome["resumed"] is True
    rest = await back.until("done")
    assert rest[0]["seq"] == seen[-1]["seq"] + 1
    assert text_of(seen + rest) == text_of(whole) and rest[-1]["total_tokens"] == 300
    buffer = (vision_servers["llava"].sessions_dir / client.session_id / "buffer.jsonl").read_text()
    assert RED.split(",", 1)[1][:40] not in buffer  # the buffer holds answers, not the images
    await back.close()


async def test_switching_text_to_vision_and_back(vision_servers):
    client = await Client.open(vision_servers["idefics3"].url)
    for path, vision in [("models/tiny-text", False), ("models/tiny-idefics3", True), ("models/tiny-text", False),
                         ("models/tiny-idefics3", True)]:
        switched = await client.until_done({"type": "switch_model", "model_path": path}, "model_switched")
        assert switched[-1]["type"] == "model_switched"
        resources = await client.request({"type": "get_resources"})
        assert resources["model"]["vision"] is vision
        newcomer = await Client.open(vision_servers["idefics3"].url)
        assert newcomer.welcome["capabilities"]["vision"] is vision
        await newcomer.close()
        reply = (await client.until_done(with_images([RED])))[-1]
        if vision:
            assert reply["type"] == "done"
        else:
            assert reply["type"] == "error" and "This model does not take images: tiny-text" in reply["message"]
    await client.close()


def test_llm_py_sends_images(vision_servers, tmp_path):
    picture = tmp_path / "red.png"
    picture.write_bytes(png())
    port = str(vision_servers["idefics3"].port)
    output, status = pexpect.run(f"{sys.executable} {REPO / 'llm.py'} --host 127.0.0.1 --port {port} "
                                 f"--prompt 'What is this?' --image {picture} --image {picture} --json "
                                 "--max-tokens 4 --temperature 0", withexitstatus=True, timeout=120,
                                 encoding="utf-8")
    assert status == 0, output
    assert '"images_in": 2' in output and '"total_tokens": 4' in output
    text_only = tmp_path / "notes.txt"
    text_only.write_text("hello")
    output, status = pexpect.run(f"{sys.executable} {REPO / 'llm.py'} --host 127.0.0.1 --port {port} "
                                 f"--prompt hi --image {text_only}", withexitstatus=True, timeout=120,
                                 encoding="utf-8")
    assert status == 1 and "is not a PNG, JPEG, GIF, WebP or BMP image" in output


def test_the_repl_attaches_an_image_to_the_next_question(vision_servers, tmp_path):
    picture = tmp_path / "red.png"
    picture.write_bytes(png())
    repl = pexpect.spawn(sys.executable, [str(REPO / "llm.py"), "--port", str(vision_servers["llava"].port),
                                          "--host", "127.0.0.1", "--max-tokens", "6", "--temperature", "0"],
                         env={**os.environ, "HOME": str(tmp_path)}, encoding="utf-8", timeout=60)
    repl.expect("you> ")
    repl.sendline(f"/image {picture}")
    repl.expect(r"attached red.png \(1 image for your next question\)")
    repl.expect("you> ")
    repl.sendline("What colour is it?")
    repl.expect(r"\[6 tokens")
    repl.expect("you> ")
    repl.sendline("/quit")
    repl.expect(pexpect.EOF)


@pytest.mark.skipif(not shutil.which("chromium") and not os.environ.get("CI"),
                    reason="Debian's chromium is not installed")
def test_the_page_attaches_an_image_and_shows_the_streamed_answer(vision_servers, tmp_path):
    from playwright.sync_api import expect, sync_playwright
    from test_web import CHROMIUM, FLAGS

    picture, notes = tmp_path / "red.png", tmp_path / "notes.txt"
    picture.write_bytes(png())
    notes.write_text("not an image")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page()
        sent = []
        page.on("websocket", lambda ws: ws.on("framesent", lambda payload: sent.append(payload)))
        page.goto(f"http://127.0.0.1:{vision_servers['idefics3'].port}/")
        expect(page.locator("#status")).to_have_text("connected")
        page.fill("#temperature", "0")
        page.fill("#max_new_tokens", "6")
        page.set_input_files("#imageFile", str(notes))
        expect(page.locator("#notice")).to_contain_text("notes.txt is not an image the server takes")
        page.set_input_files("#imageFile", str(picture))
        expect(page.locator("#attachments img")).to_have_count(1)
        page.fill("#prompt", "What colour is it?")
        page.click("#send")
        expect(page.locator(".turn.assistant .stats")).to_contain_text("6 tokens")
        expect(page.locator(".turn.user img")).to_have_count(1)
        expect(page.locator("#attachments img")).to_have_count(0)
        request = next(json.loads(frame) for frame in sent if '"inference"' in frame)
        parts = request["messages"][-1]["content"]
        assert parts[0]["type"] == "image_url" and parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
        assert parts[-1] == {"type": "text", "text": "What colour is it?"}
        assert page.text_content(".turn.assistant .body")
        browser.close()


async def test_with_batching_on_image_and_text_requests_are_all_answered(start_server, vision_models):
    server = start_server(vision_models["llava"], optimization={"max_batch_size": 4},
                          generation_defaults={"repetition_penalty": 1.0})
    clients = [await Client.open(server.url) for _ in range(3)]
    requests = [with_images([RED], max_new_tokens=20), inference("plain text", max_new_tokens=20),
                with_images([RED, BLUE], max_new_tokens=20)]
    events = []  # (client, type, images_in)

    async def follow(index, client, message):
        for received in await client.until_done(message):
            events.append((index, received["type"], received.get("images_in")))

    await asyncio.gather(*(follow(index, client, message)
                           for index, (client, message) in enumerate(zip(clients, requests))))
    starts = {index: images for index, kind, images in events if kind == "start"}
    assert starts == {0: 1, 1: 0, 2: 2}
    assert sum(kind == "done" for _, kind, _ in events) == 3
    for client in clients:
        await client.close()


async def test_the_openai_api_takes_images_as_content_parts(start_server, vision_models):
    """The `openai` package's image_url parts reach the model as the WebSocket's images do: same answer."""
    server = start_server(vision_models["idefics3"], server={"http_port": free_port()})
    client = await Client.open(server.url)
    reference = await client.until_done(with_images([RED]))
    await client.close()
    api = openai.AsyncOpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0)
    parts = [{"type": "image_url", "image_url": {"url": RED}}, {"type": "text", "text": "What is in the picture?"}]
    completion = await api.chat.completions.create(model="any", messages=[{"role": "user", "content": parts}],
                                                   max_tokens=8, temperature=0)
    assert completion.choices[0].message.content == text_of(reference)
    start = next(m for m in reference if m["type"] == "start")
    assert completion.usage.prompt_tokens == start["tokens_in"]
    with pytest.raises(openai.BadRequestError) as refused:
        await api.chat.completions.create(model="any", max_tokens=8, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, {"type": "text", "text": "x"}]}])
    assert "images[0]" in refused.value.body["message"]


async def test_queued_image_requests_hold_their_compressed_bytes_not_their_pixels(start_server, vision_models):
    """#43.5: an image request's pixels are decoded when it starts. Ten requests with one 6000x6000 image
    each (about 100 MB of pixels apiece) wait behind a long answer, and the server grows by far less than
    their pixels; cancelled, they never decode, and the next image request is answered."""
    import psutil

    server = start_server(vision_models["llava"])
    process = psutil.Process(server.process.pid)
    client = await Client.open(server.url)
    await client.send(BLOCKER)
    await client.until("start")
    before = process.memory_info().rss
    big = data_url(png(6000, 6000, colour=(128, 128, 128)))
    for index in range(10):
        await client.send(with_images([big], request_id=f"big-{index}"))
    waiting: set[str] = set()
    while len(waiting) < 10:  # each told its place: all ten wait
        message = await client.recv()
        if message["type"] == "queued":
            waiting.add(message["request_id"])
    grown = process.memory_info().rss - before
    assert grown < 300 * 1024 ** 2, f"the server grew by {grown // 1024 ** 2} MB with ten queued images"
    for request_id in [f"big-{index}" for index in range(10)] + ["blocker"]:
        await client.send({"type": "cancel", "request_id": request_id})
    await client.send(with_images([RED], request_id="after"))
    message: dict = {}
    while not (message.get("request_id") == "after" and message["type"] in ("done", "error")):
        message = await client.recv()
    assert message["type"] == "done", message
    await client.close()
