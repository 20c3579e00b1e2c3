"""Child processes: starting them so that they stop with the benchmark, running
commands, cargo builds, ports, HTTP, and the entry point's error and signal handling."""
from __future__ import annotations

import ctypes
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent() -> None:
    # PR_SET_PDEATHSIG: the child gets SIGTERM if this script dies, even by SIGKILL.
    _libc.prctl(1, signal.SIGTERM)


class Cleanup:
    """Everything started, stopped in reverse order on exit (normal, error or signal)."""

    def __init__(self) -> None:
        self.actions: list[tuple[str, object]] = []

    def add(self, what: str, fn) -> None:
        self.actions.append((what, fn))

    def run(self) -> None:
        while self.actions:
            what, fn = self.actions.pop()
            try:
                fn()
            except Exception as e:  # keep cleaning up
                log(f"cleanup of {what} failed: {e}")


CLEANUP = Cleanup()


def stop_process(p: subprocess.Popen, sig=signal.SIGTERM, timeout=20.0) -> None:
    if p.poll() is not None:
        return
    p.send_signal(sig)
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def spawn(args, *, log_path: Path | None = None, stdout=None, stderr=None, env=None, **kw) -> subprocess.Popen:
    """Starts a child that is stopped at exit; its output goes to log_path unless
    stdout/stderr say otherwise."""
    f = open(log_path, "ab") if log_path is not None else None
    try:
        p = subprocess.Popen([str(a) for a in args], stdout=stdout if stdout is not None else f,
                             stderr=stderr if stderr is not None else f, stdin=subprocess.DEVNULL,
                             env=env, preexec_fn=die_with_parent, **kw)
    finally:
        if f is not None:
            f.close()  # the child holds its own descriptor
    CLEANUP.add(f"{Path(str(args[0])).name} (pid {p.pid})", lambda: stop_process(p))
    return p


def run(args, *, check=True, env=None, timeout=None, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env,
                       timeout=timeout, preexec_fn=die_with_parent, **kw)
    if check and r.returncode != 0:
        raise BenchError(f"{' '.join(map(str, args))[:200]} exited with {r.returncode}: {r.stderr.strip()[-2000:]}")
    return r


def cargo_build(repo: Path, targets: list[str]) -> None:
    """cargo build --release of `targets` (--bin X, --example Y), output to the terminal."""
    if subprocess.run(["cargo", "build", "--release", *targets], cwd=repo).returncode != 0:
        raise BenchError("cargo build --release failed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, what: str, log_path: Path, timeout=60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise BenchError(f"{what} did not listen on {port}; see {log_path}")
            time.sleep(0.05)


def http_get(url: str, timeout=5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def wait_ready(p: subprocess.Popen, base_url: str, log_path: Path, *, timeout: float, interval: float) -> None:
    """Waits until the relay `p` answers "ready" on base_url/readyz."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            code, body = http_get(base_url + "/readyz", timeout=1)
            if code == 200 and body.startswith("ready"):
                return
        except OSError:
            pass
        if p.poll() is not None or time.monotonic() > deadline:
            raise BenchError(f"relay did not become ready; see {log_path}")
        time.sleep(interval)


def _on_signal(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run_main(main) -> int:
    """Runs a script's main(): SIGTERM and SIGHUP interrupt it like Ctrl-C, a BenchError
    is logged, and everything started is stopped however it ends. Returns the exit code."""
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _on_signal)
    code = 1
    try:
        code = main()
    except BenchError as e:
        log(f"error: {e}")
    except KeyboardInterrupt:
        log("interrupted")
        code = 130
    finally:
        CLEANUP.run()
    return code
