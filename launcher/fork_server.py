"""Imported by the fork server alone (the last of ``launcher.__main__.PRELOAD``): names it
``dyn-actor fork server`` in ``ps`` and ``top``, where it would show as a long ``python -c`` line.
The children it forks rename themselves when they start."""

from launcher.processes import name_process

name_process("dyn-actor fork server")
