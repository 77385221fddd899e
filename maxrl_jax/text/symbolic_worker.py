"""Sympy comparisons of two math expressions, in worker processes that are killed at a timeout.

sympy can run for minutes and grow to gigabytes on short inputs (`simplify((x+1)**99999 - x)`), and a
Python thread cannot be stopped, so `MathVerifier` sends each comparison to a worker process instead:

    pool = WorkerPool(size=4, memory_limit_mb=1024)
    pool.compare("2*x+1", "1+2*x", timeout_s=5.0)   # True / False; None when it ran out of time
    pool.close()                                    # workers exit (also at interpreter exit)

A comparison that outlives its timeout has its worker killed (SIGKILL) and reaped before `compare` returns;
the next comparison starts a fresh worker. Each worker caps its own address space (RLIMIT_AS) at
`memory_limit_mb`, so a runaway expansion ends in a MemoryError (scored False) instead of swapping the host.
Idle workers are reused (starting one costs the sympy import, ~0.2 s) and wait on their pipe without using
CPU; a worker also exits when its parent process is gone.

This file imports nothing from the package: the workers run it as a script (`python symbolic_worker.py`),
so they load sympy and nothing else. Inputs must already be restricted sympy source (digits, operators,
parentheses, single-letter variables and a few function names: see math_verifier._latex_to_sympy); the
worker checks the characters and names again before parsing. POSIX only (select on pipes, the resource module).
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import threading
import time
import weakref

# What the restricted converter emits; anything else is refused before parse_expr (which evaluates) sees it.
_ALLOWED_SOURCE = re.compile(r"[0-9A-Za-z+\-*/(). ]+")
ALLOWED_NAMES = {"sqrt", "pi", "oo", "log", "ln", "sin", "cos", "tan", "exp"}  # Besides single letters.
_START_TIMEOUT_S = 120.0  # Python + sympy import; not counted in a comparison's timeout.


def symbolic_equal(source_a: str, source_b: str) -> bool:
    """Whether sympy.simplify(a - b) == 0 for two restricted sympy sources (False on any error)."""
    for source in (source_a, source_b):
        if not _ALLOWED_SOURCE.fullmatch(source):
            return False
        if any(len(name) > 1 and name not in ALLOWED_NAMES for name in re.findall(r"[A-Za-z]+", source)):
            return False
    import sympy  # pylint: disable=import-outside-toplevel
    from sympy.parsing import sympy_parser  # pylint: disable=import-outside-toplevel
    transformations = sympy_parser.standard_transformations + (sympy_parser.implicit_multiplication_application,)
    names = {"ln": sympy.log, "pi": sympy.pi, "oo": sympy.oo, "E": sympy.E}
    try:
        expr_a = sympy_parser.parse_expr(source_a, local_dict=dict(names), transformations=transformations)
        expr_b = sympy_parser.parse_expr(source_b, local_dict=dict(names), transformations=transformations)
        return bool(sympy.simplify(expr_a - expr_b) == 0)
    except Exception:  # pylint: disable=broad-except  # sympy raises many types on odd input
        return False


# ----------------------------------------------------------------------------------------------------------
# Worker side (this file run as a script).
# ----------------------------------------------------------------------------------------------------------


def _limit_address_space(memory_limit_mb: int) -> None:
    if memory_limit_mb <= 0:
        return
    import resource  # pylint: disable=import-outside-toplevel
    limit = int(memory_limit_mb) << 20
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _exit_when_orphaned(parent_pid: int) -> None:
    """Ends this process once its parent is gone (also while a comparison is running)."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(0)  # pylint: disable=protected-access


def _serve(memory_limit_mb: int, parent_pid: int) -> None:
    out = sys.stdout
    try:
        import sympy  # noqa: F401  # pylint: disable=import-outside-toplevel,unused-import
        from sympy.parsing import sympy_parser  # noqa: F401  # pylint: disable=import-outside-toplevel,unused-import
        _limit_address_space(memory_limit_mb)
    except Exception as e:  # pylint: disable=broad-except  # reported to the parent, which stops using sympy
        out.write(json.dumps({"ready": False, "error": f"{type(e).__name__}: {e}"}) + "\n")
        out.flush()
        return
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:  # One request per line; EOF (the parent closed the pipe or died) ends the worker.
        try:
            request = json.loads(line)
            reply = {"equal": symbolic_equal(str(request["a"]), str(request["b"]))}
        except MemoryError:
            reply = {"equal": False, "error": "MemoryError"}
        except Exception as e:  # pylint: disable=broad-except
            reply = {"equal": False, "error": type(e).__name__}
        out.write(json.dumps(reply) + "\n")
        out.flush()


# ----------------------------------------------------------------------------------------------------------
# Parent side.
# ----------------------------------------------------------------------------------------------------------


