"""Programs that run inside a sandbox, as its PID 1.

Standard library only: each file's source is handed to the sandbox's own Python
(``python -I -S -c SOURCE``) and never imported there. The host imports
``session_agent`` only for the wire's constants (it has no side effects on import).
"""
