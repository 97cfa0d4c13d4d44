"""The session agent's wire: frame types, sizes and the frame header, for both ends.

The host imports this module (``gvisor_magic/agent_channel.py``); inside the sandbox
nothing is imported: its source is put just before the agent's in the one source the
sandbox's Python runs (``backends/transports.py``, ``AGENT_SOURCE``), so the agent uses
these names as its own. So: standard library only, and definitions only (no side
effects), no ``from __future__`` (it is not the start of that source), and names that
the relay (``egress_relay.py``) and the agent (``session_agent.py``) do not define.

Every frame is ``TYPE`` (1 byte) + ``LENGTH`` (4 bytes, big-endian) + payload; the
protocol itself is described in ``session_agent.py``.
"""

import struct

RUN, GO, KILL, COPY_OUT = b"R", b"G", b"K", b"C"  # host -> agent
HELLO, ACCEPTED, STDOUT, STDERR, EXIT, COPIED, SETTLED = (  # agent -> host
    b"H", b"A", b"O", b"E", b"X", b"L", b"D")
FROM_AGENT = HELLO + ACCEPTED + STDOUT + STDERR + EXIT + COPIED + SETTLED
#: Where a copy of the layer asked for while its command runs goes (``COPY_OUT``), in the
#: status dir: apart from the copy made at the command's end, which may follow it at once.
CELL_COPY = "cell"
#: The largest request the agent takes (it carries the command's stdin).
MAX_REQUEST = 16 * 1024 * 1024
#: The largest frame the agent sends: it reads a command's output this much at a time
#: (through pipes this large), and the host refuses anything bigger.
MAX_FRAME = 1 << 20
PIPE_SIZE = MAX_FRAME
#: A frame's header: its type, then its payload's length.
WIRE_HEADER = struct.Struct(">cI")


def pack_frame(kind, payload=b""):
    """One frame: ``kind`` (one byte) and ``payload``."""
    return WIRE_HEADER.pack(kind, len(payload)) + payload


def parse_header(header):
    """(type, payload length) of a frame's first ``WIRE_HEADER.size`` bytes."""
    return WIRE_HEADER.unpack(header)
