"""RemoteServer: `heron serve` as a real subprocess on a free port, for end-to-end tests.

    with RemoteServer(["--served-model-name", "mosaicml/mpt-7b"]) as server:
        client = server.client()               # openai.OpenAI pointed at it
        httpx.get(server.url("/health"))

The server's output goes to a log file (shown when start-up fails); ``stop()`` sends
SIGTERM (or another signal) and waits, killing the process group as a last resort.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
# The first start converts the default model's tokenizer and weights (~90 s); later starts
# read the cache in ~/.cache/heron. Slow shared CI machines get generous room.
STARTUP_TIMEOUT_S = float(os.environ.get("HERON_TEST_STARTUP_TIMEOUT", "900"))
DEFAULT_MODEL_NAME = "mosaicml/mpt-7b"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pid_exists(pid: int) -> bool:
    """True while ``pid`` is a live process (zombies count as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False
    return True


class RemoteServer:
    """A `heron serve` subprocess; ready (``/health`` answered 200) once the constructor returns."""

    def __init__(
        self,
        args: list[str],
        *,
        api_key: str | None = None,
        env: dict[str, str] | None = None,
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
        wait_ready: bool = True,
    ) -> None:
        self.host = "127.0.0.1"
        self.port = free_port()
        self.api_key = api_key
        self.args = list(args)
        if api_key is not None:
            self.args += ["--api-key", api_key]
        self._log = tempfile.NamedTemporaryFile(prefix="heron-serve-", suffix=".log", delete=False)  # noqa: SIM115
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT)] + [p for p in [full_env.get("PYTHONPATH")] if p]
        )
        full_env.pop("HERON_API_KEY", None)
        full_env.update(env or {})
        cmd = [
            sys.executable,
            "-m",
            "heron.cli",
            "serve",
            *self.args,
            "--host",
            self.host,
            "--port",
            str(self.port),
        ]
        self.proc = subprocess.Popen(
            cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=REPO_ROOT,
            start_new_session=True,
        )
        if wait_ready:
            try:
                self.wait_ready(startup_timeout_s)
            except BaseException:
                self.stop()
                raise

    # ---- addresses and clients ------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def api_base(self) -> str:
        return f"{self.base_url}/v1"

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kwargs: object):  # -> openai.OpenAI
        import openai

        return openai.OpenAI(
            base_url=self.api_base, api_key=self.api_key or "EMPTY", max_retries=0, **kwargs
        )

    def async_client(self, **kwargs: object):  # -> openai.AsyncOpenAI
        import openai

        return openai.AsyncOpenAI(
            base_url=self.api_base, api_key=self.api_key or "EMPTY", max_retries=0, **kwargs
        )

    # ---- lifecycle ------------------------------------------------------------------------

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"heron serve exited with {self.proc.returncode} during "
                    f"start-up; log:\n{self.log_tail()}"
                )
            try:
                if httpx.get(self.url("/health"), timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(
            f"heron serve was not ready after {timeout_s} s; log:\n{self.log_tail()}"
        )

    def engine_pid(self) -> int:
        """The engine core process's pid, from the start-up log line."""
        match = re.search(r"engine core process started \(pid (\d+)\)", self.log_text())
        if match is None:
            raise RuntimeError(f"no engine pid in the log:\n{self.log_tail()}")
        return int(match.group(1))

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int | None:
        """Signal the server and wait for it; returns its exit code (None if it had to be killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
                return None
        return self.proc.returncode

    def log_text(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def __enter__(self) -> RemoteServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        self._log.close()
        os.unlink(self._log.name)
