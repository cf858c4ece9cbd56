"""A real failed write without a full disk: ``RLIMIT_FSIZE`` with SIGXFSZ ignored, so the kernel
refuses to grow any file past the limit with EFBIG, on any file system."""

import contextlib
import resource
import signal


@contextlib.contextmanager
def file_size_limit(limit: int):
    """This process may not grow a file past ``limit`` bytes: writes fail with EFBIG."""
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
