"""Real processes for end-to-end tests: started from the installed commands, read line by line."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Process:
    """A child process whose combined output is collected; waits for a ready line."""

    def __init__(
        self,
        args: list[str],
        env: dict[str, str],
        *,
        ready: str | None,
        cwd: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.args = args
        self.lines: list[str] = []
        self._seen = threading.Condition()
        self.proc = subprocess.Popen(
            args,
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()
        if ready is not None:
            self.wait_for(ready, timeout)

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._seen:
                self.lines.append(line.rstrip("\n"))
                self._seen.notify_all()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        with self._seen:
            while True:
                for line in self.lines:
                    if text in line:
                        return line
                if self.proc.poll() is not None and not any(text in ln for ln in self.lines):
                    raise RuntimeError(
                        f"{self.args[:3]} exited {self.proc.returncode}:\n{self.output}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"no {text!r} from {self.args[:3]} in {timeout}s:\n{self.output}"
                    )
                self._seen.wait(min(left, 0.2))

    def kill(self) -> None:
        """SIGKILL the whole process group: no cleanup runs, as in a crash."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._close()

    def _close(self) -> None:
        self._reader.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._close()
        return self.proc.returncode


def gateway(env: dict[str, str], port: int, frontend_id: str, datacenter: str = "dc1") -> Process:
    return Process(
        [
            str(BIN / "metering"),
            "gateway",
            "--port",
            str(port),
            "--frontend-id",
            frontend_id,
            "--datacenter",
            datacenter,
        ],
        env,
        ready="listening on",
    )


def api(env: dict[str, str], port: int) -> Process:
    proc = Process([str(BIN / "metering"), "api", "--port", str(port)], env, ready="API listening")
    wait_http(f"http://127.0.0.1:{port}/healthz")
    return proc


def wait_http(url: str, timeout: float = 15.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(url)
