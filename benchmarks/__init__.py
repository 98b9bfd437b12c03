"""The benchmark suite (a folder of the checkout, not part of the installed package).

    python -m benchmarks {attention,softmax_loss,sasrec,retrieval,host,all,plot} [options]
    python -m benchmarks.<name> [options]        # the same, one benchmark
    pytest benchmarks/ --benchmark-only          # pytest-benchmark: each backend vs the reference

`all` runs the four benchmarks with the same options, then draws the charts. `host` (host time
per op call, device work stubbed) runs on its own: it must import seqrec_kernels first.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

BENCHMARKS = ("attention", "softmax_loss", "sasrec", "retrieval")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    names = (*BENCHMARKS, "host", "all", "plot")
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    name, options = argv[0], argv[1:]
    if name not in names:
        raise SystemExit(f"benchmark: expected one of {', '.join(names)}, got {name!r}")
    if name != "all":
        importlib.import_module(f"benchmarks.{name}").main(options)
        return
    for benchmark in BENCHMARKS:
        importlib.import_module(f"benchmarks.{benchmark}").main(options)
    csv = argparse.ArgumentParser(add_help=False)
    csv.add_argument("--csv", type=Path, default=None)
    path = csv.parse_known_args(options)[0].csv
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: no charts (pip install matplotlib, then python -m benchmarks plot)")
        return
    importlib.import_module("benchmarks.plot").main([] if path is None else ["--csv", str(path)])
