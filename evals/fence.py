"""The sandbox's OS layer (Linux): what a program cannot undo from inside, not even with ctypes.

Stdlib only: the sandbox's child runs this file (`python -I`, no tide import) right before the program.
- Landlock (kernel 5.13+): creating, writing, truncating, renaming or deleting any file or directory outside
  the scratch directory is refused by the kernel (writes to /dev/null stay allowed); from Landlock ABI 4 TCP
  bind/connect is refused, from ABI 6 signals to processes outside the sandbox too.
- seccomp (x86-64, aarch64): no new processes (threads stay allowed), no exec, no sockets, no io_uring, no
  ptrace, and signals only to the program itself.
Each layer is applied where the kernel has it; `available()` says which, without applying anything.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct

# Landlock (include/uapi/linux/landlock.h); the three system calls have the same number on every architecture
CREATE_RULESET, ADD_RULE, RESTRICT_SELF = 444, 445, 446
CREATE_RULESET_VERSION, RULE_PATH_BENEATH = 1, 1
WRITE_FILE, MAKE_ALL = 1 << 1, sum(1 << b for b in range(4, 13))  # remove dir/file, make char/dir/reg/sock/...
REFER, TRUNCATE = 1 << 13, 1 << 14
NET_TCP = (1 << 0) | (1 << 1)  # bind, connect
SCOPE_ABSTRACT_UNIX, SCOPE_SIGNAL = 1 << 0, 1 << 1
PR_SET_NO_NEW_PRIVS, PR_GET_SECCOMP, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 21, 22, 2

# seccomp: (audit arch, {name: number}) per machine; a syscall of another ABI (i386 via int 0x80, x32) is refused
ARCHES = {
    "x86_64": (0xC000003E, {"fork": 57, "vfork": 58, "clone": 56, "clone3": 435, "execve": 59, "execveat": 322,
                            "socket": 41, "socketpair": 53, "kill": 62, "tkill": 200, "tgkill": 234, "ptrace": 101,
                            "process_vm_writev": 311, "pidfd_send_signal": 424, "io_uring_setup": 425}),
    "aarch64": (0xC00000B7, {"clone": 220, "clone3": 435, "execve": 221, "execveat": 281, "socket": 198,
                             "socketpair": 199, "kill": 129, "tkill": 130, "tgkill": 131, "ptrace": 117,
                             "process_vm_writev": 271, "pidfd_send_signal": 424, "io_uring_setup": 425}),
}
CLONE_THREAD = 0x10000
ALLOW, ERRNO = 0x7FFF0000, 0x00050000
LD_ABS, JEQ, JGE, AND, RET = 0x20, 0x15, 0x35, 0x54, 0x06


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 where it has none (or it is disabled)."""
    if platform.system() != "Linux":
        return 0
    return max(0, _libc().syscall(CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(CREATE_RULESET_VERSION)))


def has_seccomp() -> bool:
    """A kernel built with seccomp, on a machine whose system-call numbers this file knows."""
    return platform.system() == "Linux" and platform.machine() in ARCHES and _libc().prctl(PR_GET_SECCOMP, 0, 0, 0,
                                                                                             0) >= 0


def available() -> list[str]:
    """The layers `fence` would apply on this machine."""
    abi = landlock_abi()
    return [f"landlock abi {abi}"] * bool(abi) + ["seccomp"] * has_seccomp()


def fence(root: str) -> list[str]:
    """Apply every layer this kernel has to the calling process, for good; return their names."""
    if platform.system() != "Linux":
        return []
    libc = _libc()
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return []
    applied = []
    abi = landlock_abi()
    if abi:
        _landlock(libc, abi, root)
        applied.append(f"landlock abi {abi}")
    if has_seccomp():
        _seccomp(libc, *ARCHES[platform.machine()])
        applied.append("seccomp")
    return applied


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"sandbox fence: {what}: {os.strerror(err)}")
    return result


def _landlock(libc, abi: int, root: str) -> None:
    fs = WRITE_FILE | MAKE_ALL | (REFER if abi >= 2 else 0) | (TRUNCATE if abi >= 3 else 0)
    fields = [fs] + ([NET_TCP] if abi >= 4 else []) + ([SCOPE_ABSTRACT_UNIX | SCOPE_SIGNAL] if abi >= 6 else [])
    attr = struct.pack(f"<{len(fields)}Q", *fields)
    ruleset = _check(libc.syscall(CREATE_RULESET, attr, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0)), "ruleset")
    try:
        for path, access in ((root, fs), (os.devnull, WRITE_FILE | (TRUNCATE if abi >= 3 else 0))):
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = struct.pack("<Qi", access, fd)  # struct landlock_path_beneath_attr is packed: 12 bytes
                _check(libc.syscall(ADD_RULE, ruleset, RULE_PATH_BENEATH, rule, ctypes.c_uint32(0)), path)
            finally:
                os.close(fd)
        _check(libc.syscall(RESTRICT_SELF, ruleset, ctypes.c_uint32(0)), "restrict")
    finally:
        os.close(ruleset)


def _seccomp(libc, arch: int, nr: dict[str, int]) -> None:
    own, eperm = os.getpid(), ERRNO | 1
    prog = [(LD_ABS, 0, 0, 4), (JEQ, 1, 0, arch), (RET, 0, 0, eperm), (LD_ABS, 0, 0, 0),
            (JGE, 0, 1, 0x40000000), (RET, 0, 0, eperm)]  # x32 system calls
    for name in ("fork", "vfork", "execve", "execveat", "socket", "socketpair", "tkill", "ptrace",
                 "process_vm_writev", "pidfd_send_signal", "io_uring_setup"):
        if name in nr:
            prog += [(JEQ, 0, 1, nr[name]), (RET, 0, 0, eperm)]
    prog += [(JEQ, 0, 1, nr["clone3"]), (RET, 0, 0, ERRNO | 38)]  # ENOSYS: the C library falls back to clone
    # clone only for a thread; kill only of itself (pid or its own group: it cannot have children); tgkill within
    prog += [(JEQ, 0, 5, nr["clone"]), (LD_ABS, 0, 0, 16), (AND, 0, 0, CLONE_THREAD), (JEQ, 1, 0, CLONE_THREAD),
             (RET, 0, 0, eperm), (RET, 0, 0, ALLOW)]
    prog += [(JEQ, 0, 5, nr["kill"]), (LD_ABS, 0, 0, 16), (JEQ, 2, 0, own), (JEQ, 1, 0, 0), (RET, 0, 0, eperm),
             (RET, 0, 0, ALLOW)]
    prog += [(JEQ, 0, 4, nr["tgkill"]), (LD_ABS, 0, 0, 16), (JEQ, 1, 0, own), (RET, 0, 0, eperm),
             (RET, 0, 0, ALLOW)]
    prog += [(RET, 0, 0, ALLOW)]
    filters = ctypes.create_string_buffer(b"".join(struct.pack("<HBBI", *ins) for ins in prog))
    fprog = struct.pack("<HxxxxxxQ", len(prog), ctypes.addressof(filters))  # struct sock_fprog
    _check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.c_char_p(fprog), 0, 0), "seccomp")
