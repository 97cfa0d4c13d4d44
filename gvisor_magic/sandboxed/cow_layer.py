"""Inside the sandbox: the working dir as a copy-on-write layer, and its changes copied out.

Its source runs before ``sandbox_init.py``'s (it is never imported inside the sandbox), so
it uses only built-in modules. The host imports it only in tests (no side effects).

``layer_start`` runs in the sandbox's init while it is still root of the sandbox with
CAP_SYS_ADMIN: it mounts gVisor's own overlay over the working dir, whose lower layer is
the host's folder (bound read-only: nothing in the sandbox can write it) and whose upper
layer is a tmpfs in the sandbox's memory (gVisor takes no other upper). An overlay's
lower is the one mount at the working dir, not the mounts below it, so the protected
paths and the read-only repository mounted inside the working dir would show their host
contents through the overlay: each is bound aside first and bound back on top of it,
read-only again where it was.

``layer_copy_out`` runs after the command and every process it left have ended: it copies
the upper to ``OUT/upper`` (a directory the host reads), regular files, directories and
symlinks with their modes, and lists what the overlay marks with devices and extended
attributes (deletions, opaque directories) in ``OUT/markers.json``, which the host's
``gvisor_magic.changes.ListedMarkers`` reads. ``OUT/done`` is written last: without it
the host takes nothing from the layer (a sandbox killed during the copy leaves no half).

A copy holds what changed in the upper since the overlay's last copy, so an overlay may be
copied out more than once while its command runs (a gVisor kernel's cells, each at its
end): a file, link or marker already copied and unchanged since is left out, and one
copied before that is gone from the upper now (removed with no marker: the lower did not
have it when the overlay looked) is listed as deleted. A new overlay starts with nothing
copied.

The copy is written with the caller's effective uid, so the host's caller owns it; the
upper is read as root of the sandbox, which reads any mode and the overlay's trusted
extended attributes.

setting (JSON): {"dir": working dir, "base": a tmpfs for the layer (the sandbox's own),
                 "uid": the caller's uid}
"""

import os
import stat

MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC = 0x1, 0x20, 0x1000, 0x4000
MNT_DETACH = 2
_OPAQUE = "trusted.overlay.opaque"


def _json_loads(text):
    """``json.loads`` through the C scanner alone: ``import json`` costs the one-shot init
    about 30 ms inside gVisor (it imports ``re`` and ``enum``; measured 2026-12-07)."""
    import _json

    class Context:
        strict, object_hook, object_pairs_hook, parse_constant = True, None, None, float
        parse_float, parse_int, memo = float, int, {}

    value, end = _json.make_scanner(Context())(text, 0)
    if text[end:].strip():
        raise ValueError("extra data after the layer's setting")
    return value


def _json_names(names):
    """A JSON list of strings (``json.dumps`` of it, ASCII-escaped), without ``json``."""
    from _json import encode_basestring_ascii

    return "[" + ", ".join(encode_basestring_ascii(name) for name in names) + "]"


_LIBC = []


def _libc_call(name, *args):
    """libc's ``name`` with ``args`` (bytes, ints, None): (its int result, errno).

    Through ``_ctypes`` alone: ``import ctypes`` costs the one-shot init about 12 ms more
    inside gVisor (``struct``, ``enum``...; measured 2026-12-07)."""
    import _ctypes

    if not _LIBC:
        class Library:
            _handle = _ctypes.dlopen(None, 0)

        class Int(_ctypes._SimpleCData):
            _type_ = "i"

        class Function(_ctypes.CFuncPtr):
            _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
            _restype_ = Int

        _LIBC.append((Library(), Function))
    library, function = _LIBC[0]
    _ctypes.set_errno(0)
    result = function((name, library))(*args)
    return result, _ctypes.get_errno()


def _mount(source, target, fstype, flags, data=None):
    result, number = _libc_call("mount", source.encode(), target.encode(),
                                fstype.encode() if fstype else None, flags,
                                data.encode() if data else None)
    if result != 0:
        raise OSError(number, f"mount {fstype or 'bind'} on {target}: {os.strerror(number)}")


def _umount(target):
    _libc_call("umount2", target.encode(), MNT_DETACH)


