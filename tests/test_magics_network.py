"""A cell's network: ``--network`` and ``--allow-host`` in gVisor, what was refused and how
to allow it, and ``Isolation.network`` (``--network`` alone, as parsed:
tests/test_magics_usage.py)."""

from __future__ import annotations

import html

import pytest
from IPython.core.error import UsageError
from support.ipython_shell import magics, run

import gvisor_magic

FETCH = ("python3 -c \"import sys, urllib.request as u\n"
         "for url in sys.argv[1:]:\n"
         "    try: print(u.urlopen(url, timeout=10).read().decode().strip())\n"
         "    except OSError as e: print('refused', e)\" ")


def test_a_cell_names_its_network_and_is_told_what_was_refused(ip, capfd, runsc_works):
    from support.egress_servers import plain_server

    with plain_server(b"allowed\n") as allowed, plain_server(b"other\n") as other:
        run(ip, f"%%isolated --network 127.0.0.1:{allowed.port} --result r\n"
                f"{FETCH}{allowed.url}/a {other.url}/b\n")
        out, err = capfd.readouterr()
        assert other.hits == []
        assert out.splitlines()[0] == "allowed" and "refused" in out.splitlines()[1]
        # Loud, on stderr: where it ran, the policy, and the refused destination with its fix.
        assert f"network: allowlist: 127.0.0.1:{allowed.port}" in err
        assert ("WARNING: network: the command tried to reach what this sandbox may not"
                in err), err
        assert f"127.0.0.1:{other.port}: port {other.port} is not allowed" in err
        assert f"--allow-host 127.0.0.1:{other.port} allows it" in err
        # --allow-host adds to it; the widget shows the cell's own network and what it refused.
        run(ip, f"%%isolated --quiet --allow-host 127.0.0.1:{allowed.port} "
                f"--allow-host {other.authority}\n{FETCH}{allowed.url}/c {other.url}/d\n")
        assert capfd.readouterr().out == "allowed\nother\n"
    widget = gvisor_magic.status_widget()
    assert repr(widget).startswith("gvisor-magic: isolated by gVisor (runsc) | network off")
    assert (f"network allowlist: 127.0.0.1:{allowed.port}, {other.authority} for this cell"
            in html.unescape(widget.value))


def test_the_network_setting_is_checked_and_shown(ip, caplog, runsc_works):
    run(ip, "%config Isolation.network = 'https://pypi.org/simple'")
    assert "Isolation.network: 'https://pypi.org/simple': name a host" in caplog.text
    assert magics(ip).settings.network is False
    run(ip, "%config Isolation.network = 'pypi'")
    widget = gvisor_magic.status_widget()
    assert repr(widget) == "gvisor-magic: isolated by gVisor (runsc) | network allowlist: pypi"
    with pytest.raises(UsageError, match="not a URL"):
        run(ip, "%%isolated --network http://x/\ntrue\n")
    with pytest.raises(UsageError, match="non-canonical"):
        run(ip, "%isolated --allow-host 2130706433 true")


def test_network_alone_in_a_sandbox_with_allow_host(ip, capfd, runsc_works):
    from support.egress_servers import plain_server

    with plain_server(b"named\n") as named, plain_server(b"other\n") as other:
        run(ip, f"%%isolated --network --result r\n{FETCH}{named.url}/a\n")
        out, _ = capfd.readouterr()
        assert out.startswith("refused")  # loopback is not public
        assert ip.user_ns["r"].network_policy == (
            "public internet through the host's filtering proxy")
        with open("fetch.py", "w") as script:  # the cwd: the sandbox's working dir
            script.write(FETCH.split('"')[1])
        run(ip, f"%isolated --network --allow-host {named.authority} --result r -- "
                f"python3 fetch.py {named.url}/b {other.url}/c")
        out, err = capfd.readouterr()
        assert named.hits == ["GET /b"] and other.hits == []
    assert out.splitlines()[0] == "named" and out.splitlines()[1].startswith("refused")
    assert ip.user_ns["r"].network_policy == (
        f"public internet through the host's filtering proxy, and: {named.authority}")
    assert f"--allow-host {other.authority} allows it" in err
