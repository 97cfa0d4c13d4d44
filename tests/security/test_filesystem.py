"""Filesystem: escaping the working dir, planting links and devices, filling disks."""

from __future__ import annotations

import os
import stat
import sys
import tempfile

import pytest

MiB = 2**20

ESCAPE = r'''
import json, os, sys
tag, outside, scratch, disk = sys.argv[1:5]
targets = sys.argv[5:]
found = {}

def attempt(name, action):
    try:
        value = action()
        found[name] = "ok %s" % (value if value is not None else "")
    except (OSError, ValueError) as exc:
        found[name] = "ERR %s" % type(exc).__name__

def write(path):
    with open(path, "w") as handle:
        handle.write("escaped\n")

def read(path):
    with open(path, "rb") as handle:
        return handle.read(200).decode("latin-1")

for directory in targets:
    attempt("write " + directory, lambda d=directory: write(os.path.join(d, tag)))
attempt("read link-secret", lambda: read("link-secret"))
attempt("read link-shadow", lambda: read("link-shadow"))
attempt("read link-root", lambda: read("link-root" + outside + "/secret.txt"))
attempt("write link-outdir", lambda: write("link-outdir/" + tag))
attempt("read dotdot", lambda: read("../" * 30 + outside.lstrip("/") + "/secret.txt"))
attempt("read parent", lambda: read("../outside/secret.txt"))
attempt("write dotdot", lambda: write("../" + tag + "-dotdot"))
attempt("hardlink outside", lambda: os.link(outside + "/secret.txt", "hl-secret"))
attempt("hardlink shadow", lambda: os.link("/etc/shadow", "hl-shadow"))
attempt("mknod char", lambda: os.mknod("dev-null", 0o600 | 0o020000, os.makedev(1, 3)))
major, minor = (int(x) for x in disk.split(":"))
attempt("mknod disk", lambda: os.mknod("dev-disk", 0o600 | 0o060000, os.makedev(major, minor)))
attempt("read disk", lambda: len(read("dev-disk")))
attempt("read host disk", lambda: len(read("/dev/vda")))
print(json.dumps(found))
'''


@pytest.fixture
def planted(probe, outside):
    """Links a hostile repository could contain, made on the host before the run."""
    work = probe.workdir
    os.symlink(outside / "secret.txt", work / "link-secret")
    os.symlink("/etc/shadow", work / "link-shadow")
    os.symlink("/", work / "link-root")
    os.symlink(outside, work / "link-outdir")
    return outside


def test_escaping_the_working_dir(probe, planted, host_scratch):
    outside = planted
    parent = probe.workdir.parent
    targets = [str(parent), str(host_scratch)]
    if probe.isolated:
        targets += ["/etc", "/usr", "/"]
    else:
        for name in ("write /etc", "write /usr", "write /"):
            probe.na(name, "not attempted on the host: it would write into a system directory")
    root_dev = os.stat("/").st_dev
    disk = f"{os.major(root_dev)}:{os.minor(root_dev)}"
    try:
        _result, found = probe.run_python(ESCAPE, probe.tag, str(outside), str(host_scratch),
                                          disk, *targets)
        names = {str(parent): "write to the working dir's parent",
                 str(host_scratch): "write to a host dir (/var/tmp)"}
        for directory in targets:
            landed = os.path.exists(os.path.join(directory, probe.tag))
            probe.verdict(names.get(directory, f"write {directory}"), landed,
                          found[f"write {directory}"])
        canary = "CANARY-OUTSIDE-SECRET"
        probe.verdict("symlink in the working dir -> host secret",
                      canary in found["read link-secret"], found["read link-secret"])
        probe.verdict("symlink in the working dir -> /etc/shadow",
                      "root:" in found["read link-shadow"], found["read link-shadow"])
        probe.verdict("symlink in the working dir -> /",
                      canary in found["read link-root"], found["read link-root"])
        probe.verdict("write through a planted directory symlink",
                      (outside / probe.tag).exists(), found["write link-outdir"])
        probe.verdict("'..' traversal (read)", canary in found["read dotdot"] + found[
            "read parent"], found["read dotdot"] + " / " + found["read parent"])
        probe.verdict("'..' traversal (write)", (parent / f"{probe.tag}-dotdot").exists(),
                      found["write dotdot"])
        secret_link = probe.workdir / "hl-secret"
        shadow_link = probe.workdir / "hl-shadow"
        probe.verdict("hard link to a host file", (secret_link.exists() and os.path.samefile(
            secret_link, outside / "secret.txt")) or (shadow_link.exists() and os.path.samefile(
                shadow_link, "/etc/shadow")),
            found["hardlink outside"] + " / " + found["hardlink shadow"])
        devices = [p for p in probe.workdir.iterdir() if not p.is_symlink()
                   and (stat.S_ISCHR(p.lstat().st_mode) or stat.S_ISBLK(p.lstat().st_mode))]
        probe.verdict("device nodes (mknod, the host disk)",
                      bool(devices) or found["read disk"].startswith("ok")
                      or found["read host disk"].startswith("ok"),
                      f"{found['mknod char']} / {found['mknod disk']} / {found['read disk']} / "
                      f"{found['read host disk']}")
    finally:
        for directory in targets:
            path = os.path.join(directory, probe.tag)
            if os.path.isfile(path):
                os.unlink(path)
        for path in (parent / f"{probe.tag}-dotdot", outside / probe.tag,
                     probe.workdir / "dev-null", probe.workdir / "dev-disk"):
            if path.is_file() or path.is_char_device() or path.is_block_device():
                path.unlink()


