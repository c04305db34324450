"""The C heap gives large freed blocks back (edge_asr.heap), where the C library is glibc."""

import platform
import subprocess
import sys

import pytest

CHILD = """
import sys
import numpy as np
from edge_asr.heap import return_large_blocks
if sys.argv[1] == "set":
    assert return_large_blocks()
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
np.ones(8 << 20, np.uint8)  # a large block, freed at once: glibc raises its threshold to its size
before = rss()
block = np.ones(7 << 20, np.uint8)  # now served from the main heap...
above = [np.ones(64, np.uint8) for _ in range(100)]  # ...below small blocks that keep the heap's top in use
del block
print((rss() - before) / 2**20)
"""


def _resident_after_free(policy: str) -> float:
    run = subprocess.run([sys.executable, "-c", CHILD, policy], capture_output=True, text=True, check=True)
    return float(run.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc policy")
def test_a_freed_block_of_megabytes_leaves_the_resident_set():
    assert _resident_after_free("default") > 5  # what the recognizer's windows did to its RSS before
    assert _resident_after_free("set") < 1
