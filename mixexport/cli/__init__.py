"""Command-line interface (`mixexport ...`)."""

import os

# Large torch buffers on transparent huge pages. An export allocates fresh buffers for every expert
# slice it reads and converts; faulting them in 4 KiB pages costs system time (one Mixtral-8x7B
# layer's build, side by side: 1.9M page faults, 11.2 s system, 14.4 s wall without; 0.16M, 9.0 s
# and 12.6 s with). torch reads this once, at its first allocation, so it is set before torch is
# imported.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
