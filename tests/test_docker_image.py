"""GVISOR_MAGIC_IMAGE: a real image brings its own system, and gets no host directories."""

from __future__ import annotations

import io
import os
import tarfile

import pytest

from gvisor_magic import run_command_isolated

IMAGE = "gvisor-magic/test-dash:latest"


def _add(tar: tarfile.TarFile, path: str, arcname: str | None = None) -> None:
    tar.add(os.path.realpath(path), arcname=(arcname or path).lstrip("/"), recursive=False)


@pytest.fixture(scope="module")
def dash_image(docker_works):
    """A two-megabyte image holding only the host's dash and the C library it needs."""
    import docker

    client = docker.from_env()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for directory in ("bin", "lib", "lib64", "tmp", "etc", "lib/x86_64-linux-gnu"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if directory == "tmp" else 0o755
            tar.addfile(info)
        _add(tar, "/usr/bin/dash", "/bin/sh")
        for lib in ("/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2"):
            if not os.path.exists(lib):
                pytest.skip(f"{lib} is missing: this image recipe is for x86-64 Debian")
            _add(tar, lib)
    client.api.import_image_from_data(buffer.getvalue(), repository=IMAGE.split(":")[0],
                                      tag="latest")
    yield IMAGE
    client.images.remove(IMAGE, force=True)
    client.close()


def test_a_real_image_runs_without_host_directories(dash_image, monkeypatch, tmp_path):
    monkeypatch.setenv("GVISOR_MAGIC_IMAGE", dash_image)
    result = run_command_isolated(
        "echo from-image; [ -e /usr/bin/python3 ] && echo host-usr-visible; echo x > out.txt; "
        "exit 5", mode="docker", working_dir=tmp_path)
    assert result.backend == "docker" and result.isolated
    assert result.stdout == "from-image\n"
    assert result.returncode == 5
    assert result.details["image"] == dash_image
    assert (tmp_path / "out.txt").read_text() == "x\n"
