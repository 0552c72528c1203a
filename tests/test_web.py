"""The web client in a real headless Chromium (Debian's), served by the server itself and opened from disk."""
import asyncio
import concurrent.futures
import json
import os
import shutil
import threading

import pytest
from conftest import REPO

from llm import LLMWSEnhancedClient

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-quic"]

# On CI a missing browser is a failure, not a skip.
pytestmark = pytest.mark.skipif(not shutil.which("chromium") and not os.environ.get("CI"),
                                reason="Debian's chromium is not installed")


def offline(context):
    """Let the page reach only files and loopback: anything else would mean it is not self-contained."""
    def route(request_route):
        url = request_route.request.url
        local = url.startswith(("file:", "data:", "http://127.0.0.1", "http://localhost"))
        (request_route.continue_ if local else request_route.abort)()
    context.route("**/*", route)
    return context


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, tiny_server):
    context = browser.new_context(bypass_csp=True)  # the tests evaluate script in the page; the CSP forbids eval
    page = context.new_page()
    page.goto(f"http://127.0.0.1:{tiny_server.port}/")  # served by the server, it connects by itself
    page.wait_for_function("document.getElementById('status').textContent === 'connected'")
    yield page
    context.close()


def reference(server, prompt, **config):
    """The same request through the Python client (in a thread: Playwright's loop owns this one)."""
    async def answer():
        async with LLMWSEnhancedClient("127.0.0.1", server.port) as client:
            return await client.inference(prompt, **config)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, answer()).result()


def watch_sockets(page) -> list:
    """[(frames sent, frames received)] per WebSocket the page opens from now on."""
    sockets = []

    def watch(websocket):
        sent, received = [], []
        websocket.on("framesent", lambda payload: sent.append(json.loads(payload)))
        websocket.on("framereceived", lambda payload: received.append(json.loads(payload)))
        sockets.append((sent, received))

    page.on("websocket", watch)
    return sockets


def assert_replayed_from_the_next_seq(received: list, last_seq: int) -> None:
    """The protocol under the page's own de-duplication: the frames a resumed connection got (as the browser
    received them) are numbered from the last seq the page saw + 1, rising by one: none replayed again, none
    skipped."""
    numbered = [m["seq"] for m in received if "seq" in m]
    assert numbered and numbered == list(range(last_seq + 1, last_seq + 1 + len(numbered))), (last_seq, numbered)


def set_greedy(page, max_new_tokens):
    """Settings apply by themselves: no Apply button."""
    page.fill("#temperature", "0")
    page.fill("#max_new_tokens", str(max_new_tokens))
    page.wait_for_function("document.getElementById('configState').textContent === 'applied'")


def test_served_page_connects_and_shows_the_welcome(page, tiny_server):
    assert page.locator("#modelPicker option:checked").text_content() == "tiny-llama"
    assert page.text_content("#device") == "cpu"
    session_id = page.text_content("#sessionId")
    assert len(session_id) == 36 and page.evaluate("sessionStorage.getItem('llmws.session')") == session_id
    assert page.evaluate("localStorage.getItem('llmws.session')") is None  # a secret: gone with the tab
    assert page.input_value("#address") == f"127.0.0.1:{tiny_server.port}"


def test_chat_streams_an_answer_with_stats(page, tiny_server):
    set_greedy(page, 30)
    page.fill("#prompt", "Tell me about rivers")
    page.press("#prompt", "Enter")
    page.wait_for_function("state.history.length === 2")
    assert page.evaluate("state.history[1].content") == reference(tiny_server, "Tell me about rivers",
                                                                  temperature=0, max_new_tokens=30)
    assert "30 tokens" in page.text_content(".turn.assistant .stats")
    assert page.locator(".turn.user .body").text_content() == "Tell me about rivers"


