"""Charts from results.csv: speedup over the reference and peak memory, per benchmark.

For one machine (--gpu; default: the GPU of the most recent row, or the CPU when no GPU
row exists) and, per benchmark, its latest run (torch, triton, commit), draws
`<benchmark>-<gpu>-speedup.png` and `<benchmark>-<gpu>-memory.png` (grouped bars, one
group per configuration, one bar per provider, log scale) into --out.

    python -m benchmarks.plot [--csv PATH] [--gpu NAME] [--out DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks import common

PROVIDER_ORDER = [
    "reference",
    "sdpa-math",
    "sdpa-efficient",
    "sdpa-flash",
    "sdpa-cudnn",
    "flex",
    "compile",
    *common.OURS,
]


def latest_rows(rows: list[dict[str, str]], gpu: str | None) -> tuple[str, dict[str, list[dict[str, str]]]]:
    """(machine, {benchmark: rows of its latest run on that machine})."""
    if gpu is None:
        gpu_rows = [r for r in rows if not r["gpu"].startswith("CPU:")] or rows
        gpu = max(gpu_rows, key=lambda r: r["time"])["gpu"]
    machine_rows = [r for r in rows if r["gpu"] == gpu]
    if not machine_rows:
        raise SystemExit(f"--gpu: no rows for {gpu!r}; machines in the file: {sorted({r['gpu'] for r in rows})}")
    runs = {}
    for benchmark in dict.fromkeys(r["benchmark"] for r in machine_rows):
        own = [r for r in machine_rows if r["benchmark"] == benchmark]
        newest = max(own, key=lambda r: r["time"])
        version = lambda r: (r["torch"], r["triton"], r["commit"])
        runs[benchmark] = [r for r in own if version(r) == version(newest)]
    return gpu, runs


def _number(text: str) -> float | None:
    return float(text) if text not in ("", "nan") else None


def grouped_bars(rows, column: str, providers: list[str], title: str, ylabel: str, path: Path) -> bool:
    """One subplot per mode; groups are configurations, bars the providers with a value in
    `column`. False when none has one (e.g. memory on a CPU), and then nothing is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r["mode"] for r in rows))
    providers = [p for p in providers if any(_number(r[column]) for r in rows if r["provider"] == p)]
    if not providers:
        return False
    configs = {
        m: list(dict.fromkeys((r["shape"], r["variant"], r["dtype"]) for r in rows if r["mode"] == m)) for m in modes
    }
    width = max(8.0, 0.25 * len(providers) * max(len(c) for c in configs.values()) + 2)
    figure, axes = plt.subplots(len(modes), 1, figsize=(width, 4.5 * len(modes)), squeeze=False)
    bar = 0.8 / len(providers)
    for axis, mode in zip(axes[:, 0], modes):
        values = {
            (r["shape"], r["variant"], r["dtype"], r["provider"]): _number(r[column]) for r in rows if r["mode"] == mode
        }
        for index, provider in enumerate(providers):
            heights = [values.get((*config, provider)) or 0.0 for config in configs[mode]]
            positions = [i + (index - (len(providers) - 1) / 2) * bar for i in range(len(configs[mode]))]
            axis.bar(positions, heights, bar, label=provider)
        if column.startswith("speedup"):  # say why a group has no bars: the reference did not run
            status = {(r["shape"], r["variant"], r["dtype"]): r["status"] for r in rows if r["mode"] == mode
                      and r["provider"] == "reference"}  # fmt: skip
            for i, config in enumerate(configs[mode]):
                if status.get(config, "ok") not in common.TIMED:
                    axis.text(i, 1.0, f"reference:\n{status[config][:24]}", ha="center", va="bottom", fontsize=7)
        axis.set_xticks(range(len(configs[mode])))
        axis.set_xticklabels(["\n".join(config) for config in configs[mode]], fontsize=7)
        axis.set_yscale("log")
        axis.set_ylabel(ylabel)
        axis.set_title(f"{title}: {mode}", fontsize=10)
        if column.startswith("speedup"):
            axis.axhline(1.0, color="black", linewidth=0.8)
        axis.grid(axis="y", which="both", alpha=0.3)
    figure.legend(*axes[0, 0].get_legend_handles_labels(), loc="center right", fontsize=8)
    figure.tight_layout(rect=(0, 0, 0.87, 1))  # the legend sits to the right of the bars
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def main(argv=None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--csv", type=Path, default=common.DEFAULT_CSV, help="results file (default: %(default)s)")
    parser.add_argument("--gpu", default=None, help="the machine's name as in the CSV (default: the latest GPU)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default: the CSV's)")
    args = parser.parse_args(argv)
    rows = common.read_rows(args.csv)
    if not rows:
        raise SystemExit(f"--csv: no results in {args.csv}; run a benchmark first (python -m benchmarks all --quick)")
    gpu, runs = latest_rows(rows, args.gpu)
    out = args.out or args.csv.parent
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for benchmark, run_rows in runs.items():
        order = {name: index for index, name in enumerate(PROVIDER_ORDER)}
        providers = sorted(dict.fromkeys(r["provider"] for r in run_rows), key=lambda p: order.get(p, len(order)))
        run = f"{benchmark} on {gpu} ({run_rows[0]['commit']})"
        stem = out / f"{benchmark}-{common.slug(gpu)}"
        charts = [
            ("speedup_vs_reference", [p for p in providers if p != "reference"], "speedup vs reference", "speedup"),
            ("peak_mib", providers, "peak memory beyond inputs (MiB)", "memory"),
        ]
        for column, shown, ylabel, suffix in charts:
            path = stem.with_name(f"{stem.name}-{suffix}.png")
            if grouped_bars(run_rows, column, shown, run, ylabel, path):
                written.append(path)
            else:
                print(f"{benchmark}: no {column} values (a CPU run keeps no memory count); {path.name} not drawn")
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main()
