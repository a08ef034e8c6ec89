"""`make e2e`: real SGLang servers, our router in front, tests/e2e/, benchmarks, teardown.

Runs inside the isolated SGLang environment (.e2e/venv, built by e2e/setup_env.sh). Steps:
make the tiny model, start two SGLang servers, optionally capture wire fixtures (`--capture`),
run `pytest tests/e2e`, run SGLang's bench_serving through the router and direct, measure
predicted vs reported cached tokens (benchmarks/e2e_sglang.py), and stop every process it or
the tests started (each server's process group id is recorded beside its log). Prints the
total time. Exit status: pytest's, or 1 when a benchmark step failed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from servers import SGLangServer, kill_recorded, start_servers  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--work", default=str(ROOT / ".e2e"), help="model, logs, reports (.e2e)")
    ap.add_argument("--capture", action="store_true", help="rewrite tests/fixtures/sglang_*/")
    ap.add_argument("--no-tests", action="store_true", help="skip pytest tests/e2e")
    ap.add_argument("--no-bench", action="store_true", help="skip bench_serving and variants")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = ap.parse_args()
    started = time.monotonic()
    work = Path(args.work)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for old in logs.glob("*"):
        old.unlink()
    model = work / "model"
    subprocess.run([sys.executable, str(HERE / "make_model.py"), str(model)], check=True)

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    servers: list[SGLangServer] = []
    rc = 0
    try:
        t0 = time.monotonic()
        servers = start_servers(model, logs, count=2)
        print(f"e2e: 2 SGLang servers healthy in {time.monotonic() - t0:.0f} s", flush=True)
        if args.capture:
            from capture import capture

            target = capture(
                servers[0].url,
                servers[0].kv_endpoint,
                ROOT / "tests" / "fixtures",
                model=str(model),
            )
            print(f"e2e: captured wire fixtures into {target.relative_to(ROOT)}", flush=True)
        info = {
            "model_dir": str(model),
            "log_dir": str(logs),
            "servers": [
                {"name": s.name, "port": s.port, "kv_port": s.kv_port, "log": str(s.log_path)}
                for s in servers
            ],
        }
        env = dict(os.environ, PREFIX_ROUTER_E2E=json.dumps(info))
        if not args.no_tests:
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                   str(ROOT / "tests" / "e2e"), *args.pytest_args]  # fmt: skip
            rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
            print(f"e2e: tests exited {rc}", flush=True)
        for s in servers:  # a test may have killed one: bring it back for the benchmarks
            if not s.healthy():
                s.stop()
                s.start()
                s.wait_healthy()
        if not args.no_bench:
            bench = [sys.executable, str(ROOT / "benchmarks" / "e2e_sglang.py")]
            brc = subprocess.run(bench, cwd=ROOT, env=env).returncode
            print(f"e2e: benchmarks exited {brc}", flush=True)
            rc = rc or (1 if brc else 0)
    except KeyboardInterrupt as exc:
        print(f"e2e: interrupted ({exc})", flush=True)
        rc = rc or 130
    finally:
        for s in servers:
            s.stop()
        kill_recorded(logs)
        print(f"e2e: total {time.monotonic() - started:.0f} s (after the environment)", flush=True)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
