"""The ``gvisor-magic`` command, run as a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

CLI = [sys.executable, "-m", "gvisor_magic.cli"]


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    merged = {k: v for k, v in os.environ.items() if not k.startswith("GVISOR_MAGIC_")}
    merged.update(env or {})
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120,
                          env=merged)


def test_doctor_json_says_what_works(runsc_works):
    done = run_cli("doctor", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["backends"]["runsc"]["available"] is True
    assert data["isolated"] is True
    assert data["auto_backend"] in ("runsc", "docker")
    # What each backend can do with network=..., as the allowlist tests check it.
    assert "filtering proxy" in data["network"]["runsc"]
    assert "refused" in data["network"]["docker"] and "NOT enforced" in data["network"][
        "subprocess"]


def test_doctor_text_gives_the_fix_for_a_missing_runsc():
    done = run_cli("doctor", "--require-isolation",
                   env={"GVISOR_MAGIC_RUNSC": "/nonexistent/runsc", "PATH": "/usr/bin:/bin",
                        "GVISOR_MAGIC_DOCKER_RUNTIME": "no-such-runtime"})
    assert "runsc" in done.stdout and "NOT ISOLATED" in done.stdout
    assert done.returncode == 1


def test_run_streams_and_exits_with_the_command_code(runsc_works, tmp_path):
    done = run_cli("run", "--mode", "runsc", "--workdir", str(tmp_path), "--",
                   "sh", "-c", "uname -r; echo oops >&2; exit 7")
    assert done.returncode == 7
    assert done.stdout == "4.4.0\n"
    assert "oops" in done.stderr and "runsc (gVisor): exit 7" in done.stderr


def test_run_require_isolation_fails_closed(tmp_path):
    marker = tmp_path / "ran"
    done = run_cli("run", "--require-isolation", "--", "touch", str(marker),
                   env={"GVISOR_MAGIC_RUNSC": "/bin/false",
                        "GVISOR_MAGIC_DOCKER_RUNTIME": "no-such-runtime"})
    assert done.returncode == 125
    assert "isolation is required" in done.stderr
    assert not marker.exists()


def test_run_json_and_bad_input(runsc_works):
    done = run_cli("run", "--json", "--mode", "runsc", "--", "sh", "-c", "kill -9 $$")
    assert done.returncode == 128 + 9
    assert json.loads(done.stdout)["returncode"] == -9
    bad = run_cli("run", "--timeout", "-1", "--", "true")
    assert bad.returncode == 2 and "timeout must be > 0" in bad.stderr


def test_run_takes_a_network_allowlist_and_reports_what_it_refused(runsc_works, tmp_path):
    from support.egress_servers import plain_server

    with plain_server(b"allowed\n") as allowed, plain_server() as other:
        fetch = ("import sys, urllib.request as u\n"
                 "for url in sys.argv[1:]:\n"
                 "    try: print(u.urlopen(url, timeout=10).read().decode().strip())\n"
                 "    except OSError as e: print('refused')\n")
        done = run_cli("run", "--mode", "runsc", "--allow-host", allowed.authority,
                       "--json", "--", sys.executable, "-I", "-c", fetch,
                       allowed.url, other.url)
        assert other.hits == []
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["stdout"].split() == ["allowed", "refused"]
    assert result["network_policy"] == f"allowlist: {allowed.authority}"
    assert [(b["host"], b["port"]) for b in result["blocked"]] == [("127.0.0.1", other.port)]
    bad = run_cli("run", "--network", "http://pypi.org/", "--", "true")
    assert bad.returncode == 2 and "not a URL" in bad.stderr
    host = run_cli("run", "--mode", "subprocess", "--network", "pypi", "--", "true")
    assert host.returncode == 125 and "never isolates" in host.stderr


FETCH = ("import sys, urllib.request as u\n"
         "for url in sys.argv[1:]:\n"
         "    try: print(u.urlopen(url, timeout=10).read().decode().strip())\n"
         "    except OSError as e: print('refused')\n")


def test_run_network_alone_is_public_and_allow_host_adds_to_it(runsc_works):
    """``--network`` with no value is ``public`` (as docs/network.md says); ``--allow-host``
    with it reaches that host too (it was dropped, and the refusal then suggested it)."""
    from support.egress_servers import plain_server

    with plain_server(b"named\n") as named, plain_server(b"other\n") as other:
        alone = run_cli("run", "--mode", "runsc", "--network", "--json", "--",
                        sys.executable, "-I", "-c", FETCH, named.url)
        assert alone.returncode == 0, alone.stderr
        result = json.loads(alone.stdout)
        assert result["network_policy"] == "public internet through the host's filtering proxy"
        assert result["stdout"].split() == ["refused"]  # loopback is not public
        done = run_cli("run", "--mode", "runsc", "--network", "public", "--allow-host",
                       named.authority, "--json", "--", sys.executable, "-I", "-c", FETCH,
                       named.url, other.url)
        assert other.hits == []
        assert named.hits == ["GET /"]
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["stdout"].split() == ["named", "refused"]
    assert result["network_policy"] == ("public internet through the host's filtering proxy, "
                                        f"and: {named.authority}")
    [blocked] = result["blocked"]
    assert (blocked["host"], blocked["port"]) == ("127.0.0.1", other.port)
    assert blocked["hint"] == f"--allow-host {other.authority} allows it"


def test_run_allow_host_localhost_reaches_the_hosts_loopback(runsc_works):
    """The hint for ``localhost:PORT`` is ``--allow-host localhost:PORT``; it works."""
    from support.egress_servers import plain_server

    with plain_server(b"local\n") as srv:
        url = f"http://localhost:{srv.port}/"
        refused = run_cli("run", "--mode", "runsc", "--allow-host", srv.authority, "--json",
                          "--", sys.executable, "-I", "-c", FETCH, url)
        assert srv.hits == []
        done = run_cli("run", "--mode", "runsc", "--allow-host", f"localhost:{srv.port}",
                       "--json", "--", sys.executable, "-I", "-c", FETCH, url)
        assert srv.hits == ["GET /"]
    assert refused.returncode == 0, refused.stderr
    assert [b["hint"] for b in json.loads(refused.stdout)["blocked"]] == [
        f"--allow-host localhost:{srv.port} allows it"]
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["stdout"] == "local\n"


def test_kernelspec_network_alone_is_public(tmp_path):
    env = {"HOME": str(tmp_path), "JUPYTER_DATA_DIR": str(tmp_path / "data")}
    done = run_cli("kernelspec", "install", "--prefix", str(tmp_path / "prefix"),
                   "--network", "--allow-host", "127.0.0.1:8081", env=env)
    assert done.returncode == 0, done.stderr
    spec = json.loads((tmp_path / "prefix" / "share" / "jupyter" / "kernels"
                       / "python3-gvisor" / "kernel.json").read_text())
    assert spec["metadata"]["kernel_provisioner"]["config"] == {
        "network": "public", "allow_hosts": ["127.0.0.1:8081"]}
