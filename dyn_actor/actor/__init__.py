"""The actor runtime: ``Actor`` + ``serve_actor`` on one side, ``ActorRef`` (tell / ask / stream) on the other.

The same API runs in one process (``inproc://`` endpoints, for tests) and
across processes (``ipc://`` files): only the endpoint string differs.
"""

from dyn_actor.actor.ref import ActorDeadError, ActorError, ActorRef
from dyn_actor.actor.server import Actor, ActorServer

__all__ = ["Actor", "ActorDeadError", "ActorError", "ActorRef", "ActorServer"]
