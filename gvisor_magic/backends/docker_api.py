"""The docker-py calls this package makes beyond its public API, in one place.

docker-py has no public call for two things ``docker run`` itself does:

- register a container's wait *before* starting it (``POST /containers/ID/wait`` with
  ``condition=removed``, returning once the daemon has the wait): an auto-removed
  container's exit status would otherwise be lost;
- the plain socket under an attach stream (``attach_socket`` returns docker-py's
  ``SocketIO`` wrapper; we read Docker's multiplexed frames from the socket itself).

Both use names docker-py keeps private (``_url``, ``_post``, ``_raise_for_status``,
``SocketIO._sock``). ``pyproject.toml`` pins the range they were tested with
(docker 7.x; ``tests/test_docker_faults.py`` and the session tests exercise both); a
release that drops one fails here, with this module's name in the error.
"""

from __future__ import annotations

import socket

#: The docker-py releases whose private names below were tested (see pyproject.toml).
TESTED_RANGE = ">=7.0,<8"


def register_removal_wait(api, container_id: str):
    """A streaming response that completes when the container is removed; its JSON body has
    ``StatusCode``. Returns once the daemon has registered the wait (headers sent)."""
    try:
        url = api._url("/containers/{0}/wait", container_id)
        response = api._post(url, params={"condition": "removed"}, stream=True, timeout=None)
    except AttributeError as exc:  # a docker-py outside TESTED_RANGE
        raise RuntimeError(f"docker-py {getattr(api, '_version', '?')}: {exc} (this package "
                           f"was tested with docker{TESTED_RANGE})") from exc
    api._raise_for_status(response)
    return response


def raw_socket(stream) -> socket.socket:
    """The socket under what ``APIClient.attach_socket`` returned."""
    return getattr(stream, "_sock", stream)
