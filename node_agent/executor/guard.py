"""Run a command in a container and stop it when the agent that started it goes away.

The Docker executor runs Blender as ``python3 -I guard.py -- COMMAND...`` with the container's
standard input attached to the agent: the agent holds that attach connection for the whole
run and writes nothing to it. When the agent process ends, even by SIGKILL, the connection
closes, Docker closes the container's standard input (``stdin_once``), and this guard reads
end of file: it kills the command's process group, so the container stops instead of
rendering on for nobody.

The guard also passes SIGTERM, SIGINT and SIGHUP (``docker stop``) on to the command's process
group and exits with the command's status: its exit code, or ``128 + N`` when signal N ended
it (as a shell reports it). Exit 127: the command could not be started; 2: bad usage.

Standard library only: it runs with the render image's ``python3``, beside any Blender.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

READ_BYTES = 65536
"""Size of each read from standard input, in bytes (the agent sends nothing: only EOF matters)."""


def _signal_group(pgid: int, sig: int) -> None:
    """Send ``sig`` to process group ``pgid``; a group already gone is fine."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def main(argv: list[str]) -> int:
    """Run ``argv[1:]`` (after a ``--``) until it exits or standard input closes.

    Returns the exit status to exit with: the command's, ``128 + N`` for signal N, 127 when
    it cannot be started, 2 when ``argv`` is not ``-- COMMAND [ARGS...]``.
    """
    if len(argv) < 2 or argv[0] != "--":
        print("usage: guard.py -- COMMAND [ARGS...]", file=sys.stderr, flush=True)
        return 2
    command = argv[1:]
    try:
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True)
    except OSError as exc:
        print(f"guard: cannot start {command[0]}: {exc}", file=sys.stderr, flush=True)
        return 127

    def forward(signum: int, _frame: object) -> None:
        _signal_group(child.pid, signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)

    def watch_stdin() -> None:
        try:
            while os.read(0, READ_BYTES):
                pass
        except OSError:
            pass
        if child.poll() is None:
            message = "guard: standard input closed (the agent is gone): killing the render"
            print(message, file=sys.stderr, flush=True)
            _signal_group(child.pid, signal.SIGKILL)

    threading.Thread(target=watch_stdin, name="stdin-watch", daemon=True).start()
    status = child.wait()
    _signal_group(child.pid, signal.SIGKILL)  # whatever the command left in its group
    return 128 - status if status < 0 else status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