class _Worker:
    """One worker process and its pipes."""

    def __init__(self, memory_limit_mb: int):
        # -P: this file's directory is not put first on sys.path (its neighbours must not shadow modules).
        # A session of its own: a Ctrl-C at the terminal reaches the trainer, not the workers.
        flags = ["-P"] if sys.version_info >= (3, 11) else []
        self.process = subprocess.Popen(
            [sys.executable, *flags, os.path.abspath(__file__), str(int(memory_limit_mb)), str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, close_fds=True,
            start_new_session=True)

    @property
    def pid(self) -> int:
        return self.process.pid

    def read_reply(self, timeout_s: float) -> dict | None:
        """The next reply line, or None when none arrives within timeout_s (or the worker died)."""
        stdout = self.process.stdout
        ready, _, _ = select.select([stdout], [], [], max(timeout_s, 0.0))
        if not ready:
            return None
        line = stdout.readline()
        if not line:
            return None
        try:
            return json.loads(line)
        except ValueError:
            return None

    def request(self, source_a: str, source_b: str) -> bool:
        """Sends one comparison; False when the pipe is closed (the worker died)."""
        try:
            self.process.stdin.write((json.dumps({"a": source_a, "b": source_b}) + "\n").encode())
            self.process.stdin.flush()
            return True
        except (BrokenPipeError, OSError, ValueError):
            return False

    def kill(self) -> None:
        """SIGKILL, then reap: nothing of the worker is left running."""
        if self.process.poll() is None:
            try:
                self.process.kill()
            except OSError:
                pass
        try:
            self.process.wait(timeout=10.0)
        except subprocess.TimeoutExpired:
            pass
        for pipe in (self.process.stdin, self.process.stdout):
            try:
                pipe.close()
            except OSError:
                pass

    def stop(self) -> None:
        """Closes stdin (the idle worker exits); kills it if it does not exit promptly."""
        try:
            self.process.stdin.close()
        except OSError:
            pass
        try:
            self.process.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            pass
        self.kill()


def _close_workers(workers: list) -> None:
    for worker in list(workers):
        worker.stop()
    workers.clear()


class WorkerPool:
    """Up to `size` sympy worker processes, started on first use and reused; thread-safe.

    Args:
      size: most workers alive at once (concurrent comparisons beyond it wait for a free worker).
      memory_limit_mb: each worker's address-space limit (RLIMIT_AS), in MiB; 0 leaves it unlimited.
    """

    def __init__(self, size: int, memory_limit_mb: int = 1024):
        if size < 1:
            raise ValueError(f"WorkerPool size={size} must be >= 1.")
        self.size = int(size)
        self.memory_limit_mb = int(memory_limit_mb)
        self._idle: list[_Worker] = []
        self._live: list[_Worker] = []  # Every started worker not yet killed (idle or busy).
        self._starting = 0
        self._condition = threading.Condition()
        self._closed = False
        self.unavailable: str | None = None  # Why workers cannot start (e.g. sympy is not installed).
        self._finalizer = weakref.finalize(self, _close_workers, self._live)

    def worker_pids(self) -> list[int]:
        """Process ids of the workers alive now."""
        with self._condition:
            return [w.pid for w in self._live]

    def _acquire(self) -> _Worker | None:
        with self._condition:
            while True:
                if self._closed or self.unavailable:
                    return None
                if self._idle:
                    return self._idle.pop()
                if len(self._live) + self._starting < self.size:
                    self._starting += 1
                    break
                self._condition.wait()
        worker, error = None, None
        try:
            worker = _Worker(self.memory_limit_mb)
            reply = worker.read_reply(_START_TIMEOUT_S)
            if not reply or not reply.get("ready"):
                error = (reply or {}).get("error") or "the sympy worker did not start"
        except OSError as e:
            error = f"cannot start the sympy worker: {e}"
        if error is not None and worker is not None:
            worker.kill()
        with self._condition:
            self._starting -= 1
            closed = self._closed
            if error is None and not closed:
                self._live.append(worker)
            elif error is not None and self.unavailable is None:
                self.unavailable = error
            self._condition.notify_all()
        if error is None and closed:
            worker.stop()
            return None
        return worker if error is None else None

    def _release(self, worker: _Worker, healthy: bool) -> None:
        if not healthy:
            worker.kill()
        with self._condition:
            if healthy and not self._closed:
                self._idle.append(worker)
            else:
                if worker in self._live:
                    self._live.remove(worker)
            self._condition.notify_all()
        if healthy and self._closed:
            worker.stop()

    def compare(self, source_a: str, source_b: str, timeout_s: float) -> bool | None:
        """sympy.simplify(a - b) == 0 in a worker; None when it took longer than timeout_s (worker killed).

        Worker start-up is not counted in timeout_s. False when the pool is closed or workers cannot start.
        """
        worker = self._acquire()
        if worker is None:
            return False
        if not worker.request(source_a, source_b):
            self._release(worker, healthy=False)
            return False
        reply = worker.read_reply(timeout_s)
        if reply is None:  # Too slow, or the worker died (e.g. killed by the kernel): kill and reap it.
            self._release(worker, healthy=False)
            return None
        self._release(worker, healthy=True)
        return bool(reply.get("equal"))

    def close(self) -> None:
        """Stops every worker (waits for none: busy ones are killed)."""
        with self._condition:
            self._closed = True
            idle, self._idle = self._idle, []
            self._condition.notify_all()
        for worker in idle:
            worker.stop()
            with self._condition:
                if worker in self._live:
                    self._live.remove(worker)
        with self._condition:
            busy = list(self._live)
        for worker in busy:
            worker.kill()
        with self._condition:
            self._live.clear()


if __name__ == "__main__":
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    _serve(memory_limit_mb=int(sys.argv[1]), parent_pid=int(sys.argv[2]))