def test_a_streamed_answer_is_rendered_at_most_once_a_frame_and_in_full_at_the_end(page, tiny_server):
    """Rendering works on the whole answer so far, so the page renders it at the next animation frame,
    once however many tokens came before it (not once per token: quadratic in the answer's length), and
    the finished answer in full."""
    set_greedy(page, 200)
    page.evaluate("""(() => {
        window.counts = { renders: 0, frames: 0, tokens: 0 };
        const render_ = render, token = handlers.token;
        window.renderAlone = render_;
        render = (element, text) => { counts.renders += 1; render_(element, text); };
        handlers.token = (m) => { counts.tokens += 1; token(m); };
        (function tick() { counts.frames += 1; requestAnimationFrame(tick); })();
    })()""")
    page.fill("#prompt", "A long story")
    page.click("#send")
    page.wait_for_function("state.history.length === 2", timeout=60000)
    counts = page.evaluate("counts")
    assert counts["tokens"] >= 100 and counts["renders"] <= counts["frames"] + 1  # the last one is the finish's
    assert page.evaluate("""(() => { const whole = document.createElement('div');
        renderAlone(whole, state.history[1].content);
        return whole.innerHTML === document.querySelector('.turn.assistant .body').innerHTML; })()""")
    assert page.evaluate("state.history[1].content") == reference(tiny_server, "A long story", temperature=0,
                                                                  max_new_tokens=200)


def test_a_dropped_connection_resumes_the_answer_with_no_gap(page, tiny_server):
    sockets = watch_sockets(page)
    set_greedy(page, 400)
    page.fill("#prompt", "A long story")
    page.click("#send")
    page.wait_for_function("state.current && state.current.text.length > 10")
    # The line drops mid-answer (a closing socket delivers nothing more); the page reconnects by itself.
    cut = page.evaluate("(() => { const seen = state.lastSeq; state.ws.close(); return seen; })()")
    page.wait_for_function("state.history.length === 2", timeout=60000)
    assert page.evaluate("state.history[1].content") == reference(tiny_server, "A long story", temperature=0,
                                                                  max_new_tokens=400)
    (sent, received), = sockets  # the one the page opened to reconnect
    assert sent[0] == {"session_id": page.text_content("#sessionId"), "last_seq": cut}
    assert received[0]["type"] == "welcome" and received[0]["resumed"] is True
    assert not [frame for frame in sent if frame.get("type") == "inference"]  # resumed, not asked again
    streamed = [m for m in received if m.get("type") == "token"]
    assert streamed and streamed[0]["seq"] == cut + 1  # still generating at the cut: the rest came after it
    assert_replayed_from_the_next_seq(received, cut)


def test_a_question_lost_in_a_cut_is_asked_again_and_answered_once(page, tiny_server):
    """The line drops as the question goes out, taking it along: the page, resumed with nothing of the
    answer yet, sends the same frame again, and it is answered once."""
    set_greedy(page, 20)
    page.evaluate("""(() => { const ws = state.ws, send = ws.send.bind(ws);
        ws.send = (data) => (JSON.parse(data).type === 'inference' ? ws.close() : send(data)); })()""")
    sockets = watch_sockets(page)
    page.fill("#prompt", "Name a colour")
    page.click("#send")
    page.wait_for_function("state.history.length === 2", timeout=60000)
    assert page.evaluate("state.history[1].content") == reference(tiny_server, "Name a colour", temperature=0,
                                                                  max_new_tokens=20)
    (sent, received), = sockets  # the one the page opened to reconnect
    assert received[0]["type"] == "welcome" and received[0]["resumed"] is True
    assert_replayed_from_the_next_seq(received, sent[0]["last_seq"])
    asked = [frame for frame in sent if frame.get("type") == "inference"]
    starts = [m for m in received if m.get("type") == "start"]
    assert len(asked) == 1 and len(starts) == 1 and starts[0]["request_id"] == asked[0]["request_id"]


def test_stop_cancels_the_answer(page):
    set_greedy(page, 4000)
    page.fill("#prompt", "Go on and on")
    page.click("#send")
    page.wait_for_function("state.current && state.current.text.length > 5")
    page.click("#stop")
    page.wait_for_function("document.querySelector('.turn.assistant .stats').textContent.includes('cancelled')")


