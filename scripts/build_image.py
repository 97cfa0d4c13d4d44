#!/usr/bin/env python3
"""Build the single-user image of deploy/kubernetes/Dockerfile here, with no image registry.

    python3 scripts/build_image.py [--tag gvisor-magic/singleuser:VERSION] [--rebuild-base]

The Dockerfile builds on any image with the docker-stacks contract. Where no registry is
reachable, this script makes one locally first (``gvisor-magic/debian-base:bookworm``):

1. ``debootstrap`` Debian bookworm from the Debian mirror of this machine's own apt sources
   (the same derivation ``gvisor-magic install`` uses for backports);
2. in that tree: Python 3, a venv at ``/opt/conda`` (``CONDA_DIR``) owned by ``jovyan``
   (uid 1000, gid 100) with ``jupyter_server``, ``jupyterhub`` (``jupyterhub-singleuser``) and
   ``ipykernel`` from the package index this machine's pip uses;
3. ``docker import`` with the contract's environment (``NB_USER``, ``NB_UID``, ``NB_GID``,
   ``CONDA_DIR``, ``PATH``) and ``USER 1000``.

Then the real Dockerfile runs on it with ``RUNSC_METHOD=apt`` (Debian's backports: the
official release site is out of reach here). The base is built once and reused; the final
image uses Docker's layer cache. Needs root (debootstrap, chroot) and a running dockerd.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gvisor_magic import __version__  # noqa: E402
from gvisor_magic.install.runsc import debian_suite_source, read_apt_sources  # noqa: E402

BASE_IMAGE = "gvisor-magic/debian-base:bookworm"
IMAGE = f"gvisor-magic/singleuser:{__version__}"
SUITE = "bookworm"
DOCKERFILE = "deploy/kubernetes/Dockerfile"
#: What the base's venv holds: a single-user server, the hub's wrapper of it, a kernel.
SERVER_PACKAGES = ("jupyter_server>=2.10", "jupyterhub>=5.0", "ipykernel>=6.29")
#: Where the machine's CA bundle goes in the base, so pip in the Dockerfile's build trusts
#: the index this machine's pip reaches (a site proxy's CA, if it has one).
SITE_CA = "/etc/ssl/certs/gvisor-magic-site-ca.crt"
#: Bumped when the recipe below changes in a way the inputs do not show.
RECIPE = 2
CONTRACT = {"NB_USER": "jovyan", "NB_UID": "1000", "NB_GID": "100", "CONDA_DIR": "/opt/conda",
            "HOME": "/home/jovyan", "SHELL": "/bin/bash", "LANG": "C.UTF-8",
            "PATH": "/opt/conda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}


def say(text: str) -> None:
    print(f"build_image: {text}", flush=True)


def run(*argv: str, **kwargs) -> None:
    say("+ " + " ".join(argv))
    subprocess.run(argv, check=True, **kwargs)


def mirror() -> str:
    """The machine's own Debian mirror for the suite (never a host written down here)."""
    source = debian_suite_source(read_apt_sources(), SUITE)
    return source.uris[0]