PRIVILEGE = r'''
import json, os, shutil, subprocess, sys
found = {}
with open("/proc/self/status") as handle:
    found["caps"] = dict(l.split()[:2] for l in handle if l.startswith(("CapEff", "NoNewPrivs")))
os.makedirs("mnt", exist_ok=True)
mount = subprocess.run(["mount", "-t", "tmpfs", "none", "mnt"], capture_output=True, text=True)
bind = subprocess.run(["mount", "--bind", "/", "mnt"], capture_output=True, text=True)
errors = (mount.stderr + bind.stderr)[:120]
found["mount"] = "%s %s %s" % (mount.returncode, bind.returncode, errors)
shutil.copy("/bin/sh", "suid-sh")
try:
    os.chmod("suid-sh", 0o6755)
    found["chmod"] = "allowed"
except PermissionError as exc:
    found["chmod"] = "refused: %s" % exc.strerror
found["setuid"] = oct(os.stat("suid-sh").st_mode)
print(json.dumps(found))
'''


def test_privileges_mount_and_setuid(probe):
    probe.harmless_only(["mount", "capabilities", "setuid binary planted in the working dir"],
                        "mount as root would change the host's mount table")
    _result, found = probe.run_python(PRIVILEGE)
    mounted = os.path.ismount(probe.workdir / "mnt")
    probe.verdict("mount", mounted or found["mount"].startswith("0 "), found["mount"])
    caps = found["caps"]
    # gVisor's /proc has no NoNewPrivs line; the spec sets it (noNewPrivileges).
    probe.verdict("capabilities", int(caps["CapEff:"], 16) != 0
                  or caps.get("NoNewPrivs:", "1") != "1", str(caps))
    planted = probe.workdir / "suid-sh"
    mode = planted.stat().st_mode
    probe.verdict("setuid binary planted in the working dir",
                  bool(mode & (stat.S_ISUID | stat.S_ISGID)),
                  f"chmod 6755 {found['chmod']}; inside: {found['setuid']}, "
                  f"on the host afterwards: {oct(mode)}")
    if probe.backend == "runsc":  # its seccomp filter refuses set-ID modes outright
        assert found["chmod"] == "refused: Operation not permitted", found
        assert not int(found["setuid"], 8) & (stat.S_ISUID | stat.S_ISGID)
    else:  # Docker: the runner strips what the command set, and says so
        assert "stripped_setid" in probe.results[-1].details


FILL = r'''
import errno, json, os, sys
tmp_size, file_size, tag = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
chunk = b"x" * (1 << 20)
found = {}
def fill(path, limit):
    written = 0
    try:
        with open(path, "wb") as handle:
            while written < limit:
                written += handle.write(chunk)
                handle.flush()
        return None, written
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno)), written
total, index, error = 0, 0, None
tmp = os.environ.get("TMPDIR", "/tmp")
while error in (None, "EFBIG") and total < 4 * tmp_size:
    error, written = fill(os.path.join(tmp, "%s-%d" % (tag, index)), file_size // 2)
    total, index = total + written, index + 1
found["tmp"] = "%s after %d" % (error or "no limit hit", total)
error, written = fill("big", 4 * file_size)
found["work"] = "%s after %d" % (error or "no limit hit", written)
print(json.dumps(found))
'''


@pytest.mark.limits(tmp_size=32 * MiB, max_file_size=16 * MiB)
def test_filling_tmp_and_the_working_dir_is_bounded(probe):
    host_tmp = tempfile.gettempdir()
    try:
        _result, found = probe.run_python(FILL, str(32 * MiB), str(16 * MiB), probe.tag)
    finally:
        written = [name for name in os.listdir(host_tmp) if name.startswith(probe.tag)]
        landed = bool(written)
        for name in written:
            os.unlink(os.path.join(host_tmp, name))
    size = (probe.workdir / "big").stat().st_size
    probe.verdict("filling /tmp reaches the host disk", landed, found["tmp"])
    probe.verdict("a file in the working dir beyond max_file_size", size > 16 * MiB,
                  f"{found['work']}; host file {size} bytes")
    if probe.isolated:
        assert found["tmp"].startswith("ENOSPC"), found
        assert int(found["tmp"].split()[-1]) <= 32 * MiB
    assert size <= 16 * MiB


MANY_FILES = r'''
import os, sys
made, tag = 0, sys.argv[1]
try:
    for made in range(1, 1000001):
        open("/tmp/%s-%d" % (tag, made), "w").close()
        if made % 5000 == 0:
            print(made, flush=True)
    print("all", made, flush=True)
except OSError as exc:
    print("stopped", made, type(exc).__name__, flush=True)
'''


