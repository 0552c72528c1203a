"""Resources on a real server: out of memory is reported and the server carries on with a smaller context.
The estimates and figures themselves are tests/unit/test_resources.py."""
from conftest import ONE_AT_A_TIME, Client, inference


async def test_out_of_memory_is_reported_and_the_server_carries_on(start_server, tiny_model):
    # The fault is injected into the one-at-a-time path (engine.generate)
    server = start_server(tiny_model, environment={"LLMWS_FAULT_OOM": "<<oom>>"}, optimization=ONE_AT_A_TIME)
    client = await Client.open(server.url)
    before = client.welcome["capabilities"]["max_context"]
    await client.send(inference("please <<oom>> now", max_new_tokens=1000))
    messages = await client.until("error")
    assert messages[0]["type"] == "start"
    assert messages[-1]["message"] == "CUDA out of memory. Context too long. Please retry with shorter input."
    needed = messages[0]["tokens_in"] + messages[0]["max_tokens"]
    after = (await Client.open(server.url)).welcome["capabilities"]["max_context"]
    assert after == needed * 3 // 4 < before
    await client.send(inference("a normal request", max_new_tokens=5))
    assert (await client.until("done"))[-1]["total_tokens"] == 5
    await client.close()
