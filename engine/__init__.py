"""Crucible's checkpoint/restore engine (`ckpt`).

Runs as root on the guest's own python3: standard library and ctypes only.
"""

__version__ = "0.1.0"
# Bumped whenever a record layout in the image changes; an image of another
# format version is refused, never guessed at (image.READ_FORMATS: the
# older formats read, each because it is known exactly what differs).
# 13: mm.json shmem_size, a shared anonymous mapping's object size (engine/shmem.py): one object
#     mapped in parts, at offsets, more than once; an older engine would make each part an object of
#     its own; 12 images are read as before (each mapping its own object, at offset 0);
# 12: manifest meta namespaces (engine/pidns.py): the namespaces the pids are numbers in; an
#     older engine would restore in any; 11 images are restored only in the initial pid namespace;
# 11: core.json cgroups (engine/cgroups.py), root (engine/fsroot.py), pdeath_signal
#     (engine/pdeath.py), creds.audit (engine/creds.py): an older engine would drop them
#     (a chrooted process restored unchrooted); 10 images are read as before (ckpt's
#     cgroups and audit session; they held no chroot or parent-death signal);
# 10: core.json membarrier (engine/membarrier.py; older: no registration);
# 9: a thread's own NUMA policy, core.json threads[] "mempolicy" (older: the leader's);
# 8: core.json attrs tsc, mdwe, memory_merge (engine/procattrs.py; older images read as the defaults);
# 7: core.json mempolicy (engine/mempolicy.py: an older engine would drop it; 5 and 6
#    images, which lack it, are read as the default policy, as they were restored);
# 6: pages files carry a CRC-32 per 1 MiB block instead of a sha256 (engine/pagecrc.py;
#    format 5 images are still read: image.READ_FORMATS);
# 5: core.json attrs (engine/procattrs.py: an older engine would drop them);
# 4: tree.json "share" (an older engine would give a CLONE_FILES member an empty fd table);
# 3: core.json threads + threads-xstate.bin (an older engine would restore the leader alone);
# 2: signals, sched, posix_timers, seccomp
FORMAT_VERSION = 13



def _serve_from_bundle() -> None:
    """The engine's modules from one file (engine/bundle.py, issue 15).
    bundle.py itself is loaded as the import system would load it (its
    .pyc, else its source) but from its known path: the first ordinary
    import of a module of this package would list the directory and set up
    its finder (~0.2 ms a run on a host), which nothing needs when every
    other module comes from the bundle."""
    import sys
    name = __name__ + ".bundle"
    spec = sys.modules["_frozen_importlib_external"].spec_from_file_location(name, __path__[0] + "/bundle.py")
    module = sys.modules["_frozen_importlib"].module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    globals()["bundle"] = module
    module.install(__path__[0], __name__)


_serve_from_bundle()
del _serve_from_bundle
