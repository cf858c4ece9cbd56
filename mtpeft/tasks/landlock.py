"""Landlock (Linux ≥ 5.13, unprivileged): a process confines itself and every descendant to the
files it lists, whatever the file modes say. The sandbox uses it so a generated program reads only
its own folder and the interpreter's files, and writes only its work directory.

Raw system calls through ctypes (no binding package: the sandbox supervisor runs ``python -I -S``
on the standard library alone). The ruleset is built in one process and enforced in another:
``Ruleset`` opens the paths and holds the rules, ``enforce`` (after fork, before exec) applies them.
"""

from __future__ import annotations

import ctypes
import os

SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446  # same numbers on x86-64 and arm64
CREATE_RULESET_VERSION = 1
RULE_PATH_BENEATH = 1
PR_SET_NO_NEW_PRIVS = 38

EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FILE_ONLY = {1: EXECUTE | WRITE_FILE | READ_FILE, 3: 1 << 14, 5: 1 << 15}  # + TRUNCATE (ABI 3), IOCTL_DEV (5)
ALL_FS = {1: (1 << 13) - 1, 2: 1 << 13, 3: 1 << 14, 5: 1 << 15}  # ABI 2 REFER, 3 TRUNCATE, 5 IOCTL_DEV
NET_TCP = (1 << 0) | (1 << 1)  # ABI 4: bind and connect TCP ports (no rule given: both refused)
SCOPES = (1 << 0) | (1 << 1)  # ABI 6: abstract Unix sockets and signals only within the sandbox

READ = EXECUTE | READ_FILE | READ_DIR


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def abi_version() -> int:
    """The kernel's Landlock ABI version, 0 when Landlock is missing or disabled."""
    rc = _libc().syscall(SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(CREATE_RULESET_VERSION))
    return max(int(rc), 0)


def _upto(table: dict, abi: int) -> int:
    return sum(bits for version, bits in table.items() if version <= abi)


class Ruleset:
    """Everything not granted here is refused: reads, writes, executes, new files anywhere else."""

    def __init__(self) -> None:
        self.abi = abi_version()
        if self.abi < 1:
            raise OSError("Landlock is not available (Linux 5.13 or newer with landlock in the lsm= list)")
        self.fs = _upto(ALL_FS, self.abi)
        attr = _RulesetAttr(self.fs, NET_TCP if self.abi >= 4 else 0, SCOPES if self.abi >= 6 else 0)
        size = 8 if self.abi < 4 else 16 if self.abi < 6 else 24
        self._libc = _libc()
        fd = self._libc.syscall(SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
        if fd < 0:
            raise OSError(ctypes.get_errno(), f"landlock_create_ruleset: {os.strerror(ctypes.get_errno())}")
        self.fd = int(fd)

    def allow(self, path: str, access: int) -> None:
        """Grant ``access`` (``READ`` or ``self.fs`` for everything) beneath ``path``; a missing path is
        skipped. On a file only the file rights apply."""
        try:
            target = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            rights = access & self.fs
            if not os.path.isdir(path):
                rights &= _upto(FILE_ONLY, self.abi)
            rule = _PathBeneathAttr(rights, target)
            if self._libc.syscall(SYS_ADD_RULE, self.fd, RULE_PATH_BENEATH, ctypes.byref(rule), ctypes.c_uint32(0)):
                raise OSError(ctypes.get_errno(), f"landlock_add_rule {path}: {os.strerror(ctypes.get_errno())}")
        finally:
            os.close(target)


def enforce(ruleset_fd: int) -> None:
    """Confine this process and its future children for good (no_new_privs first, as Landlock needs)."""
    libc = _libc()
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0):
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.syscall(SYS_RESTRICT_SELF, ruleset_fd, ctypes.c_uint32(0)):
        raise OSError(ctypes.get_errno(), f"landlock_restrict_self: {os.strerror(ctypes.get_errno())}")
    os.close(ruleset_fd)