def test_errors_show_inline_and_the_panel_shows_what_holds(page):
    page.fill("#top_k", "-5")
    page.wait_for_function("document.getElementById('notice').textContent.includes('top_k')")
    page.wait_for_function("document.getElementById('configState').textContent.startsWith('refused')")
    page.wait_for_function("document.getElementById('top_k').value === '50'")  # the session's value, unchanged


def test_markdown_is_rendered_and_model_html_is_never_run(page):
    html = page.evaluate("""() => { const d = document.createElement('div');
        render(d, '<img src=x onerror="window.pwned=1"> **bold** `x<y`\\n```python\\nprint("<b>")\\n```\\nafter'); """
        """return d.innerHTML; }""")
    assert "<img" not in html and "&lt;img" in html
    assert "<strong>bold</strong>" in html and "<code>x&lt;y</code>" in html
    assert ('<pre><button class="copy">copy</button><code>print(<span class="str">"&lt;b&gt;"</span>)</code></pre>after'
            in html.replace("&quot;", '"'))
    assert "<br><pre>" not in html and "</pre><br>" not in html  # no blank lines around a code block


@pytest.mark.parametrize("language, code, spans", [
    ("python", 'def f(x):  # add\n    return x + 1.5 if x else "no"',
     [["kw", "def"], ["com", "# add"], ["kw", "return"], ["num", "1.5"], ["kw", "if"], ["kw", "else"],
      ["str", '"no"']]),
    ("js", "const n = 0x1F; // hex", [["kw", "const"], ["num", "0x1F"], ["com", "// hex"]]),
    ("sql", "SELECT name FROM t -- all", [["kw", "SELECT"], ["kw", "FROM"], ["com", "-- all"]]),
    ("bash", "for f in *.txt; do echo 'x # y'; done", [["kw", "for"], ["kw", "in"], ["kw", "do"], ["kw", "echo"],
                                                     ["str", "'x # y'"], ["kw", "done"]]),
    ("rust", "fn main() { let s = \"/* no */\"; } /* yes */", [["kw", "fn"], ["kw", "let"], ["str", '"/* no */"'],
                                                              ["com", "/* yes */"]]),
    ("python", 's = "def"  # return', [["str", '"def"'], ["com", "# return"]]),  # no keyword inside either
])
def test_code_is_highlighted_by_language(page, language, code, spans):
    found = page.evaluate("""([code, language]) => { const d = document.createElement('code');
        d.innerHTML = highlight(code, language); return [d.textContent, """
        """[...d.querySelectorAll('span')].map(s => [s.className, s.textContent])]; }""",
                          [code, language])
    assert found == [code, spans]


def test_resources_panel_shows_device_and_context(page):
    page.click("#resourcesPanel summary")
    page.wait_for_function("document.getElementById('resources').textContent.includes('max context')")
    assert "4096" in page.text_content("#resources")


def test_model_fields_are_shown_as_text(page):
    # The page's own list first (asked for on connecting), or it could land after this one and replace it
    page.wait_for_function("state.modelsShown !== ''")
    page.evaluate("""showModels([{name: '<b>n</b>', source: '<img src=x onerror="window.pwned=1">',
                                 size_mb: '<i>1</i>', loaded: false, path: 'x'}])""")
    assert page.locator("#models img, #models b, #models i").count() == 0
    assert '<img src=x onerror="window.pwned=1">' in page.text_content("#models")
    assert page.evaluate("window.pwned") is None


def test_the_page_works_under_its_own_content_security_policy(browser, tiny_server):
    from playwright.sync_api import expect

    context = browser.new_context()
    page = context.new_page()
    errors = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.goto(f"http://127.0.0.1:{tiny_server.port}/")
    expect(page.locator("#status")).to_have_text("connected")
    page.fill("#temperature", "0")
    page.fill("#max_new_tokens", "5")  # sent with the question, which follows at once
    page.fill("#prompt", "Hi")
    page.click("#send")
    expect(page.locator(".turn.assistant .stats")).to_contain_text("5 tokens")
    assert not [text for text in errors if "Content Security Policy" in text]
    context.close()


