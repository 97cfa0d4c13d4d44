"""The "Python 3 (gVisor)" kernel: ipykernel itself runs inside a gVisor sandbox.

``%%isolated`` protects shell commands; this kernel protects everything a notebook does:
Python, ``!`` commands, ``subprocess``, C extensions, ``pickle.load`` of an untrusted file.

- ``kernelspec``: the ``python3-gvisor`` kernelspec (``gvisor-magic kernelspec install``);
- ``provisioner``: the ``jupyter_client`` kernel provisioner it names, which talks to the
  kernel over ZMQ IPC sockets in a private directory shared with the sandbox, and refuses
  to start (with the reason) where gVisor cannot run: never a host kernel under this name;
- ``launch``: the host process the provisioner starts, which runs ipykernel in a warm
  sandbox (``IsolatedSession``) with the layout of ``%%isolated``.
"""

from __future__ import annotations

KERNEL_NAME = "python3-gvisor"
DISPLAY_NAME = "Python 3 (gVisor)"
PROVISIONER_NAME = "gvisor-provisioner"