def recipe_id() -> str:
    """Names what the base is made of: a base built from another recipe is made again."""
    text = json.dumps([RECIPE, SUITE, SERVER_PACKAGES, CONTRACT, SITE_CA], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def pip_settings(tree: Path) -> dict[str, str]:
    """This machine's pip configuration, carried into the tree (index, CA bundle).

    The CA bundle stays in the base (``PIP_CERT``): the Dockerfile's own ``pip install``
    must reach the same index, as a site's base image carries the site's CA."""
    env = {k: v for k, v in os.environ.items() if k.startswith("PIP_")}
    if os.path.isfile("/etc/pip.conf"):
        shutil.copy2("/etc/pip.conf", tree / "etc/pip.conf")
    bundle = env.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt"
    if os.path.isfile(bundle):
        shutil.copy2(bundle, tree / SITE_CA.lstrip("/"))
        env["PIP_CERT"] = SITE_CA
    links = env.get("PIP_FIND_LINKS")
    if links and os.path.isdir(links):  # a local wheel dir: the chroot sees a copy
        shutil.copytree(links, tree / "tmp" / "find-links", dirs_exist_ok=True)
        env["PIP_FIND_LINKS"] = "/tmp/find-links"
    return env


def chroot(tree: Path, *argv: str, env: dict[str, str] | None = None) -> None:
    run("chroot", str(tree), *argv, env={"PATH": CONTRACT["PATH"], "LANG": "C.UTF-8",
                                          "HOME": "/root", **(env or {})})


def build_base(client) -> None:
    work = Path(tempfile.mkdtemp(prefix="gvm-debootstrap-"))
    tree = work / "rootfs"
    try:
        run("debootstrap", "--variant=minbase",
            "--include=python3,python3-venv,ca-certificates,bash,uidmap",
            SUITE, str(tree), mirror())
        shutil.copy2("/etc/resolv.conf", tree / "etc/resolv.conf")
        env = pip_settings(tree)
        chroot(tree, "useradd", "--uid", "1000", "--gid", "100", "--create-home",
               "--shell", "/bin/bash", "jovyan")
        chroot(tree, "python3", "-m", "venv", "/opt/conda")
        chroot(tree, "/opt/conda/bin/pip", "install", "--quiet", "--no-cache-dir",
               *SERVER_PACKAGES, env=env)
        chroot(tree, "chown", "-R", "1000:100", "/opt/conda")
        for leftover in ("tmp/find-links", "etc/resolv.conf"):
            path = tree / leftover
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        (tree / "etc/resolv.conf").touch()  # Docker mounts its own over it
        archive = work / "rootfs.tar"
        run("tar", "--numeric-owner", "--xattrs", "-C", str(tree), "-cf", str(archive), ".")
        contract = dict(CONTRACT, **({"PIP_CERT": SITE_CA} if "PIP_CERT" in env else {}))
        changes = [f"ENV {name}={value}" for name, value in contract.items()]
        changes += ["USER 1000", "WORKDIR /home/jovyan", 'CMD ["jupyter-server"]',
                    f"LABEL org.gvisor-magic.base-recipe={recipe_id()}"]
        say(f"docker import -> {BASE_IMAGE}")
        repository, tag = BASE_IMAGE.rsplit(":", 1)
        client.api.import_image_from_file(str(archive), repository=repository, tag=tag,
                                          changes=changes)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build_image(client, tag: str) -> None:
    say(f"docker build {DOCKERFILE} on {BASE_IMAGE} -> {tag}")
    for chunk in client.api.build(path=str(ROOT), dockerfile=DOCKERFILE, tag=tag, rm=True,
                                  forcerm=True, network_mode="host", decode=True,
                                  buildargs={"BASE_IMAGE": BASE_IMAGE, "RUNSC_METHOD": "apt"}):
        if "stream" in chunk:
            sys.stdout.write(chunk["stream"])
        if "error" in chunk:
            raise SystemExit(f"build_image: the build failed: {chunk['error']}")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tag", default=IMAGE, help=f"the image to build (default {IMAGE})")
    parser.add_argument("--rebuild-base", action="store_true",
                        help=f"debootstrap {BASE_IMAGE} again even if it exists")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("build_image: needs root (debootstrap and chroot)")
    if not shutil.which("debootstrap"):
        raise SystemExit("build_image: debootstrap is missing (apt-get install debootstrap)")
    import docker

    client = docker.from_env(timeout=600)
    try:
        import docker.errors

        try:
            made_by = client.images.get(BASE_IMAGE).labels.get("org.gvisor-magic.base-recipe")
        except docker.errors.ImageNotFound:
            made_by = None
        if args.rebuild_base or made_by != recipe_id():
            build_base(client)
        else:
            say(f"{BASE_IMAGE} exists, from this recipe (--rebuild-base makes it again)")
        build_image(client, args.tag)
    finally:
        client.close()
    say(f"built {args.tag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
