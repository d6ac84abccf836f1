"""Opening an HTTP server's listening socket, with one sentence when the address cannot be taken."""

from __future__ import annotations

import errno
import socket

from aiohttp import web

from core.errors import ServiceUnavailable


async def start_site(runner: web.AppRunner, host: str, port: int, *, what: str, settings: str) -> None:
    """Listen on host:port for `runner` (set up already); `cannot_listen` says why when it cannot."""
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as err:
        raise cannot_listen(err, host, port, what=what, settings=settings) from err


def cannot_listen(err: OSError, host: str, port: int, *, what: str, settings: str) -> ServiceUnavailable:
    """The sentence for a listening socket that could not be opened: a port in use (most often another
    instance), a port below 1024 without the right, or a host that is not this machine's, naming the
    address and `settings`, the variables that choose it."""
    where = f"{host}:{port}"
    if err.errno == errno.EADDRINUSE:
        reason = f"{where} is already in use (is another huahua running?)"
    elif err.errno == errno.EACCES:
        reason = f"{where} needs privileges this process lacks (ports below 1024 do)"
    elif isinstance(err, socket.gaierror) or err.errno == errno.EADDRNOTAVAIL:
        reason = f"{host} is not a name or address of this machine"
    else:
        reason = f"{where} cannot be opened ({err.strerror or err})"
    return ServiceUnavailable(f"{what} cannot listen: {reason}. Choose another with {settings}.")