def test_the_page_is_served_with_security_headers(page, tiny_server):
    response = page.request.get(f"http://127.0.0.1:{tiny_server.port}/")
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    assert response.headers["x-frame-options"] == "DENY" and response.headers["x-content-type-options"] == "nosniff"
    head = page.request.head(f"http://127.0.0.1:{tiny_server.port}/")
    assert head.status == 200 and head.body() == b""
    for method in ("POST", "DELETE", "OPTIONS"):
        refused = page.request.fetch(f"http://127.0.0.1:{tiny_server.port}/", method=method)
        assert refused.status == 405 and refused.headers["allow"] == "GET, HEAD"


def test_a_sandboxed_frame_on_any_site_is_refused(browser, tiny_server):
    """A sandboxed iframe sends Origin "null": any website could make one, so it is not let in."""
    context = browser.new_context()
    page = context.new_page()
    page.set_content(f"""<iframe sandbox="allow-scripts" srcdoc="<script>
        const ws = new WebSocket('ws://127.0.0.1:{tiny_server.port}/');
        ws.onopen = () => ws.send(JSON.stringify({{}}));
        ws.onmessage = () => parent.postMessage('in', '*'); ws.onerror = () => parent.postMessage('refused', '*');
        </script>"></iframe>
        <script>window.verdict = null; addEventListener('message', e => window.verdict = e.data);</script>""")
    page.wait_for_function("window.verdict !== null")
    assert page.evaluate("window.verdict") == "refused"
    assert "refused a connection from origin null" in tiny_server.output()
    context.close()


def test_page_opened_from_disk_explains_the_null_origin(browser, tiny_server):
    context = offline(browser.new_context())
    page = context.new_page()
    page.goto((REPO / "web_client_enhanced.html").as_uri())
    assert page.input_value("#address") == "localhost:8765"
    page.fill("#address", f"127.0.0.1:{tiny_server.port}")
    page.click("#connect")
    page.wait_for_function("document.getElementById('notice').textContent.includes('server.allowed_origins')")
    context.close()


def test_page_opened_from_disk_works_where_null_is_allowed(browser, start_server, tiny_model):
    server = start_server(tiny_model, server={"allowed_origins": ["null", "http://127.0.0.1"]})
    context = offline(browser.new_context())
    page = context.new_page()
    page.goto((REPO / "web_client_enhanced.html").as_uri())
    page.fill("#address", f"127.0.0.1:{server.port}")
    page.click("#connect")
    page.wait_for_function("document.getElementById('status').textContent === 'connected'")
    context.close()


def test_training_from_another_client_shows_its_progress(page, tiny_server):
    """Any client may start training: the page sees it through train_status and shows step and loss."""
    line, seen = json.dumps({"text": "rivers run to the sea"}), threading.Event()

    async def train_until_seen():
        async with LLMWSEnhancedClient("127.0.0.1", tiny_server.port) as client:
            training = asyncio.create_task(client.train(line, "web-watched", max_steps=100000, log_every=50))
            await asyncio.to_thread(seen.wait, 120)
            await client.cancel()
            return await training
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        done = pool.submit(asyncio.run, train_until_seen())
        page.wait_for_function("!document.getElementById('training').hidden", timeout=60000)
        seen.set()
        assert page.text_content("#trainingText").startswith("training: step ")
        assert "/100000, loss " in page.text_content("#trainingText")
        assert done.result(timeout=120)["finish_reason"] == "cancelled"
    page.wait_for_function("document.getElementById('training').hidden", timeout=30000)


def open_page(browser, server, **context_args):
    context = browser.new_context(bypass_csp=True, **context_args)
    page = context.new_page()
    page.goto(f"http://127.0.0.1:{server.port}/")
    page.wait_for_function("document.getElementById('status').textContent === 'connected'")
    return context, page


