"""`python full_disk_run.py STEP RANK LH_CP_ARGS...`: lh-cp's command line on a disk that is full
for one rank when it writes the checkpoint of STEP: that rank's DCP file writes raise
OSError(ENOSPC), as write() does on a full disk, through the same call path (DCP's file system
layer). Used by tests/test_faults.py under torchrun where no small tmpfs can be mounted
unprivileged; the other ranks write normally.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys

import torch.distributed.checkpoint.filesystem as dcp_filesystem

from lh_cp.cli import main

full_folder = f"step_{int(sys.argv[1]):08d}"
full_rank = sys.argv[2]
writes_to_disk = dcp_filesystem.FileSystem.create_stream


@contextlib.contextmanager
def create_stream(self, path, mode):
    if full_folder in str(path) and "w" in mode and os.environ.get("RANK") == full_rank:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    with writes_to_disk(self, path, mode) as stream:
        yield stream


dcp_filesystem.FileSystem.create_stream = create_stream
sys.exit(main(sys.argv[3:]))
