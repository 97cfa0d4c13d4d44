"""The notebook face: magics, ``!`` routing, the status widget and the kernel's warm sandbox.

The only part of the package that imports IPython, ipywidgets or traitlets; the runner
core below it runs without them. ``%load_ext gvisor_magic`` loads ``magics``.
"""
