"""Handshake checks: the auth token, browser origins, and the web client served over plain HTTP."""
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from conftest import REPO, Client
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def guarded_server(start_server, tiny_model):
    return start_server(tiny_model, server={"auth_token": TOKEN})


@pytest.mark.parametrize("url_suffix, headers", [("", {}), ("/?token=wrong", {}),
                                                 ("", {"Authorization": "Bearer wrong"})])
async def test_missing_or_wrong_token_is_refused_with_401(guarded_server, url_suffix, headers):
    with pytest.raises(InvalidStatus) as refused:
        await connect(guarded_server.url + url_suffix, additional_headers=headers)
    assert refused.value.response.status_code == 401


async def test_right_token_in_query_or_header_is_let_in(guarded_server):
    client = await Client.open(f"{guarded_server.url}/?token={TOKEN}")
    await client.close()
    client = await Client.open(guarded_server.url, additional_headers={"Authorization": f"Bearer {TOKEN}"})
    await client.close()


def test_llm_py_passes_the_token(guarded_server):
    base = [sys.executable, str(REPO / "llm.py"), "--host", "127.0.0.1", "--port", str(guarded_server.port),
            "--prompt", "hi", "--max-tokens", "3"]
    assert subprocess.run(base + ["--token", TOKEN], capture_output=True, timeout=120).returncode == 0
    refused = subprocess.run(base, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "HTTP 401" in refused.stderr


@pytest.mark.parametrize("origin, allowed", [("https://evil.example", False), ("http://localhost.evil.example", False),
                                             ("http://localhost:3000", True), ("http://127.0.0.1:8080", True),
                                             ("null", False)])
async def test_browser_origins_are_checked(tiny_server, origin, allowed):
    if allowed:
        client = await Client.open(tiny_server.url, origin=origin)
        await client.close()
    else:
        with pytest.raises(InvalidStatus) as refused:
            await connect(tiny_server.url, origin=origin)
        assert refused.value.response.status_code == 403


ADMIN = "admin-s3cret"
MANAGEMENT = [{"type": "switch_model", "model_path": "models/none-such"},
              {"type": "delete_model", "model_name": "none-such"},
              {"type": "download_model", "repo": "https://huggingface.co/none/such"}]


@pytest.fixture(scope="module")
def admin_server(start_server, tiny_model):
    return start_server(tiny_model, server={"admin_token": ADMIN})


@pytest.mark.parametrize("message", [*MANAGEMENT, {"type": "train", "dataset": ""}, {"type": "save_snapshot"}])
async def test_model_management_needs_the_admin_token_when_one_is_set(admin_server, message):
    anyone = await Client.open(admin_server.url)
    refused = await anyone.request(message)
    assert refused["type"] == "error" and refused["message"].startswith(f"{message['type']} needs the admin scope")
    assert (await anyone.request({"type": "list_models"}))["type"] == "models_list"  # reading is for everyone
    admin = await Client.open(f"{admin_server.url}/?token={ADMIN}")
    reply = await admin.request(message)
    assert "admin scope" not in reply.get("message", "")  # past the check: refused or done for its own reasons
    for client in (anyone, admin):
        await client.close()


async def test_with_both_tokens_the_admin_token_lets_in_and_manages_and_the_other_only_lets_in(start_server,
                                                                                            tiny_model):
    server = start_server(tiny_model, server={"auth_token": TOKEN, "admin_token": ADMIN})
    with pytest.raises(InvalidStatus) as refused:
        await connect(server.url)
    assert refused.value.response.status_code == 401
    user, admin = await Client.open(f"{server.url}/?token={TOKEN}"), await Client.open(f"{server.url}/?token={ADMIN}")
    assert "needs the admin scope" in (await user.request(MANAGEMENT[0]))["message"]
    assert "admin scope" not in (await admin.request(MANAGEMENT[0])).get("message", "")
    for client in (user, admin):
        await client.close()


@pytest.mark.parametrize("origin, may_manage", [(None, True), ("http://127.0.0.1:{port}", True),
                                                ("http://localhost:3000", False), ("http://127.0.0.1:1", False)])
async def test_only_the_servers_own_page_manages_models_from_a_browser(tiny_server, origin, may_manage):
    client = await Client.open(tiny_server.url, **({"origin": origin.format(port=tiny_server.port)} if origin else {}))
    reply = await client.request(MANAGEMENT[1])
    assert reply["type"] == "error"
    assert ("may not manage models" in reply["message"]) is not may_manage, reply
    await client.close()


async def test_a_listed_admin_origin_manages_models_from_a_browser(start_server, tiny_model):
    page, other = "http://localhost:3000", "http://localhost:4000"
    server = start_server(tiny_model, server={"allowed_origins": [page, other], "admin_origins": [page]})
    for origin, may_manage in ((page, True), (other, False)):
        client = await Client.open(server.url, origin=origin)
        reply = await client.request(MANAGEMENT[1])
        assert ("may not manage models" in reply["message"]) is not may_manage, reply
        await client.close()


async def test_a_malformed_origin_is_refused_with_403_not_500(tiny_server):
    with pytest.raises(InvalidStatus) as refused:
        await connect(tiny_server.url, origin="http://[")
    assert refused.value.response.status_code == 403


def test_web_client_is_served_at_the_root(tiny_server):
    with urllib.request.urlopen(f"http://127.0.0.1:{tiny_server.port}/") as response:
        assert response.headers["Content-Type"] == "text/html; charset=utf-8"
        assert response.read() == (REPO / "web_client_enhanced.html").read_bytes()
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"http://127.0.0.1:{tiny_server.port}/../config.json")
    assert missing.value.code == 404


@pytest.fixture(scope="module")
def tls_server(start_server, tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    server = start_server(tiny_model, server={"tls_cert": str(cert), "tls_key": str(key)})
    server.cert = cert
    return server


def test_tls_serves_wss_to_llm_py(tls_server):
    base = [sys.executable, str(REPO / "llm.py"), "--host", "127.0.0.1", "--port", str(tls_server.port),
            "--prompt", "hi", "--max-tokens", "3"]
    trusted = subprocess.run(base + ["--tls"], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "SSL_CERT_FILE": str(tls_server.cert)})
    assert trusted.returncode == 0, trusted.stderr
    plain = subprocess.run(base, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 1


def test_the_command_line_client_takes_the_token_from_llmws_token(guarded_server):
    argv = [sys.executable, str(REPO / "llm.py"), "--prompt", "hi", "--host", "127.0.0.1", "--port",
            str(guarded_server.port), "--max-tokens", "4", "--temperature", "0"]
    environment = {key: value for key, value in os.environ.items() if key != "LLMWS_TOKEN"}
    refused = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=environment)
    assert refused.returncode != 0 and "401" in refused.stderr, refused.stderr
    let_in = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                            env={**environment, "LLMWS_TOKEN": TOKEN})
    assert let_in.returncode == 0 and let_in.stdout.strip(), let_in.stderr