@pytest.mark.parametrize("width", [1280, 390])
def test_the_page_fits_desktop_and_phone_widths(browser, tiny_server, width):
    context, page = open_page(browser, tiny_server, viewport={"width": width, "height": 800})
    chat = page.locator("#conversation").bounding_box()
    if width == 1280:  # the side panel beside the chat; ☰ folds it away and the chat takes the width
        assert page.is_visible("#configPanel")
        assert page.locator("aside").bounding_box()["x"] >= chat["x"] + chat["width"]
        set_greedy(page, 8)
        page.click("#togglePanel")
        assert not page.is_visible("#configPanel")
        assert page.locator("#conversation").bounding_box()["width"] > 1200
    else:  # a phone: the chat and the prompt box use the width; ☰ opens the panel as a sheet over it
        assert not page.is_visible("#configPanel")
        assert chat["width"] >= 370 and page.locator("#prompt").bounding_box()["width"] >= 250
        page.click("#togglePanel")
        assert page.is_visible("#configPanel") and page.locator("aside").bounding_box()["width"] == width
        set_greedy(page, 8)
        page.click("#togglePanel")
        assert not page.is_visible("#configPanel")
    page.fill("#prompt", "Hello " * 30)
    page.press("#prompt", "Enter")
    page.wait_for_function("state.history.length === 2")
    assert page.evaluate("document.documentElement.scrollWidth") <= width  # nothing sticks out sideways
    question, answer = (page.locator(f".turn.{role}").bounding_box() for role in ("user", "assistant"))
    assert question["x"] + question["width"] <= width and question["x"] > answer["x"]  # questions sit on the right
    colours = page.evaluate("[...document.querySelectorAll('.turn')].map(t => getComputedStyle(t).backgroundColor)")
    assert colours[0] != colours[1]  # and read differently from answers at a glance
    context.close()


def test_copy_regenerate_and_edit_the_last_exchange(page, tiny_server):
    set_greedy(page, 12)
    page.fill("#prompt", "Name a river")
    page.press("#prompt", "Enter")
    page.wait_for_function("state.history.length === 2")
    first = page.evaluate("state.history[1].content")
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.click(".turn.assistant .copyAnswer")
    assert page.evaluate("navigator.clipboard.readText()") == first
    # Regenerate: a new answer (a new turn, asked again) replaces the old one.
    page.evaluate("document.querySelector('.turn.assistant').dataset.old = 'yes'")
    page.click(".turn.assistant .regenerate")
    page.wait_for_function("state.history.length === 2 && !document.querySelector('.turn.assistant').dataset.old")
    assert page.locator(".turn").count() == 2 and page.evaluate("state.history[1].content") == first  # greedy
    # Edit: the question goes back into the box and leaves the conversation with its answer.
    page.click(".turn.user .edit")
    assert page.input_value("#prompt") == "Name a river"
    assert page.locator(".turn").count() == 0 and page.evaluate("state.history.length") == 0
    page.fill("#prompt", "Name a mountain")
    page.press("#prompt", "Enter")
    page.wait_for_function("state.history.length === 2")
    assert page.evaluate("state.history[0].content") == "Name a mountain"
    assert page.evaluate("state.history[1].content") == reference(tiny_server, "Name a mountain", temperature=0,
                                                                  max_new_tokens=12)


def test_dark_mode_follows_the_system(browser, tiny_server):
    for scheme in ("light", "dark"):
        context, page = open_page(browser, tiny_server, color_scheme=scheme)
        rgb = page.evaluate("getComputedStyle(document.body).backgroundColor")
        brightness = sum(int(part) for part in rgb[rgb.index("(") + 1:-1].split(",")[:3])
        assert brightness < 150 if scheme == "dark" else brightness > 600, rgb
        context.close()


