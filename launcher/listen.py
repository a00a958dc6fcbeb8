"""The HTTP port, bound by the launcher and handed to the frontend processes.

Binding in the launcher means a taken port is a one-line error before anything starts, and
that every frontend process serves the same port. With one frontend it gets the plain
listening socket. With several (``--frontends N``), each gets a socket of its own bound with
``SO_REUSEPORT``, and the kernel hashes each new connection to one of them. A shared socket
would not spread the load: an event loop accepts every connection waiting in the backlog at
once, so a burst of clients can land on one process.

``SO_REUSEPORT`` would also let another server of the same user join the group on that port
and take a share of its connections. A plain listening socket comes first, as a probe: it fails
while anything else holds the port, and the group is bound only once the probe got the port.
The sockets listen from the start, so a client that connects before the frontends are ready
waits in the queue instead of being refused.
"""

from __future__ import annotations

import socket

BACKLOG = 1024  # connections the kernel queues for a frontend before it accepts them


def _addresses(host: str, port: int) -> list[tuple]:
    """(family, sockaddr) of each address ``host`` names, without repeats."""
    out: list[tuple] = []
    for family, _type, _proto, _name, addr in socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                                  flags=socket.AI_PASSIVE):
        if (family, addr) not in out:
            out.append((family, addr))
    return out


def _bind(family: int, addr: tuple, reuse_port: bool) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's servers: past TIME_WAIT
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # its IPv4 twin is bound on its own
        sock.bind(addr)
        sock.listen(BACKLOG)  # listening at once: two bound sockets with SO_REUSEADDR could share the port
    except BaseException:
        sock.close()
        raise
    return sock


def listen_sockets(host: str, port: int, copies: int) -> list[list[socket.socket]]:
    """Bind ``host:port`` for ``copies`` frontend processes: for each, one socket per address
    that ``host`` names (``localhost``: IPv4 and IPv6). Port 0 picks a free port, the same for
    all. Raises ``OSError`` when the port is taken."""
    probes: list[socket.socket] = []
    try:
        for family, addr in _addresses(host, port):
            if port == 0 and probes:  # the other addresses take the port the first one got
                addr = (addr[0], probes[0].getsockname()[1], *addr[2:])
            probes.append(_bind(family, addr, reuse_port=False))
        if copies == 1:
            return [probes]
        bound = [(p.family, p.getsockname()) for p in probes]
    except BaseException:
        for p in probes:
            p.close()
        raise
    for p in probes:
        p.close()
    groups: list[list[socket.socket]] = [[] for _ in range(copies)]
    try:
        for group in groups:
            for family, addr in bound:
                group.append(_bind(family, addr, reuse_port=True))
    except BaseException:
        for group in groups:
            for s in group:
                s.close()
        raise
    return groups


def frontend_sockets(host: str, port: int, copies: int) -> list[socket.socket]:
    """Sockets for one frontend that restarts, on the port the launcher bound at start: a plain one
    again when it is the only frontend, else ``SO_REUSEPORT`` ones that join the others' group."""
    if copies == 1:
        return listen_sockets(host, port, 1)[0]
    out: list[socket.socket] = []
    try:
        for family, addr in _addresses(host, port):
            out.append(_bind(family, addr, reuse_port=True))
    except BaseException:
        for s in out:
            s.close()
        raise
    return out

