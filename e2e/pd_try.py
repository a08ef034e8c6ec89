"""Real SGLang in PD mode on CPU behind `serve --prefill/--decode` (a try, not a test).

SGLang 0.5.23 refuses `fake` on a prefill server ("Prefill server does not support 'fake' as
the transfer backend", pd_disaggregation_hook.py) and its real backends (mooncake, nixl) are
not installed in the CPU environment, so a real prefill server cannot run here (`--prefill-mode
sglang` shows the refusal). The default is a hybrid: a simulated prefill server (`prefix-router
sim --mode prefill`) and a real SGLang decode server of the tiny e2e model
(`--disaggregation-mode decode --disaggregation-transfer-backend fake`), our router in PD mode
in front; a /generate (whole and streamed) and a chat completion go through it. The `fake`
backend moves no KV (the decode server decodes on whatever its pages hold), so the answers are
noise: this checks that a real decode server takes our bootstrap fields and streams, not the
text. Writes benchmarks/results/pd_sglang.json with what happened.

Run under the heavy-run lock with the e2e environment's Python:
  flock /tmp/prefix-router-heavy.lock .e2e/venv/bin/python e2e/pd_try.py --model .e2e/model
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import ROOT, SGLangServer, get_json, post_json

from router.replay.ports import free_port


def _stream(url: str, body: Any) -> list[str]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        return [
            line.decode().strip()[5:].strip()
            for line in resp
            if line.decode().strip().startswith("data:")
        ]


def _wait(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/pd_sglang.json")
    parser.add_argument("--prefill-mode", choices=("sim", "sglang"), default="sim")
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="pd-sglang-"))
    boot = free_port()
    fake = ["--disaggregation-transfer-backend", "fake"]
    prefill = SGLangServer(
        name="prefill",
        model_dir=args.model,
        log_path=logs / "prefill.log",
        extra_args=["--disaggregation-mode", "prefill", *fake, "--disaggregation-bootstrap-port",
                    str(boot)],
    )  # fmt: skip
    decode = SGLangServer(
        name="decode",
        model_dir=args.model,
        log_path=logs / "decode.log",
        # Decode host receive (default threshold < 1) backs retractions with a host pool that
        # pins memory through CUDA ("Found no NVIDIA driver" on CPU): turned off here.
        extra_args=[
            "--disaggregation-mode",
            "decode",
            *fake,
            "--disaggregation-decode-host-receive-threshold",
            "1",
            "--disaggregation-decode-retraction-backup",
            "cpu_tensor",
        ],
    )
    doc: dict[str, Any] = {
        "sglang": "0.5.23",
        "transfer_backend": "fake",
        "prefill": args.prefill_mode,
        "steps": {},
    }
    router: subprocess.Popen[bytes] | None = None
    sim: subprocess.Popen[bytes] | None = None
    started = time.monotonic()
    try:
        if args.prefill_mode == "sglang":
            prefill.start()
        else:
            sim_port = free_port()
            cmd = [sys.executable, "-m", "router", "sim", "--mode", "prefill", "--port"]
            cmd += [str(sim_port), "--bootstrap-port", str(boot), "--log-level", "warning"]
            with (logs / "sim.log").open("ab") as log:
                sim = subprocess.Popen(
                    cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
                )
            prefill.port = sim_port
        decode.start()
        if args.prefill_mode == "sglang":
            prefill.wait_healthy(300)
        else:
            _wait(prefill.url + "/health")
        decode.wait_healthy(300)
        doc["steps"]["servers_healthy_s"] = round(time.monotonic() - started, 1)
        port = free_port()
        log_path = logs / "router.log"
        cmd = [sys.executable, "-m", "router", "serve", "--port", str(port)]
        cmd += ["--prefill", prefill.url, str(boot), "--decode", decode.url]
        cmd += ["--health-interval", "1", "--log-level", "INFO"]
        with log_path.open("ab") as log:
            router = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
            )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                get_json(url + "/readiness", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        body = {"text": "The capital of France is", "sampling_params": {"max_new_tokens": 8}}
        status, out = post_json(url + "/generate", body, timeout=120)
        doc["steps"]["generate"] = {"status": status, "body": out}
        events = _stream(url + "/generate", {**body, "stream": True})
        doc["steps"]["generate_stream"] = {"events": len(events), "last": events[-2:]}
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6}
        status, out = post_json(url + "/v1/chat/completions", chat, timeout=120)
        doc["steps"]["chat"] = {"status": status, "body": out}
        doc["router_stats"] = get_json(url + "/stats")
    except Exception as exc:  # a try: record what failed and where
        doc["error"] = repr(exc)
    finally:
        for proc in (router, sim):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(15)
        for server in (prefill, decode) if args.prefill_mode == "sglang" else (decode,):
            doc.setdefault("logs", {})[server.name] = server.tail(1500)
            server.stop()
        doc["wall_s"] = round(time.monotonic() - started, 1)
    args.out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(json.dumps({k: v for k, v in doc.items() if k != "logs"}, indent=2, default=str)[:3000])
    return 0 if "error" not in doc else 1


if __name__ == "__main__":
    sys.exit(main())
