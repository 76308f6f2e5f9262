"""The first process of a code sandbox: confine itself, then exec the program (or bubblewrap).

Run by path as `python -I -B sandbox_launch.py CONFIG_JSON` (standard library only, nothing of
stepwise is imported), from stepwise.tasks.sandbox, which documents what each step contains. In
order: resource limits (CPU, address space, file size, processes, no core dumps); a private network
namespace (best effort: CLONE_NEWNET as root, CLONE_NEWUSER|CLONE_NEWNET otherwise); no_new_privs;
Landlock rules when asked (writes only beneath the work dir and to /dev/null, no TCP bind/connect,
no signals or abstract unix sockets outside the sandbox, each as far as the kernel's ABI goes); as
root, the switch to the sandbox uid/gid with no supplementary groups; then exec. A setup failure is
written to the status fd (closed unread on a successful exec) and exits 127.
"""
from __future__ import annotations

import ctypes
import json
import os
import resource
import sys

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
PR_SET_NO_NEW_PRIVS = 38
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_RULE_PATH_BENEATH = 1
# Landlock filesystem rights that change files, with the ABI that introduced each.
FS_WRITE_RIGHTS = {1 << 1: 1, 1 << 4: 1, 1 << 5: 1, 1 << 6: 1, 1 << 7: 1, 1 << 8: 1, 1 << 9: 1, 1 << 10: 1,
                   1 << 11: 1, 1 << 12: 1, 1 << 13: 2, 1 << 14: 3}
WRITE_FILE, TRUNCATE = 1 << 1, 1 << 14
NET_BIND_AND_CONNECT_TCP = (1 << 0) | (1 << 1)  # ABI 4
SCOPE_ABSTRACT_UNIX_AND_SIGNAL = (1 << 0) | (1 << 1)  # ABI 6

_libc = ctypes.CDLL(None, use_errno=True)


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _check(result: int, what: str) -> int:
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")
    return result


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 when Landlock is missing or disabled."""
    version = _libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return max(int(version), 0)


def set_limits(limits: dict) -> None:
    for name, value in (("RLIMIT_CORE", 0), ("RLIMIT_CPU", limits["cpu_s"]), ("RLIMIT_AS", limits["memory_bytes"]),
                        ("RLIMIT_FSIZE", limits["file_size_bytes"]), ("RLIMIT_NPROC", limits["processes"])):
        resource.setrlimit(getattr(resource, name), (value, value))


def isolate_network(as_root: bool) -> None:
    """A fresh network namespace (only a down loopback); left as it is when the kernel refuses."""
    _libc.unshare(CLONE_NEWNET if as_root else CLONE_NEWUSER | CLONE_NEWNET)


def restrict_with_landlock(abi: int, workdir: str) -> None:
    """Landlock domain: file changes only beneath `workdir` (and writes to /dev/null); no TCP."""
    handled_fs = sum(right for right, since in FS_WRITE_RIGHTS.items() if since <= abi)
    attr = _RulesetAttr(handled_fs, NET_BIND_AND_CONNECT_TCP if abi >= 4 else 0,
                        SCOPE_ABSTRACT_UNIX_AND_SIGNAL if abi >= 6 else 0)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = _check(_libc.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size),
                                   ctypes.c_uint32(0)), "landlock_create_ruleset")
    for path, allowed in ((workdir, handled_fs), ("/dev/null", handled_fs & (WRITE_FILE | TRUNCATE))):
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        rule = _PathBeneathAttr(allowed, fd)
        _check(_libc.syscall(SYS_LANDLOCK_ADD_RULE, ruleset, LANDLOCK_RULE_PATH_BENEATH, ctypes.byref(rule),
                             ctypes.c_uint32(0)), f"landlock_add_rule {path}")
        os.close(fd)
    _check(_libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, ctypes.c_uint32(0)), "landlock_restrict_self")
    os.close(ruleset)


def drop_privileges(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid) or os.getgroups():
        raise PermissionError(f"could not switch to uid {uid}")


def main(config: dict) -> None:
    set_limits(config["limits"])
    if config["isolate_network"]:
        isolate_network(as_root=config["uid"] is not None)
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    if config["landlock_abi"]:
        restrict_with_landlock(config["landlock_abi"], config["workdir"])
    if config["uid"] is not None:
        drop_privileges(config["uid"], config["gid"])
    os.set_inheritable(config["status_fd"], False)
    os.execv(config["argv"][0], config["argv"])


if __name__ == "__main__":
    _config = json.loads(sys.argv[1])
    try:
        main(_config)
    except BaseException as error:  # reported to the parent, which raises it as a setup error
        os.write(_config["status_fd"], f"{type(error).__name__}: {error}".encode())
        os._exit(127)
