"""The stable reason codes of refusals. Part of the interface: never reuse or
rename a code; add new ones at the end of their group. The README lists them
(tests check the README and this table agree)."""

REASONS = {
    # process-level
    "no-such-process": "the PID does not exist (or exited while being frozen)",
    "kernel-thread": "the PID is a kernel thread, which has no user state to save",
    "zombie": "the target is a zombie: it has exited and only waits to be reaped",
    "ptraced": "the target is already traced by another process (a debugger, strace, another ckpt)",
    "threads": ("a thread the engine cannot restore exactly (thread and detail name it): one with other "
                "credentials, no_new_privs, personality, namespaces, keep-caps, rdtsc "
                "faulting or speculation control than the leader, or that does not share the fd table, "
                "fs (cwd/umask/root), signal handlers or SysV semaphore undo list with it; seccomp strict mode "
                "in a multi-threaded process, or threads whose filters a restore could not share as they are "
                "(a sharing no probe can see: another thread fails each probe first); threads created "
                "faster than they can be frozen"),
    "process-tree": ("a process tree (the target and its descendants, dumped together) that cannot be rebuilt "
                     "as it is: a member in a session that is neither its own nor its parent's, a process group "
                     "with no leader in the tree (nor the root's), a zombie that dumped core, processes forked "
                     "faster than they can be frozen"),
    "self": "ckpt will not checkpoint itself or its own ancestors",
    "pid-in-use": "restore needs the dumped PID and another process holds it",
    "kernel-missing": "the running kernel lacks a feature the engine needs (named in the detail)",
    "capability": ("ckpt lacks a capability it needs (named in the detail): e.g. a pipe buffer above "
                  "pipe-max-size without CAP_SYS_RESOURCE, open_by_handle_at without CAP_DAC_READ_SEARCH"),
    "arch-mismatch": "the image was made on another CPU architecture",
    "cpu-mismatch": "the image's saved FPU/xstate layout does not fit this CPU",
    "image-invalid": "the image is damaged, tampered with, incomplete or of another format version",
    "unsupported-mapping": "a memory mapping of a kind the engine cannot restore (named in the detail)",
    "unsupported-state": ("process state the engine cannot save faithfully (named in the detail): "
                  "O_ASYNC signal-driven I/O whose owner is outside the dump, ..."),
    "unsupported-arch": "the engine has no support for this CPU architecture yet (named in the detail)",
    "sched": ("the saved scheduling policy, priority or CPU affinity cannot be applied here (named in "
                  "the detail): e.g. a CPU the process was bound to is not available on this machine"),
    "tree-sharing": ("two processes of the tree share what a restore could not make shared again: memory (CLONE_VM, a "
                     "vfork child) or signal handlers (CLONE_SIGHAND, which the kernel allows only with CLONE_VM) "
                     "without being threads of one process, or an fd table (CLONE_FILES) or fs (CLONE_FS) that no "
                     "clone() and unshare() down the tree rebuild (a member would have to hand on two tables, as when "
                     "holders were reparented) (the pids in the detail)"),
    "memory-peer-outside": ("shared memory or unlinked file data of the dump that a restore makes anew "
                            "(MAP_SHARED anonymous memory; a memfd or deleted file it maps shared or holds open; "
                            "a System V segment attached more often than by the dump) "
                            "is also mapped or held open by a process outside it (its pid in the detail): it would "
                            "go on with the old object"),
    "image-unsafe": ("the image could have been changed by someone other than the caller, so it is not trusted: "
                     "the image directory or a file in it is not the caller's or is writable by others, a "
                     "directory above it is writable by others and not sticky, or it holds a symlink or a "
                     "special file"),
    "sharing-peer-outside": ("a process of the dump shares its memory (CLONE_VM, a vfork child), fd table (CLONE_FILES) or "
                             "fs (CLONE_FS) with a process outside it without being its thread (its pid in the detail): "
                             "the restored one would have its own"),
    "numa-policy": ("a NUMA memory policy the engine cannot restore exactly (named in the detail): a mapping's own "
                    "policy (mbind), or a process policy naming nodes not allowed here"),
    "cgroup": ("the process cannot be put back in its control group (hierarchy and path in the detail): the "
               "cgroup is not reachable through a cgroup mount ckpt sees (its hierarchy not mounted, or the "
               "cgroup gone: ckpt never creates one), or a thread is in another cgroup than its leader"),
    "sysv-shm": ("a System V shared memory segment the restore cannot give back exactly (its id and why in the "
                 "detail): at restore its id, key or index is held by another segment, or the segment the dump "
                 "left behind (a keyed segment not removed) was attached, changed or removed since, or its "
                 "contents differ from the image's: it is neither reused nor replaced"),
    "namespaces": ("ckpt's own namespaces cannot hold the process as it was (detail names them): ckpt's /proc is "
                   "mounted for another pid namespace than ckpt's, ckpt's children would be born in another pid "
                   "namespace (unshare --pid without --fork), the target is the init (PID 1) of its pid "
                   "namespace, ckpt is (a restore or a dump --leave-running: what it leaves would die with "
                   "the namespace), or at restore the image was dumped in other namespaces than the restore runs in "
                   "(its pids are numbers of another pid namespace), or on another boot with a non-initial "
                   "namespace on either side (not known to be the same)"),
    # files
    "file-missing": ("a file the process had open (or mapped) no longer exists at its path; or the directory a "
                     "deleted file, device node, removed directory or cwd is to be recreated in is gone"),
    "file-changed": "a file the process had open (or mapped) is not the same file any more",
    "unlinked-too-large": "a deleted-but-open file or a memfd holds more data than --ghost-limit",
    "device": "a character or block device other than the known-safe ones",
    "pseudo-file": ("an fd or mapping of a file or directory on a kernel pseudo filesystem, judged by the fd's "
                    "filesystem (statfs magic), not its mode: proc, sysfs, nsfs (net:[…]), cgroup/cgroup2, debugfs, "
                    "tracefs, securityfs, bpf, configfs, pstore, efivarfs, fusectl, hugetlbfs, mqueue, autofs, ... "
                    "(filesystem and path in the detail). Their contents are kernel state made at open; a reopen "
                    "gives another object. Except the /proc files engine/fds/procfile.py reopens: one of those is "
                    "refused only when read part-way (or, its own, read at all; at restore, a snapshot that now runs past the "
                    "offset it was read to the end of), open for writing, another process's or shared by two "
                    "members"),
    "unlinked-unrestorable": ("a deleted-but-open file that restore could not recreate where it lived, refused at "
                              "dump (restore recreates it in its old directory, on the same filesystem): that "
                              "directory is gone or is on a read-only mount"),
    # pipes and fifos
    "fifo-missing": ("at restore a named fifo's path is gone or is no longer a fifo (removed *after* the dump), "
                     "or the directory of an unlinked fifo is gone; at dump, a fifo lost the name it was opened "
                     "by but another hard link still names it"),
    "pipe-peer-outside": ("another process holds the pipe (inode, its pid/fd and which end in the detail); or a "
                  "shared fifo has unread bytes that belong to both sides; or an unlinked fifo is held by another "
                  "process too; or at restore the fifo already holds someone else's bytes"),
    "pidfd-outside": ("a pidfd names a live process outside the dump (its pid in the detail): a restore makes "
                      "pidfds only of the processes it restores"),
    # notification
    "inotify-unresolvable": ("no path names a watched inode and the process holds no fd on it as a deleted "
                  "file (at dump), or at restore the path is gone, is another inode, or is a reused inode number"),
    "inotify-pending": "an inotify instance has unread events (byte count in the detail); restoring would drop them",
    "dnotify": ("a directory fd carries a dnotify (F_NOTIFY) registration, seen as an F_GETOWN owner on "
                  "it (see Known limits)"),
    "fanotify": "fanotify instances are not supported",
    # sockets
    "socket": "a socket the engine cannot restore exactly (family, type and state in the detail)",
    "tcp-lock": ("a TCP connection whose peer is outside the dump cannot be held still while it is an image: no n"
                 "etwork lock here (libnftables missing, nftables refusing the rule; named in the detail). Withou"
                 "t the lock the peer would be answered with a RST or its data lost"),
    "peer-pid-in-use": ("a unix socket's peer credentials (SO_PEERCRED), or the sender credentials of a "
                        "message queued in it (SCM_CREDENTIALS), name a pid that a live process other than the "
                        "target holds (at dump) or that is taken (at restore): the socket could not report "
                        "that pid"),
    "file-lock": ("a file lock that cannot be restored exactly: another process holds a lock on the file or "
                  "waits for one (its pid in the detail), the locked open file is shared with a process "
                  "outside the dump, the process itself waits for a lock, a lease being broken or whose "
                  "break signals go to another process, or a lock on a file other than a regular file that "
                  "keeps its name; at restore, the range is taken by someone else now, or the lease cannot "
                  "be placed"),
    # terminals
    "tty": ("a pseudo-terminal that cannot be restored exactly (index and why in the detail): an end also held "
            "by a process outside the dump, a master whose slave no process of the dump holds, a line discipline "
            "other than N_TTY, another devpts instance than /dev/pts, the controlling terminal of a session "
            "whose leader is not in the dump or held by no fd, a foreground group none of the dump's in that "
            "session, a tree member whose controlling terminal is not its session leader's, /dev/tty shared by "
            "two members; at restore, its pty index is taken"),
    "tty-queued": ("bytes queued on a pseudo-terminal that cannot be carried exactly: in canonical mode with VEOF "
                   "disabled or a literal-next (VLNEXT) pending, the line being typed cannot be seen; a packet-mode "
                   "status byte; flow-control characters in packet mode with IXON"),
    "tty-outside": ("the process runs on a terminal whose master is outside the dump (a shell's terminal): dump "
                    "needs --shell-job and restore --tty PATH; or a session leader on such a terminal, or a --tty "
                    "that is not a terminal or not ckpt's controlling terminal where the process needs it so"),
    # everything else
    "unsupported-fd": ("an fd of a kind with no handler (deny by default: io_uring, perf, bpf, "
                  "userfaultfd...), or a sub-case of a handled kind that cannot be exact: a thread's pidfd "
                  "(PIDFD_THREAD), a pidfd of a process killed by a core-dumping signal or seen through another "
                  "pid namespace, or one two members share from before a fork; a timerfd with "
                  "CANCEL_ON_SET, or with unread expirations on a kernel without TFD_IOC_SET_TICKS, an "
                  "epoll target that was closed or reused and whose file the process holds at no other fd "
                  "(or only as a regular file: re-adding it would close an fd of it, dropping POSIX locks), "
                  "a fired one-shot or a ready edge-triggered "
                  "target, an eventfd whose count overflowed to ULLONG_MAX, an eventfd, timerfd, epoll or "
                  "inotify instance whose open file a process outside the dump holds too (its pid and fd in "
                  "the detail: a restore makes a new one and that process would keep the old), or, on a "
                  "kernel whose fdinfo lacks eventfd-semaphore (Linux < 6.6), an eventfd whose count moved "
                  "while it was probed, "
                  "packet-mode pipes with data, a directory position on another machine"),
}