def test_a_favicon_and_no_failed_request(browser, tiny_server):
    context = browser.new_context()
    page = context.new_page()
    failed, requested = [], []
    page.on("response", lambda response: failed.append(response.url) if response.status >= 400 else None)
    page.on("request", lambda request: requested.append(request.url))
    page.goto(f"http://127.0.0.1:{tiny_server.port}/")
    from playwright.sync_api import expect
    expect(page.locator("#status")).to_have_text("connected")
    assert page.locator("link[rel=icon]").get_attribute("href").startswith("data:image/svg+xml")
    assert not failed and not [url for url in requested if "favicon" in url]
    context.close()


def test_the_header_model_picker_switches_the_model(browser, start_server, tiny_model):
    server = start_server(tiny_model, lambda root: shutil.copytree(tiny_model, root / "var" / "models" / "tiny-b"))
    context, page = open_page(browser, server)
    assert page.locator("#modelPicker option:checked").text_content() == "tiny-llama"
    page.wait_for_function("[...document.getElementById('modelPicker').options].some(o => o.text === 'tiny-b')")
    page.select_option("#modelPicker", label="tiny-b")
    page.wait_for_function("document.getElementById('log').textContent.includes('Model switched to tiny-b')",
                           timeout=60000)
    page.wait_for_function("document.querySelector('#modelPicker option:checked').text === 'tiny-b'")
    set_greedy(page, 6)
    page.fill("#prompt", "Hi")
    page.press("#prompt", "Enter")
    page.wait_for_function("state.history.length === 2")
    assert page.locator(".turn.assistant .who").text_content() == "tiny-b"
    context.close()


def test_new_tokens_per_s_the_resources_refresh_and_the_session_field(browser, tiny_server):
    import re
    import time

    context = browser.new_context(bypass_csp=True)
    page = context.new_page()
    asked = []  # when the page asked for resources
    page.on("websocket", lambda socket: socket.on("framesent", lambda payload: asked.append(time.monotonic())
                                                   if json.loads(payload).get("type") == "get_resources" else None))
    page.goto(f"http://127.0.0.1:{tiny_server.port}/")
    page.wait_for_function("document.getElementById('status').textContent === 'connected'")
    set_greedy(page, 6)
    page.fill("#prompt", "Hello")
    page.press("#prompt", "Enter")
    page.wait_for_function("state.history.length === 2")
    assert re.fullmatch(r"6 tokens, [\d.]+ tokens/s, length", page.text_content(".turn.assistant .stats"))
    page.click("#newConversation")
    assert page.locator(".turn").count() == 0 and page.evaluate("state.history.length") == 0
    page.click("#resourcesPanel summary")  # open: asked at once, then every 3 s
    deadline = time.monotonic() + 20
    while len(asked) < 3 and time.monotonic() < deadline:
        page.wait_for_timeout(200)
    assert len(asked) >= 3 and all(2.5 <= later - earlier <= 6 for earlier, later in zip(asked[1:], asked[2:]))
    # Another browser takes up this session by its id (Connection panel): the first is told it was taken over.
    session = page.text_content("#sessionId")
    other = browser.new_context(bypass_csp=True)
    second = other.new_page()
    second.goto(f"http://127.0.0.1:{tiny_server.port}/")
    second.wait_for_function("document.getElementById('status').textContent === 'connected'")
    second.click("#connectionPanel summary")
    second.click("#disconnect")
    second.fill("#sessionInput", session)
    second.click("#connect")
    second.wait_for_function(f"document.getElementById('sessionId').textContent === '{session}'")
    page.wait_for_function("document.getElementById('notice').textContent.includes('taken over')")
    other.close()
    context.close()


def test_the_token_field_lets_the_page_into_a_server_with_a_token(browser, start_server, tiny_model):
    server = start_server(tiny_model, server={"auth_token": "web-s3cret"})
    context = browser.new_context(bypass_csp=True)
    page = context.new_page()
    try:
        page.goto(f"http://127.0.0.1:{server.port}/")
        page.wait_for_function("document.body.innerText.includes('wrong token (HTTP 401)')")  # refused without it
        assert page.text_content("#status") != "connected"
        page.fill("#token", "web-s3cret")
        page.click("#connect")
        page.wait_for_function("document.getElementById('status').textContent === 'connected'")
    finally:
        context.close()


