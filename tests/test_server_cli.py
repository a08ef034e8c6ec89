"""`prefix-router serve --embedded K` as a real process: it serves, prints how, stops on Ctrl-C."""

from __future__ import annotations

import asyncio
import signal
import sys

import aiohttp
from server_fixtures import free_port


async def test_serve_embedded_answers_and_stops_cleanly_on_sigint() -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "router", "serve", "--embedded", "2", "--port", str(port),
        "--policy", "round_robin", "--api-key", "sk-test",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(300):
                try:
                    async with s.get(url + "/readiness") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
            body = {
                "model": "meta-llama/Llama-3.1-8B-Instruct",
                "messages": [{"role": "user", "content": "Hello"}],
                "max_tokens": 4,
            }
            headers = {"Authorization": "Bearer sk-test"}
            async with s.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
                assert r.status == 200
                assert (await r.json())["choices"][0]["message"]["content"]
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), 15)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    text = out.decode()
    assert f"curl {url}/v1/chat/completions" in text
    assert f'OpenAI(base_url="{url}/v1"' in text
    assert "Traceback" not in err.decode()
