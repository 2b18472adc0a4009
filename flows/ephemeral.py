"""The temporary Prefect API server of ``synthmed run``, tied to the process that started it.

Without ``PREFECT_API_URL`` Prefect starts a temporary server (``uvicorn`` in a child
process) on first use and stops it at interpreter exit (``atexit``). A run killed with
SIGKILL never gets there, and the server outlived it. Here the CLI starts that server
itself, before the flow, from the main thread, with the Linux parent-death signal set
in the child (``prctl(PR_SET_PDEATHSIG, SIGTERM)``): the kernel stops the server when
the ``synthmed`` process dies, however it dies. Prefect then finds the running server
(it is registered where Prefect looks for its default temporary server) and uses it.
The parent-death signal follows the *thread* that started the child; the main thread
lives as long as the process, so the server does too, and no longer.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import subprocess
import sys
from typing import Any, Callable

import prefect
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, get_current_settings

from generators.errors import SynthmedError

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _die_with_parent(parent_pid: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when ``parent_pid`` dies (None
    where ``prctl`` is unavailable, i.e. not Linux). ``prctl`` is looked up here, in the
    parent, so the child only makes one system call before ``exec``."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).prctl

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before the signal was armed
            os._exit(1)

    return preexec


class TiedServer(SubprocessASGIServer):
    """Prefect's temporary server, started with :func:`_die_with_parent`. The command is
    Prefect's own (``SubprocessASGIServer._run_uvicorn_command`` in prefect 3.8, pinned in
    constraints.txt); only ``preexec_fn`` is added."""

    def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
        server_env = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        # no telemetry heartbeat from a local server (offline it logs ERROR lines and, with two
        # servers on one SQLite file, a 'database is locked' traceback), unless the user set it
        server_env["PREFECT_SERVER_ANALYTICS_ENABLED"] = os.environ.get("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        return subprocess.Popen(
            args=[
                sys.executable,
                "-m",
                "uvicorn",
                "--app-dir",
                str(prefect.__module_path__.parent),
                "--factory",
                "prefect.server.api.server:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "error",
                "--lifespan",
                "on",
            ],
            env={
                **os.environ,
                **server_env,
                **get_current_settings().to_environment_variables(exclude_unset=True),
            },
            preexec_fn=_die_with_parent(os.getpid()),
        )


def start_tied_server() -> TiedServer | None:
    """Start the temporary server for this process (call from the main thread, before any
    flow); None when ``PREFECT_API_URL`` names a server to use instead. Prefect stops it
    at exit as usual; the kernel stops it when this process is killed."""
    if PREFECT_API_URL.value():
        return None
    if SubprocessASGIServer._instances.get(None) is not None:  # already made in this process
        return None
    # Prefect asks SubprocessASGIServer() (port None) for its temporary server; the class
    # keeps one instance per port, and TiedServer() with no port takes that place.
    server = TiedServer()
    try:
        server.start()
    except RuntimeError as exc:  # Prefect's "timed out" / "no free port"
        server.stop()
        raise SynthmedError(
            f"the temporary Prefect server did not start ({' '.join(str(exc).split())[:160]}); "
            f"raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (now "
            f"{PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()} s) on a busy machine, "
            "or set PREFECT_API_URL to a running server"
        ) from exc
    return server
