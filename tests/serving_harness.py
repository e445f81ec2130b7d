"""Runs `python -m atom_jax.serve` on free loopback ports for the serving tests."""
from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 300
API_KEY = "test-key-0123"
MODEL = "SmolLM2-135M-Instruct"
SHARED_ARGS = ("--api-key", API_KEY, "--shutdown-timeout", "3", "--num-scheduler-steps", "4")
_shared: "ServerProcess | None" = None


def shared_server() -> "ServerProcess":
    """The serving test modules share one server process (started by the first that asks; the
    engine's start-up is most of their time). Call .wait_ready() before use. A test that stops
    it (the SIGTERM test) makes the next caller start a fresh one."""
    global _shared
    if _shared is None or _shared.proc.poll() is not None:
        _shared = ServerProcess(*SHARED_ARGS)
        atexit.register(_shared.stop)
    return _shared


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, *args: str):
        self.port, self.grpc_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="atom-jax-serve-", suffix=".log",
                                               delete=False)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        env.pop("ATOM_JAX_API_KEY", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "atom_jax.serve", "--host", "127.0.0.1",
             "--port", str(self.port), "--grpc-port", str(self.grpc_port), *args],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=REPO)

    def log_tail(self, chars: int = 4000) -> str:
        return Path(self.log.name).read_text(errors="replace")[-chars:]

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics, summed over labels, by sample name
        (e.g. 'vllm:generation_tokens_total'); label-specific ones as 'name{label=value}'."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[s.name] = out.get(s.name, 0.0) + s.value
                for k, v in s.labels.items():
                    if k not in ("model_name", "engine"):
                        key = f"{s.name}{{{k}={v}}}"
                        out[key] = out.get(key, 0.0) + s.value
        return out

    def wait_idle(self, timeout: float = 15) -> dict[str, float]:
        """Wait until no request runs or waits and no KV block is in use; -> the metrics."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            idle = (m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0
                    and m["vllm:kv_cache_usage_perc"] == 0)
            if idle or time.monotonic() > deadline:
                return m
            time.sleep(0.1)
