"""`make bench`: every benchmark, each printing ratios against its named baseline."""

import sys

from . import (
    bench_bptt,
    bench_callbacks,
    bench_limit,
    bench_ntk,
    bench_recurrent,
    bench_scaling,
    bench_train,
)

SUITES = {"train": bench_train.main, "ntk": bench_ntk.main, "recurrent": bench_recurrent.main,
          "limit": lambda: bench_limit.main([]),
          "callbacks": bench_callbacks.main, "scaling": bench_scaling.main,
          "bptt": bench_bptt.main}

if __name__ == "__main__":
    chosen = sys.argv[1:] or list(SUITES)
    for name in chosen:
        SUITES[name]()
