"""Imported by the fork server alone (the last of ``launcher.__main__.PRELOAD``): names it
``dyn-actor fork server`` in ``ps`` and ``top``, where it would show as a long ``python -c`` line,
and lets it exit at once when the launcher stops it. The children it forks rename themselves when
they start."""

import atexit
import os
import sys

from launcher.processes import name_process

name_process("dyn-actor fork server")

_SERVER = os.getpid()


def _exit_now() -> None:
    """The fork server's last act: leave without tearing down the interpreter (torch's and the
    other preloaded modules' finalisation took 0.6-0.7 s of every stop, and it holds nothing that
    needs it). Registered last, so it runs first; a child forked from here leaves by ``os._exit``
    and never gets to it (and is not the server, should it)."""
    if os.getpid() == _SERVER:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


atexit.register(_exit_now)
