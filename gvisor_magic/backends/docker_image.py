"""The local image the Docker backend runs in: empty, built here, never pulled.

There is no registry to pull from on many machines, and a pulled image would
not have the notebook's tools anyway. So the default image is an empty
filesystem made with ``docker import`` of an empty tar; the host's system
directories are bind-mounted into it read-only, exactly like the runsc backend.
"""

from __future__ import annotations

import io
import tarfile
import threading

SCRATCH_IMAGE = "gvisor-magic/scratch:latest"
_lock = threading.Lock()


def empty_tar() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w"):
        pass
    return buffer.getvalue()


def ensure_scratch_image(client, tag: str = SCRATCH_IMAGE) -> str:
    """Return ``tag``, importing an empty image under that name if it is missing.

    ``client`` is a ``docker.DockerClient``. Idempotent and thread-safe.
    """
    import docker.errors

    with _lock:
        try:
            client.images.get(tag)
            return tag
        except docker.errors.ImageNotFound:
            pass
        repository, _, version = tag.partition(":")
        client.api.import_image_from_data(empty_tar(), repository=repository,
                                          tag=version or "latest")
        client.images.get(tag)
        return tag