def test_a_million_tiny_files(probe):
    probe.harmless_only(["a million tiny files in /tmp"],
                        "would create them in the host's /tmp")
    result = probe.run_in_gvisor(f"exec {sys.executable} -c '{MANY_FILES}' {probe.tag}",
                                 timeout=3)
    lines = result.stdout.split()
    made = lines[-1] if lines else "0"
    on_host = [name for directory in {"/tmp", "/var/tmp", tempfile.gettempdir()}
               for name in os.listdir(directory) if name.startswith(probe.tag)]
    probe.verdict("a million tiny files in /tmp", bool(on_host) or not (
        result.timed_out or "stopped" in result.stdout),
        f"{'timed out' if result.timed_out else 'ended'} after {made} files, none on the "
        "host (they live in the sandbox's memory; bounded by the timeout)")
    assert result.timed_out or "stopped" in result.stdout or "all" in result.stdout
    if probe.flavour == "session":
        after = probe.run("ls /tmp | wc -l")
        assert after.success  # the session survived; its /tmp is dropped with it


TLS_CLIENT = r'''
import json, os, shutil, ssl, subprocess, sys
found = {}

def read(path):
    try:
        with open(path, "rb") as handle:
            return handle.read(65536).decode("latin-1")
    except OSError as exc:
        return "ERR %s" % type(exc).__name__

for path in sys.argv[1:]:
    found[path] = read(path)
try:
    found["private"] = " ".join(sorted(os.listdir("/etc/ssl/private")))
except OSError as exc:
    found["private"] = "ERR %s" % type(exc).__name__
found["bundle"] = read("/etc/ssl/certs/ca-certificates.crt")[:64]
hashed = sorted(n for n in os.listdir("/etc/ssl/certs") if n.endswith(".0"))
found["hashed"] = read(os.path.join("/etc/ssl/certs", hashed[0]))[:64] if hashed else "none"
context = ssl.create_default_context()  # what urllib uses without certifi
found["context"] = context.cert_store_stats()
paths = ssl.get_default_verify_paths()
found["capath"] = len(os.listdir(paths.capath)) if paths.capath else 0
if shutil.which("openssl"):
    roots = sorted(n for n in os.listdir("/usr/share/ca-certificates/mozilla"))
    check = subprocess.run(["openssl", "verify", "/usr/share/ca-certificates/mozilla/" + roots[0]],
                           capture_output=True, text=True, timeout=60)
    found["openssl"] = "%d %s" % (check.returncode, (check.stdout + check.stderr).strip())
print(json.dumps(found))
'''


@pytest.fixture
def host_private_keys(probe) -> dict[str, str]:
    """Private keys where a Debian host keeps TLS keys (made here, removed afterwards):
    /etc/ssl/private, a key+certificate PEM in /etc/ssl/certs, a key at the top of /etc/ssl."""
    if not os.access("/etc/ssl", os.W_OK) or not os.path.isdir("/etc/ssl/certs"):
        pytest.skip("needs root and a Debian-style /etc/ssl to plant host keys")
    keys = {}
    paths = [f"/etc/ssl/certs/{probe.tag}-server.pem", f"/etc/ssl/{probe.tag}.pem"]
    if os.path.isdir("/etc/ssl/private"):
        paths.insert(0, f"/etc/ssl/private/{probe.tag}.key")
    try:
        for path in paths:
            canary = f"CANARY-KEY-{os.urandom(8).hex()}"
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "w") as handle:
                handle.write(f"-----BEGIN PRIVATE KEY-----\n{canary}\n"
                             "-----END PRIVATE KEY-----\n")
            keys[path] = canary
        yield keys
    finally:
        for path in paths:
            if os.path.isfile(path) and probe.tag in path:
                os.unlink(path)


def test_tls_private_keys_stay_on_the_host(probe, host_private_keys):
    """Keys in the host's /etc/ssl (private/, a key PEM among the certificates, one at the
    top) are not readable inside; the CA bundle, its hashed links into
    /usr/share/ca-certificates, ssl.create_default_context() and openssl verify work."""
    _result, found = probe.run_python(TLS_CLIENT, *host_private_keys)
    for path, canary in host_private_keys.items():
        probe.verdict(f"a TLS private key in {os.path.dirname(path)}", canary in found[path],
                      found[path][:80])
    probe.verdict("listing /etc/ssl/private", probe.tag in found["private"], found["private"])
    if os.path.isfile("/etc/ssl/certs/ca-certificates.crt"):
        assert found["bundle"].startswith("-----BEGIN CERTIFICATE-----"), found
    if found["hashed"] != "none":
        assert found["hashed"].startswith("-----BEGIN CERTIFICATE-----"), found
    assert found["context"]["x509_ca"] > 0, found
    assert found["capath"] > 0, found
    if "openssl" in found:
        assert found["openssl"].startswith("0 ") and found["openssl"].endswith("OK"), found