def _unescape(field):
    """A /proc/self/mountinfo path: octal escapes (\\040 for a space) decoded."""
    out, i = bytearray(), 0
    raw = field.encode()
    while i < len(raw):
        if raw[i] == 0x5C and raw[i + 1:i + 4].isdigit() and len(raw[i + 1:i + 4]) == 3:
            out.append(int(raw[i + 1:i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return out.decode(errors="surrogateescape")


def submounts(root, mountinfo="/proc/self/mountinfo"):
    """[(mount point, read_only)] of every mount strictly below ``root``, parents first."""
    prefix = root.rstrip("/") + "/"
    found = []
    with open(mountinfo) as handle:
        for line in handle:
            fields = line.split()
            if len(fields) < 6:
                continue
            point = _unescape(fields[4])
            if point.startswith(prefix):
                found.append((point, "ro" in fields[5].split(",")))
    found.sort(key=lambda item: item[0].count("/"))
    return found


def layer_prepare(setting):
    """The layer's state, with the mounts below the working dir bound aside (kept there for
    every overlay mounted later). Root of the sandbox, CAP_SYS_ADMIN."""
    config = _json_loads(setting)
    root, base = config["dir"].rstrip("/") or "/", config["base"]
    aside = os.path.join(base, "aside")
    os.mkdir(aside, 0o700)
    below = submounts(root)
    tops = [(p, ro) for p, ro in below
            if not any(p.startswith(q.rstrip("/") + "/") for q, _ in below if q != p)]
    moved = []
    for index, (point, _) in enumerate(tops):
        place = os.path.join(aside, str(index))
        if os.path.isdir(point):
            os.mkdir(place)
        else:
            os.close(os.open(place, os.O_CREAT | os.O_WRONLY, 0o600))
        _mount(point, place, None, MS_BIND | MS_REC)
        moved.append((point, place))
    return {"root": root, "base": base, "uid": int(config["uid"]), "size": config.get("size"),
            "moved": moved, "below": below, "mounted": None, "count": 0, "made": [],
            "kept": [], "switch": True}


def layer_mount(layer, keep=()):
    """Mount a fresh overlay over the working dir, then the mounts that were below it on
    top of it again. The last overlay goes; its upper and earlier ones stay below the new
    one as lower layers when ``keep`` names them (``[[id, [paths to drop]], ...]``, newest
    first: a session's held changes, less those applied or discarded since), and go
    otherwise."""
    root = layer["root"]
    wanted = {int(number): drop for number, drop in keep}
    if layer["mounted"] is not None and not os.listdir(layer["upper"]) and not any(
            wanted.values()) and list(wanted) == [number for number, _ in layer["kept"]]:
        return layer  # the last command wrote nothing: its overlay is as good as new
    if layer["mounted"] is not None:
        _umount(root)  # the overlay, and the mounts made on top of it
        layer["kept"].insert(0, (layer["count"], layer["mounted"]))
        layer["mounted"] = None
    kept = []
    for number, place in layer["kept"]:
        if number in wanted:
            for rel in sorted(wanted[number], key=lambda p: -p.count("/")):
                _drop(os.path.join(place, "upper"), rel)
            kept.append((number, place))
        else:
            _umount(place)
    layer["kept"] = kept
    layer["count"] += 1
    place = os.path.join(layer["base"], str(layer["count"]))
    os.mkdir(place, 0o700)
    _mount("tmpfs", place, "tmpfs", 0,
           "mode=0700" + (",size=" + str(layer["size"]) if layer["size"] else ""))
    upper, work = os.path.join(place, "upper"), os.path.join(place, "work")
    os.mkdir(upper, 0o700)
    os.mkdir(work, 0o700)
    # The merged root takes the upper root's owner and mode: make them the working dir's.
    st = os.stat(root)
    os.chown(upper, st.st_uid, st.st_gid)
    os.chmod(upper, stat.S_IMODE(st.st_mode))
    lower = ":".join([os.path.join(place, "upper") for _, place in kept] + [root])
    _mount("overlay", root, "overlay", 0, f"lowerdir={lower},upperdir={upper},workdir={work}")
    layer["mounted"], layer["upper"] = place, upper
    layer["copied"] = {}  # what layer_copy_out copied of this overlay, and as what
    made = []
    for point, aside in layer["moved"]:
        if not os.path.lexists(point):  # a mount point the lower lacks: made in the upper
            if os.path.isdir(aside):
                os.makedirs(point)
            else:
                os.close(os.open(point, os.O_CREAT | os.O_WRONLY, 0o600))
            made.append(os.path.relpath(point, root))
        _mount(aside, point, None, MS_BIND | MS_REC)
    for point, read_only in layer["below"]:
        if read_only:
            _mount("none", point, None, MS_BIND | MS_REMOUNT | MS_RDONLY)
    layer["made"] = made
    return layer


def layer_start(setting):
    """A one-shot sandbox's layer: prepared and mounted once."""
    return layer_mount(layer_prepare(setting))


def layer_become_caller(layer):
    """From here on the init is the caller (real and effective uid) and keeps root only as
    its saved uid, to read the layer after the command: a command (the caller's uid, no
    capabilities) can neither trace it (its saved uid differs, and it is not dumpable) nor
    gain anything at exec (the bounding set is empty, and ``no_new_privs`` is set)."""
    for cap in range(64):
        _libc_call("prctl", 24, cap, 0, 0, 0)  # PR_CAPBSET_DROP: EINVAL past the last one
    result, number = _libc_call("prctl", 4, 0, 0, 0, 0)  # PR_SET_DUMPABLE
    if result != 0:
        raise OSError(number, "cannot make the init non-dumpable")
    os.setresuid(layer["uid"], layer["uid"], 0)


def layer_end_processes(layer):
    """Kill every process but this one (the caller's and any other) and reap them all."""
    _as_root(layer)
    try:
        os.kill(-1, 9)
    except OSError:  # nothing else left
        pass
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
        except InterruptedError:
            continue


def _as_caller(layer):
    if layer["switch"]:
        os.setresuid(-1, layer["uid"], -1)


def _as_root(layer):
    if layer["switch"]:
        os.setresuid(-1, 0, -1)


#: Files opened (as root) before they are copied (as the caller): one switch of the
#: effective uid each way per batch, not per file.
_BATCH = 256


def layer_copy_out(layer, out, quiet=False):
    """Copy what changed in the upper layer since its last copy into ``out``/upper and list
    its markers (see the top); no change writes only ``done`` (saying "empty"), or nothing at
    all when ``quiet`` (the caller says so itself). This layer's id (None: quiet and
    empty)."""
    upper, made = layer["upper"], set(layer["made"])
    copied = layer.setdefault("copied", {})
    seen = {}  # name -> what it is now, for the next copy
    target = os.path.join(out, "upper")
    deleted, opaque, skipped, dirs, links, files = [], [], [], [], [], []
    new_dirs = False
    stack = [""]
    while stack:  # as root: any mode, and the overlay's trusted.* attributes
        rel = stack.pop()
        source = os.path.join(upper, rel) if rel else upper
        with os.scandir(source) as entries:
            listing = sorted(entries, key=lambda e: e.name)
        for entry in listing:
            name = entry.name if not rel else rel + "/" + entry.name
            if name in made:
                continue
            st = entry.stat(follow_symlinks=False)
            mode = st.st_mode
            if stat.S_ISCHR(mode) and st.st_rdev == 0:
                seen[name] = ("deleted",)
                if copied.get(name) != seen[name]:
                    deleted.append(name)
            elif stat.S_ISDIR(mode):
                was = copied.get(name, ())
                try:
                    if os.getxattr(entry.path, _OPAQUE, follow_symlinks=False) == b"y":
                        seen[name] = ("dir", stat.S_IMODE(mode), True)
                        if was[2:] != (True,):  # once: a later copy leaves files out
                            opaque.append(name)
                except OSError:
                    pass
                seen.setdefault(name, ("dir", stat.S_IMODE(mode), was[2:] == (True,)))
                new_dirs = new_dirs or was[:2] != seen[name][:2]
                dirs.append((name, stat.S_IMODE(mode) & 0o1777))
                stack.append(name)
            elif stat.S_ISLNK(mode):
                seen[name] = ("link", os.readlink(entry.path))
                if copied.get(name) != seen[name]:
                    links.append((name, seen[name][1]))
            elif stat.S_ISREG(mode):
                seen[name] = ("file", st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                              mode)
                if copied.get(name) != seen[name]:
                    files.append((name, entry.path, st))
            else:
                seen[name] = ("other", st.st_ino, st.st_mode)
                if copied.get(name) != seen[name]:
                    skipped.append(name)
    # Copied before and gone now, with no marker: removed from the upper alone.
    deleted += sorted(name for name, was in copied.items()
                      if name not in seen and was[0] not in ("deleted", "other"))
    empty = not (deleted or opaque or skipped or new_dirs or links or files)
    if empty and quiet:
        layer["copied"] = seen
        return None
    old_umask = os.umask(0)  # files are created with their final mode (no chmod each)
    try:
        _as_caller(layer)
        try:
            if not os.path.isdir(out):
                os.mkdir(out, 0o700)
            _clear(out, target)
            if empty:
                _write_done(out, "empty")
                layer["copied"] = seen
                return layer["count"]
            os.mkdir(target, 0o700)
            for name, _mode in sorted(dirs, key=lambda d: d[0].count("/")):
                os.mkdir(os.path.join(target, name), 0o700)
            for name, link in links:
                os.symlink(link, os.path.join(target, name))
        finally:
            _as_root(layer)
        for start in range(0, len(files), _BATCH):
            _copy_batch(layer, target, files[start:start + _BATCH])
        _as_caller(layer)
        try:
            for name, mode in sorted(dirs, key=lambda d: -d[0].count("/")):
                os.chmod(os.path.join(target, name), mode)  # children first: 0555 is filled
            with open(os.path.join(out, "markers.json"), "w") as handle:
                handle.write(f'{{"deleted": {_json_names(deleted)}, "opaque": '
                             f'{_json_names(opaque)}, "skipped": {_json_names(skipped)}}}')
            _write_done(out, str(len(files)))
        finally:
            _as_root(layer)
    finally:
        os.umask(old_umask)
    layer["copied"] = seen
    return layer["count"]  # this layer's id, for a later ``layer_mount(keep=...)``


def _clear(out, target):
    """What an earlier command's copy left, if the host did not take it."""
    for name in ("done", "markers.json"):
        if os.path.lexists(os.path.join(out, name)):
            os.unlink(os.path.join(out, name))
    if os.path.lexists(target):
        _remove(target)


def _write_done(out, text):
    fd = os.open(os.path.join(out, "done"), os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _copy_batch(layer, target, batch):
    """Open the batch's files as root, then make and fill their copies as the caller, each
    with its mode (never set-ID: see the host) and times (``make`` compares times)."""
    sources = []
    try:
        for name, path, st in batch:
            sources.append((name, os.open(path, os.O_RDONLY | os.O_NOFOLLOW), st))
        _as_caller(layer)
        try:
            for name, fd, st in sources:
                out = os.open(os.path.join(target, name),
                              os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                              stat.S_IMODE(st.st_mode) & 0o1777)
                try:
                    while True:
                        chunk = os.read(fd, 1 << 20)
                        if not chunk:
                            break
                        view = memoryview(chunk)
                        while view:
                            view = view[os.write(out, view):]
                    os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
                finally:
                    os.close(out)
        finally:
            _as_root(layer)
    finally:
        for _name, fd, _st in sources:
            os.close(fd)


def _drop(upper, rel):
    """Take ``rel`` out of a kept layer: the lower shows through again. A directory goes
    only once empty (it may still hold changes that are held)."""
    path = os.path.join(upper, rel)
    if ".." in rel.split("/") or not os.path.lexists(path):
        return
    if os.path.isdir(path) and not os.path.islink(path):
        try:
            os.rmdir(path)
        except OSError:
            pass
    else:
        os.unlink(path)


def _remove(path):
    for directory, dirs, files in os.walk(path, topdown=False):
        for name in files:
            os.unlink(os.path.join(directory, name))
        for name in dirs:
            full = os.path.join(directory, name)
            if os.path.islink(full):
                os.unlink(full)
            else:
                os.chmod(full, 0o700)
                os.rmdir(full)
    os.chmod(path, 0o700)
    os.rmdir(path)