def test_the_page_shows_its_place_in_the_queue(browser, start_server, tiny_model):
    """One at a time, behind another client's long answer: the page says how many are ahead, then answers
    once that one is cancelled."""
    from conftest import BLOCKER, ONE_AT_A_TIME
    from websockets.sync.client import connect as connect_sync

    server = start_server(tiny_model, optimization=ONE_AT_A_TIME)
    context = browser.new_context(bypass_csp=True)
    page = context.new_page()
    try:
        with connect_sync(server.url) as other:
            other.send("{}")
            json.loads(other.recv(timeout=30))
            other.send(json.dumps(BLOCKER))
            while json.loads(other.recv(timeout=60))["type"] != "token":
                pass
            page.goto(f"http://127.0.0.1:{server.port}/")
            page.wait_for_function("document.getElementById('status').textContent === 'connected'")
            set_greedy(page, 10)
            page.fill("#prompt", "Tell me about rivers")
            page.press("#prompt", "Enter")
            page.wait_for_function("document.getElementById('queue').textContent === 'queued: 1 ahead'")
            assert page.evaluate("state.history.length") == 0  # nothing answered yet
            other.send(json.dumps({"type": "cancel"}))
            page.wait_for_function("state.history.length === 2")
        assert page.text_content("#queue") == ""  # the line goes once the answer is done
        assert "10 tokens" in page.text_content(".turn.assistant .stats")
    finally:
        context.close()


def test_the_models_panel_deletes_switches_and_downloads_with_a_progress_bar(browser, start_server, tiny_model,
                                                                             tmp_path):
    """Delete (after the confirm) removes a var model; Switch loads another; Download fetches a git-lfs
    repository, its bar at git-lfs's percentage while the pull still runs, and the new model is listed."""
    from git_repos import gated_git, gated_path, lfs_repo_of

    shutil.copytree(tiny_model, tmp_path / "work")
    repo = lfs_repo_of(tmp_path / "work", tmp_path / "tiny.git")
    (tmp_path / "git").mkdir()
    gates = gated_git(tmp_path / "git")

    def populate(root):
        for name in ("tiny-b", "spare"):
            shutil.copytree(tiny_model, root / "var" / "models" / name)
    server = start_server(tiny_model, populate, environment={"PATH": gated_path(gates)},
                          download={"allowed_url_prefixes": [f"file://{tmp_path}/"]})
    context, page = open_page(browser, server)
    page.on("dialog", lambda dialog: dialog.accept())
    page.click("#modelsPanel summary")
    models = "document.getElementById('models').textContent"
    page.wait_for_function(f"{models}.includes('spare')")

    page.locator("#models tr", has_text="spare").get_by_role("button", name="Delete").click()
    page.wait_for_function(f"!{models}.includes('spare')")
    assert not (server.root / "var" / "models" / "spare").exists()

    page.locator("#models tr", has_text="tiny-b").get_by_role("button", name="Switch").click()
    page.wait_for_function(f"{models}.includes('tiny-b ✓')", timeout=60000)
    assert "Model switched to tiny-b" in page.text_content("#log")

    (gates / "after-pull").touch()  # the pull's exit waits: the download cannot be done
    page.fill("#repo", f"file://{repo}")
    page.fill("#targetDir", "fetched")
    page.click("#download")
    page.wait_for_function("document.getElementById('downloadProgress').style.width === '100%'", timeout=60000)
    assert "(100%)" in page.text_content("#log") and "Downloaded" not in page.text_content("#log")
    assert not (server.root / "models" / "fetched").exists()
    (gates / "after-pull").unlink()
    page.wait_for_function(f"{models}.includes('fetched')", timeout=60000)
    assert "Downloaded models/fetched" in page.text_content("#log")
    assert (server.root / "models" / "fetched" / "config.json").is_file()
    context.close()
