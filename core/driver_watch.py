"""Workers that stop when the driver that started them is gone.

A local Ray cluster outlives a driver killed with SIGKILL, and so do its actors and Ray Train
workers: they would finish the job behind the user's back and race with the ``--resume`` that
follows. Each worker on the driver's machine watches the driver's process id and exits as soon as
it is gone (workers on other machines are ended by Ray when their job's driver disconnects).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Optional


def driver_identity() -> dict[str, object]:
    """What a worker needs to watch this process: its host name and process id."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def watch_driver(identity: Optional[dict[str, object]], interval_s: float = 0.5) -> None:
    """Start a daemon thread that ends this process when the driver in ``identity`` has exited.

    Does nothing when ``identity`` is None, names another host, or is this very process.
    """
    if not identity or identity.get("host") != socket.gethostname():
        return
    pid = int(identity["pid"])  # type: ignore[arg-type]
    if pid == os.getpid():
        return

    def watch() -> None:
        while _alive(pid):
            time.sleep(interval_s)
        os._exit(1)

    threading.Thread(target=watch, name="arcflow-driver-watch", daemon=True).start()

