"""Engine replicas on a local Ray cluster (replicas.ray_address "local"): two CPU replicas of the tiny
model behind the one fair queue, with positions, resume, cancel, and a replica killed mid-stream; and on
a two-node cluster whose one node lacks the model folder."""
import asyncio
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, Client, free_port, inference, text_of
from prometheus_client.parser import text_string_to_metric_families

pytest.importorskip("ray")
pytestmark = pytest.mark.ray

SLOTS = 2  # per replica: 4 requests generate at once, the rest wait in the one queue
LONG = 4000  # tokens: runs for seconds on the tiny model, until it is cancelled or killed


@pytest.fixture(scope="module")
def cluster(start_server, tiny_model):
    return start_server(tiny_model, replicas={"ray_address": "local", "count": 2, "max_restarts": 1},
                        optimization={"max_batch_size": SLOTS}, server={"http_port": free_port()})


def ready(server) -> int:
    """GET /ready's status."""
    try:
        with urllib.request.urlopen(server.http_url + "/ready", timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as refused:
        return refused.code


async def replicas(server) -> list[dict]:
    client = await Client.open(server.url)
    reply = await client.request({"type": "get_resources"})
    await client.close()
    return reply["model"]["replicas"]


async def wait_for(server, check, timeout=120) -> list[dict]:
    """The replicas' status once `check(status)` holds (polled: it is a remote process's state)."""
    for _ in range(timeout * 10):
        status = await replicas(server)
        if check(status):
            return status
        await asyncio.sleep(0.1)
    raise AssertionError(f"replicas never got there: {status}")


async def test_eight_clients_are_served_by_both_replicas_with_the_texts_of_one_engine(cluster, start_server,
                                                                                      tiny_model):
    before = [replica["served"] for replica in await replicas(cluster)]
    clients = [await Client.open(cluster.url) for _ in range(8)]
    prompts = [inference(f"Client {index} says hello", max_new_tokens=24, temperature=0) for index in range(8)]
    answers = await asyncio.gather(*(client.until_done(prompt) for client, prompt in zip(clients, prompts)))
    assert all(answer[-1]["type"] == "done" and answer[-1]["total_tokens"] == 24 for answer in answers)
    served = [replica["served"] - was for replica, was in zip(await replicas(cluster), before)]
    assert sum(served) == 8 and min(served) >= 2, served  # the least loaded replica takes the next request
    single = start_server(tiny_model, optimization={"max_batch_size": SLOTS})  # greedy: one engine's texts
    alone = await Client.open(single.url)
    for prompt, answer in zip(prompts[:3], answers):
        assert text_of(await alone.until_done(prompt)) == text_of(answer)
    for client in [*clients, alone]:
        await client.close()


async def test_one_queue_round_robin_and_positions_hold_across_the_replicas(cluster):
    busy, newcomer = await Client.open(cluster.url), await Client.open(cluster.url)
    for index in range(8):  # 4 generate (2 slots on each replica), 4 wait
        await busy.send(inference(f"busy {index}", max_new_tokens=400, request_id=f"busy-{index}"))
    received = []
    while sum(message["type"] == "start" for message in received) < 2 * SLOTS:
        received.append(await busy.recv())
    await newcomer.send(inference("newcomer", max_new_tokens=10, request_id="new"))
    told = await newcomer.recv()
    assert told["type"] == "queued" and told["position"] == 2  # after one of busy's, behind the full replicas
    await newcomer.until("done")
    while sum(message["type"] == "done" for message in received) < 8:
        received.append(await busy.recv())
    order = [int(message["request_id"].split("-")[1]) for message in received if message["type"] == "start"]
    assert set(order[:4]) == {0, 1, 2, 3} and set(order[4:]) == {4, 5, 6, 7}, order
    # First come first served within a client: taken in order; two replicas may say `start` in either order
    assert all(abs(place - index) <= 1 for place, index in enumerate(order)), order
    await busy.close()
    await newcomer.close()


async def test_a_stream_resumes_after_a_drop_while_its_replica_generates(cluster):
    request = inference("Tell me a story", max_new_tokens=120, temperature=0, request_id="story")
    client = await Client.open(cluster.url)
    whole = await client.until_done(request)
    dropped = await Client.open(cluster.url)
    await dropped.send({**request, "request_id": "again"})
    seen = [await dropped.recv() for _ in range(5)]
    await dropped.ws.close()
    back = await Client.open(cluster.url, {"session_id": dropped.session_id, "last_seq": seen[-1]["seq"]})
    rest = await back.until("done")
    assert rest[0]["seq"] == seen[-1]["seq"] + 1  # no gap, no duplicate
    assert text_of(seen + rest) == text_of(whole)
    await client.close()
    await back.close()


async def test_cancel_reaches_the_replica_that_runs_the_request(cluster):
    client = await Client.open(cluster.url)
    await client.send(inference("cancel me", max_new_tokens=LONG, request_id="long"))
    await client.until("token")
    await client.send({"type": "cancel", "request_id": "long"})
    done = (await client.until("done"))[-1]
    assert done["finish_reason"] == "cancelled" and done["total_tokens"] < LONG
    await wait_for(cluster, lambda status: all(replica["requests"] == 0 for replica in status), timeout=10)
    await client.close()


async def test_model_switch_and_training_are_refused_with_the_reason(cluster):
    client = await Client.open(cluster.url)
    for message in ({"type": "switch_model", "model_path": "tiny"},
                    {"type": "train", "dataset": '{"text": "hello"}'}, {"type": "save_snapshot"}):
        reply = await client.request(message)
        assert reply["type"] == "error" and "engine replicas serve" in reply["message"], reply
    await client.close()


async def generating_on_each_replica(server, tokens: int) -> tuple[list[Client], dict]:
    """Two clients whose requests run on one replica each; the replicas' status meanwhile."""
    await wait_for(server, lambda status: all(replica["state"] == "serving" for replica in status))
    clients = [await Client.open(server.url) for _ in range(2)]
    for index, client in enumerate(clients):  # the second goes to the other, less loaded replica
        await client.send(inference(f"client {index}", max_new_tokens=tokens, request_id=f"run-{index}"))
        await client.until("token")
    status = await replicas(server)
    assert [replica["requests"] for replica in status] == [1, 1], status
    return clients, status


async def test_a_killed_replica_fails_its_requests_the_other_finishes_and_it_comes_back(cluster):
    clients, status = await generating_on_each_replica(cluster, LONG)
    victim = status[0]
    os.kill(victim["pid"], signal.SIGKILL)
    ends = await asyncio.gather(*(client.until("done", "error") for client in clients))
    error, finished = sorted((messages[-1] for messages in ends), key=lambda end: end["type"] != "error")
    assert error["type"] == "error" and f"replica 0 (node {victim['node'][:8]}, pid {victim['pid']}) was lost" \
        in error["message"], error
    assert finished["type"] == "done" and finished["total_tokens"] == LONG  # the other replica's ran on
    back = await wait_for(cluster, lambda status: status[0]["state"] == "serving" and status[0]["restarts"] == 1)
    assert back[0]["pid"] != victim["pid"]
    await asyncio.gather(*(client.until_done(inference("after", max_new_tokens=8)) for client in clients))
    assert (await replicas(cluster))[0]["served"] > back[0]["served"]  # the next requests use it again
    for client in clients:
        await client.close()


async def kill_for_good(server, index: int) -> list[dict]:
    """Kill replica `index` until Ray restarts it no more (replicas.max_restarts); the status then."""
    while (replica := (await replicas(server))[index])["state"] != "dead":
        os.kill(replica["pid"], signal.SIGKILL)
        await wait_for(server, lambda status: status[index]["state"] == "dead"
                       or (status[index]["state"] == "serving" and status[index]["pid"] != replica["pid"]))
    return await replicas(server)


async def test_replicas_gone_for_good_leave_the_others_serving_then_fail_what_waits(cluster):
    """max_restarts is 1: replica 0 killed until it is gone, while each replica runs a request; then replica 1."""
    clients, status = await generating_on_each_replica(cluster, 200)
    gone = await kill_for_good(cluster, 0)
    assert "cause" in gone[0] and gone[1]["state"] == "serving"
    assert ready(cluster) == 200  # replica 1 still serves
    ends = await asyncio.gather(*(client.until("done", "error") for client in clients))  # one lost, one ran on
    assert sorted(end[-1]["type"] for end in ends) == ["done", "error"], ends
    answers = await asyncio.gather(*(client.until_done(inference("still", max_new_tokens=8)) for client in clients))
    assert all(answer[-1]["type"] == "done" for answer in answers)
    assert (await replicas(cluster))[0]["served"] == gone[0]["served"]  # a dead replica takes nothing
    for restarts in (0, 1):
        pid = (await wait_for(cluster, lambda status: status[1]["state"] == "serving"
                              and status[1]["restarts"] == restarts))[1]["pid"]
        await clients[0].send(inference("last", max_new_tokens=LONG, request_id=f"last-{restarts}"))
        await clients[0].until("token")
        os.kill(pid, signal.SIGKILL)
        assert "was lost" in (await clients[0].until("error"))[-1]["message"]
    await wait_for(cluster, lambda status: status[1]["state"] == "dead")
    assert ready(cluster) == 503
    reply = (await clients[1].until_done(inference("nobody left", max_new_tokens=8)))[-1]
    assert reply["type"] == "error" and "No engine replica is left" in reply["message"], reply
    for client in clients:
        await client.close()


def test_without_a_ray_address_ray_is_not_imported(tiny_model):
    probe = ("import sys; from llmws_server.config import load_config; "
             "from llmws_server.engines.registry import load_engines; "
             f"engines = load_engines(__import__('pathlib').Path({str(tiny_model)!r}), load_config(sys.argv[1])); "
             "print(len(engines), 'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe, str(REPO / "config.json")], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.split()[-2:] == ["1", "False"], out.stderr[-2000:]


async def test_an_image_request_runs_on_a_replica_with_the_answer_of_one_engine(start_server, vision_models):
    """A request with images runs alone on a replica (the transformers engine does not batch it): its pixels
    travel to the replica, and the answer is the one an in-process engine gives; another colour, another."""
    from test_vision import BLUE, RED, with_images

    limits = {"max_image_bytes": 30000, "max_image_pixels": 1_000_000}
    remote = start_server(vision_models["llava"], replicas={"ray_address": "local", "count": 1}, limits=limits)
    local = start_server(vision_models["llava"], limits=limits)
    answers = {}
    for name, server in (("remote", remote), ("local", local)):
        client = await Client.open(server.url)
        answers[name] = [await client.until_done(with_images([image])) for image in (RED, BLUE)]
        await client.close()
    texts = {name: [text_of(messages) for messages in each] for name, each in answers.items()}
    assert all(messages[-1]["type"] == "done" for messages in answers["remote"]), answers["remote"]
    assert texts["remote"] == texts["local"] and texts["remote"][0] != texts["remote"][1]
    assert all(next(m for m in messages if m["type"] == "start")["images_in"] == 1 for messages in answers["remote"])
    assert (await replicas(remote))[0]["served"] == 2  # the replica answered them


# -- a two-node cluster on this machine, one node without the model ---------------------------------------

RAY_START = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--disable-usage-stats",
             "--num-cpus=1", "--num-gpus=0"]
MOUNT_NAMESPACES = (["unshare", "--mount", "--propagation", "private"],  # root
                    ["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private"])  # a user
HIDE_AND_RUN = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'  # sh -c: the folder $2 shows $1's contents


def mount_namespace(probe: Path) -> list[str] | None:
    """An unshare command whose process gets a mount namespace of its own, where it may bind-mount (tried
    on `probe`); None where this machine allows none."""
    for command in MOUNT_NAMESPACES:
        try:
            if subprocess.run([*command, "sh", "-c", HIDE_AND_RUN, "sh", probe, probe, "true"],
                              capture_output=True, timeout=60).returncode == 0:
                return command
        except (OSError, subprocess.TimeoutExpired):
            continue
    return None


class RayNode:
    """`ray start --block` in a session of its own, its output in a file."""

    def __init__(self, command: list[str], out: Path, environment: dict):
        self.out = out
        self.process = subprocess.Popen(command, stdout=out.open("w"), stderr=subprocess.STDOUT,
                                        start_new_session=True, env={**os.environ, **environment})

    def wait_started(self, timeout=180) -> None:
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in self.out.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start did not start a node:\n{self.out.read_text()[-4000:]}")
            time.sleep(0.2)

    @staticmethod
    def stop(nodes: list["RayNode"]) -> None:
        """SIGTERM ends each node's processes (ray start --block); what their sessions still hold, SIGKILL."""
        for node in nodes:
            node.process.terminate()
        for node in nodes:
            try:
                node.process.wait(60)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(node.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            node.process.wait()


@pytest.fixture
def cluster_missing_the_model_on_one_node(tiny_model):
    """A Ray cluster of two nodes on this machine, each with one CPU: the head, custom resource
    node_with_model; and one in a mount namespace of its own where the tiny model's folder is not there
    (an empty folder is bind-mounted over its parent), custom resource node_without_model. Its address, and
    the environment that joins it: Ray's token authentication with a token of its own (a token in
    ~/.ray/auth_token, which Ray >= 2.59 writes for its local clusters, would turn it on for the head only)."""
    temp = Path(tempfile.mkdtemp(prefix="llmws-ray-", dir="/tmp"))  # short: Ray's socket paths live in it
    (temp / "empty").mkdir()
    namespace = mount_namespace(temp / "empty")
    if namespace is None:
        shutil.rmtree(temp, ignore_errors=True)
        pytest.skip("needs a mount namespace (unshare) to start a Ray node without the model folder")
    port, environment = free_port(), {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    nodes = [RayNode([*RAY_START, "--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp}",
                      '--resources={"node_with_model": 1}'], temp / "head.out", environment)]
    try:
        nodes[0].wait_started()
        nodes.append(RayNode([*namespace, "sh", "-c", HIDE_AND_RUN, "sh", str(temp / "empty"), str(tiny_model.parent),
                              *RAY_START, f"--address=127.0.0.1:{port}", '--resources={"node_without_model": 1}'],
                             temp / "bare.out", environment))
        nodes[1].wait_started()
        yield f"127.0.0.1:{port}", environment
    finally:
        RayNode.stop(nodes)
        shutil.rmtree(temp, ignore_errors=True)


async def test_replica_0_cannot_load_the_model_on_its_node_and_replica_1_serves(
        cluster_missing_the_model_on_one_node, start_server, tiny_model):
    """replicas.resources puts replica 0 on the node without the model folder and replica 1 on the other: the
    server starts, lists replica 0 dead with the cause, reads the model from replica 1 (cluster.start_replicas
    puts the replicas that loaded first), and replica 1 serves every request with one engine's greedy texts."""
    address, environment = cluster_missing_the_model_on_one_node
    server = start_server(tiny_model, environment=environment, replicas={
        "ray_address": address, "count": 2, "resources": [{"node_without_model": 1}, {"node_with_model": 1}]},
        optimization={"max_batch_size": SLOTS}, server={"http_port": free_port()})
    try:
        dead, serving = await replicas(server)
        assert dead["index"] == 0 and dead["state"] == "dead" and dead["pid"] is None, dead
        assert dead["cause"].startswith("it could not load the model: FileNotFoundError: "
                                        f"{tiny_model} is not on this node"), dead
        assert serving["index"] == 1 and serving["state"] == "serving" and serving["device"] == "cpu", serving
        assert f"replica 0 could not load {tiny_model.name}: FileNotFoundError" in server.output()
        assert ready(server) == 200
        with urllib.request.urlopen(server.http_url + "/metrics", timeout=10) as answer:
            gauges = {(sample.labels["replica"], sample.labels["state"]): sample.value
                      for family in text_string_to_metric_families(answer.read().decode())
                      for sample in family.samples if sample.name == "llmws_replica_serving"}
        assert gauges == {("0", "dead"): 0.0, ("1", "serving"): 1.0}, gauges

        single = start_server(tiny_model, optimization={"max_batch_size": SLOTS})  # the engine in process
        clients = [await Client.open(server.url) for _ in range(4)]
        alone = await Client.open(single.url)
        assert clients[0].welcome["model"] == tiny_model.name  # as replica 1 describes it
        assert clients[0].welcome["capabilities"] == alone.welcome["capabilities"]
        prompts = [inference(f"Client {index} asks", max_new_tokens=16) for index in range(4)]
        answers = await asyncio.gather(*(client.until_done(prompt) for client, prompt in zip(clients, prompts)))
        assert all(answer[-1]["type"] == "done" and answer[-1]["total_tokens"] == 16 for answer in answers), answers
        for prompt, answer in zip(prompts, answers):
            assert text_of(await alone.until_done(prompt)) == text_of(answer)
        assert [replica["served"] for replica in await replicas(server)] == [0, 4]
        for client in [*clients, alone]:
            await client.close()
    finally:
        server.stop()  # before its cluster
    assert server.process.returncode == 0, server.output()[-3000:]  # a replica that never started stops too
