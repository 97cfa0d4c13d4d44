"""Backends: peers behind one small protocol (see ``base.Backend``), chosen in ``runner``."""
