"""XLA:CPU settings for training on a CPU: call ``configure()`` before JAX is imported.

Two settings, both measured on a 2-core CPU (docs/training.md, BENCHMARKS.md):

- ``YNN_FLAG`` lets XLA:CPU run each convolution on all cores (by default it
  uses one). XLA reads ``XLA_FLAGS`` once, when JAX starts, so ``configure``
  must run before the first ``import jax`` of the process; importing this
  module imports nothing heavy, and the package's ``__init__`` imports nothing.
- ``HUGE_PAGES``, glibc's transparent-huge-page tunable: the train step's
  temporary buffer (172 MB at the default batch, allocated afresh by XLA on
  every call) then lives on 2 MiB pages instead of 4 KiB ones, which most
  likely spares the strided transposes of the backward pass their TLB misses
  (the steps get 12-20 % faster). glibc reads ``GLIBC_TUNABLES`` only when a
  process starts, so ``restart_with_huge_pages`` restarts the process once.

``train.py`` and the benchmarks that time training call both, in this order,
at the top of the script.
"""

from __future__ import annotations

import os
import sys

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
HUGE_PAGES = "glibc.malloc.hugetlb=1"


def configure() -> None:
    """Add ``YNN_FLAG`` to ``XLA_FLAGS``, unless that setting is already there (a user's own value wins).

    Must run before JAX is imported; raises RuntimeError if it already has been,
    since the flag would then silently do nothing.
    """
    if "jax" in sys.modules:
        raise RuntimeError("diffusion.cpu.configure() must run before jax is imported")
    if "xla_cpu_experimental_ynn_fusion_type" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {YNN_FLAG}".strip()


def restart_with_huge_pages() -> None:
    """Replace this process by the same command with ``GLIBC_TUNABLES`` set to ``HUGE_PAGES`` (Linux only).

    Does nothing if ``GLIBC_TUNABLES`` is already set (to anything, even
    empty: that is how to opt out) or on another system. A C library other
    than glibc ignores the variable; a kernel with transparent huge pages
    switched off (``/sys/kernel/mm/transparent_hugepage/enabled`` = never)
    makes it a no-op. The process keeps its id, arguments and interpreter options.
    """
    if sys.platform != "linux" or "GLIBC_TUNABLES" in os.environ:
        return
    os.environ["GLIBC_TUNABLES"] = HUGE_PAGES
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
