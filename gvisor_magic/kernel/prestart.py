"""Kernels ready before the first notebook opens: a Jupyter server extension.

The kernel pool (``pool.py``) learns a recipe from a kernel's start, so the first notebook
a server opens waits for a whole kernel start (about 2 s here) and only the next ones find
a kernel ready. As Jupyter Kernel Gateway pre-spawns ``prespawn_count`` kernels when it
starts, this extension has the pool start, as the server starts, the kernels the likeliest
first notebook would get: for every "Python 3 (gVisor)" kernelspec with a ``pool`` above
0, ``pool`` kernels of the recipe of a notebook in the server's root dir, on the server's
own environment (what ``SessionManager.get_kernel_env`` gives a kernel, less its notebook's
name). The recipe is made by the provisioner itself (``GvisorProvisioner.recipe``), with
the server's configuration of it, so it is exactly the one a start there asks for; a
notebook in another folder, or a kernelspec changed since, simply starts its kernel, which
then teaches the pool its recipe as before.

Nothing here runs on the server's event loop: the probe of runsc and the starts run in one
background thread, so the server answers at once; where gVisor cannot run, the thread logs
why and starts nothing. ``gvisor-magic kernelspec install`` enables the extension beside
the kernelspec (``jupyter server extension enable gvisor_magic.kernel.prestart`` does the
same by hand); ``kernelspec remove`` disables it.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from . import PROVISIONER_NAME
from .pool import CONNECTION_FILE, POOL, Recipe

#: The extension's name, as ``jpserver_extensions`` and ``jupyter server extension`` name it.
EXTENSION = "gvisor_magic.kernel.prestart"


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": EXTENSION}]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    """Start the pool's first kernels in the background; the server does not wait."""
    threading.Thread(target=prestart, args=(serverapp.kernel_manager,), daemon=True,
                     name="gvisor-magic-prestart").start()


def prestart(kernel_manager: Any) -> list[Recipe]:
    """Have the pool start kernels for a notebook in the server's root dir, of every gVisor
    kernelspec ``kernel_manager`` (a server's ``MappingKernelManager``) knows; the recipes
    it was asked to keep ready. Never raises: a server starts whatever this finds."""
    log = kernel_manager.log  # the server's: what it says lands in the server's log
    asked = []
    try:
        specs = kernel_manager.kernel_spec_manager.get_all_specs()
    except Exception as exc:  # a broken kernelspec elsewhere is not ours to report
        log.warning("gvisor: no kernel started ahead of need: the kernelspecs could not "
                    "be read (%s)", exc)
        return asked
    for name, found in sorted(specs.items()):
        metadata = found.get("spec", {}).get("metadata", {})
        if metadata.get("kernel_provisioner", {}).get("provisioner_name") != PROVISIONER_NAME:
            continue
        try:
            km, provisioner = _made_as_a_start(kernel_manager, name)
            if provisioner.pool <= 0:
                log.info("gvisor: %s has pool 0: no kernel is started ahead of need", name)
                continue
            recipe = recipe_at_start(km, provisioner, kernel_manager.cwd_for_path(""))
        except Exception as exc:  # GvisorKernelUnavailable says why, with the fix
            log.warning("gvisor: no %s kernel started ahead of need: %s", name, exc)
            continue
        log.info("gvisor: starting %d %s kernel(s) ahead of need, for notebooks in %s",
                 provisioner.pool, name, recipe.spec.working_dir)
        POOL.fill(recipe, provisioner.pool)
        asked.append(recipe)
    return asked


def _made_as_a_start(kernel_manager: Any, kernel_name: str) -> tuple[Any, Any]:
    """A ``KernelManager`` of ``kernel_name`` and its provisioner, made as the server makes
    them for a start (its kernel manager factory, the provisioner factory, its config)."""
    from jupyter_client.provisioning import KernelProvisionerFactory

    km = kernel_manager.kernel_manager_factory(
        connection_file=os.path.join(kernel_manager.connection_dir, "kernel-prestart.json"),
        parent=kernel_manager, log=kernel_manager.log, kernel_name=kernel_name,
        kernel_spec_manager=kernel_manager.kernel_spec_manager)
    provisioner = KernelProvisionerFactory.instance(
        parent=kernel_manager.parent).create_provisioner_instance(
        "prestart", km.kernel_spec, parent=km)
    return km, provisioner


def recipe_at_start(km: Any, provisioner: Any, cwd: str) -> Recipe:
    """The recipe of a kernel ``km`` would start in ``cwd`` with the server's environment
    (``pre_launch``'s own, ``GvisorProvisioner.recipe``), with its command formatted as
    ``format_kernel_cmd`` formats it; nothing is started."""
    recipe, env = provisioner.recipe(dict(os.environ), cwd)
    km._launch_args = {"env": env, "cwd": cwd}  # what format_kernel_cmd may name
    named = {km.connection_file, os.path.realpath(km.connection_file)}
    kernel_cmd = tuple(CONNECTION_FILE if arg in named else arg
                       for arg in km.format_kernel_cmd())
    return Recipe(recipe.spec, recipe.argv, recipe.env, recipe.state_base, kernel_cmd)
