"""`python -m src.<stage> args...`, each run a fresh process forked from one that imported the heavy
libraries once (torch, pydantic, gymnasium, mlflow...): the real CLI path (`__main__`, `run_cli`, exit
status, stdout and stderr) at a fraction of an interpreter start.

On 2 shared cores a plain `python -m src.train --bad-flag` spends ~4 s importing before it can refuse;
forked from a warm process the same run takes well under a second. The warm process runs no torch
operation before it forks (so no OpenMP pool, no thread), and each child sets its own working
folder, environment and argv, then runs the module with `runpy` as `__main__`, as Python would.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ZYGOTE = r"""
import atexit, json, os, resource, runpy, sys, threading, traceback
import numpy, torch, yaml, pydantic, PIL.Image, cv2, gymnasium, ale_py, mlflow, optuna  # once, for every run
import src.params, src.data, src.errors  # libraries of the stages, never a stage module (runpy runs those)
src.params.ale_game_ids()
assert threading.active_count() == 1, "forking a process with threads is unsafe"
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        for fd, name in ((1, req["stdout"]), (2, req["stderr"])):
            os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
        sys.stdin = open(os.devnull)
        for name, value in req["limits"].items():  # e.g. FSIZE: the OS refuses bigger files, like a full disk
            resource.setrlimit(getattr(resource, "RLIMIT_" + name), (value, value))
        sys.argv = [req["module"], *req["args"]]
        sys.path[0] = req["cwd"]
        try:
            runpy.run_module(req["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if not isinstance(exc.code, (int, type(None))):
                print(exc.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()  # what an ending interpreter runs; then exit without the slow teardown
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class ForkedCLI:
    """One warm process; `run(module, *args, cwd=..., env=...)` forks a child of it per call."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], env={**env, "OMP_NUM_THREADS": "1"},
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.scratch = Path(tempfile.mkdtemp(prefix="forked-cli-"))
        assert json.loads(self._read(300)).get("ready"), "the warm CLI process did not start"

    def _read(self, timeout: float) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"no answer from the warm CLI process in {timeout:.0f} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the warm CLI process ended")
        return line

    def run(self, module: str, *args: str, cwd: Path, env: dict[str, str], timeout: float = 300,
            limits: dict[str, int] | None = None) -> subprocess.CompletedProcess:
        """`python -m module args...` in `cwd` with exactly `env`; `limits` are rlimits (`{"FSIZE": 1000}`)."""
        out, err = self.scratch / "stdout", self.scratch / "stderr"
        request = {"module": module, "args": list(args), "cwd": str(cwd), "env": env,
                   "stdout": str(out), "stderr": str(err), "limits": limits or {}}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        pid = json.loads(self._read(60))["pid"]
        try:
            code = json.loads(self._read(timeout))["code"]
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            self._read(60)
            raise
        return subprocess.CompletedProcess([module, *args], code, out.read_text(), err.read_text())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        for name in ("stdout", "stderr"):
            (self.scratch / name).unlink(missing_ok=True)
        self.scratch.rmdir()
