"""A real ``mlflow server`` on 127.0.0.1 for the tests (SQLite store, served artifacts)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

from launch.local import free_port


def wait_until_up(proc: subprocess.Popen, url: str, timeout: float, log: str) -> None:
    """Until ``url`` answers 200; the log's tail in the error if ``proc`` exits first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:4]} exited: {open(log).read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout}s (log: {log})")


class MlflowServer:
    def __init__(self, root: str):
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self, timeout: float = 90) -> "MlflowServer":
        os.makedirs(self.root, exist_ok=True)
        mlflow = os.path.join(os.path.dirname(sys.executable), "mlflow")
        self.log = open(os.path.join(self.root, "server.log"), "w")
        self.proc = subprocess.Popen(
            [
                mlflow,
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{self.root}/mlflow.db",
                "--artifacts-destination",
                os.path.join(self.root, "artifacts"),
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._wait(self.uri + "/health", timeout, "server.log")
        return self

    def _wait(self, url: str, timeout: float, log: str) -> None:
        """Until ``url`` answers; a server that does not is killed before the error."""
        try:
            wait_until_up(self.proc, url, timeout, os.path.join(self.root, log))
        except BaseException:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL the server and everything it started (its own process group, also
        what is left of it once its leader has exited)."""
        if self.proc:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
            self.log.close()


class ModelServer(MlflowServer):
    """``mlflow models serve -m URI --env-manager local`` on 127.0.0.1, run by ``python``
    (any environment with MLflow: its ``uvicorn`` must come first on PATH)."""

    def __init__(self, python: str, model_uri: str, tracking_uri: str, root: str):
        super().__init__(root)
        self.python, self.model_uri, self.tracking_uri = python, model_uri, tracking_uri
        self.url = self.uri

    def start(self, timeout: float = 120, env: dict | None = None) -> "ModelServer":
        os.makedirs(self.root, exist_ok=True)
        self.log = open(os.path.join(self.root, "serve.log"), "w")
        bin_dir = os.path.dirname(self.python)
        env = dict(
            env or os.environ, MLFLOW_TRACKING_URI=self.tracking_uri, PATH=bin_dir + os.pathsep + os.environ["PATH"]
        )
        self.proc = subprocess.Popen(
            [
                self.python,
                "-m",
                "mlflow",
                "models",
                "serve",
                "-m",
                self.model_uri,
                "--env-manager",
                "local",
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-w",
                "1",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.root,
            env=env,
        )
        self._wait(self.url + "/ping", timeout, "serve.log")
        return self

    def post(self, body: bytes, content_type: str = "application/json", timeout: float = 120) -> tuple[int, bytes]:
        import urllib.error

        req = urllib.request.Request(self.url + "/invocations", data=body, headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
