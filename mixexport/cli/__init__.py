"""Command-line interface (`mixexport ...`)."""

import os

# Large torch buffers on transparent huge pages. An export allocates fresh buffers for every expert
# slice it reads, converts and re-lays; faulting them in 4 KiB pages was most of a build's system
# time (one Mixtral-8x7B layer: 2.0M page faults and 17.8 s system time; with huge pages 0.3M and
# 6.5 s). torch reads this once, at its first allocation, so it is set before torch is imported.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
