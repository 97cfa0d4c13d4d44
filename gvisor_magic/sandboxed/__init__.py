"""Programs that run inside a sandbox, as its PID 1.

Standard library only: each file's source is handed to the sandbox's own Python
(``python -I -S -c SOURCE``) and never imported there; a program's source may come after
others' whose names it uses (``egress_relay``'s, and for the session agent
``agent_wire``'s, see ``backends/transports.py``). The host imports ``agent_wire``, the
session agent's wire, which both ends share (definitions only, no side effects).
"""
