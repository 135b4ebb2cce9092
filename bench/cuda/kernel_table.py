#!/usr/bin/env python3
"""Per-kernel device time tables from profiler CSVs of bench_train_step (tests/cuda/run_on_device.sh
step "profile"): nsys `cuda_gpu_kern_sum` reports or ncu `--csv --metrics gpu__time_duration.sum
--print-units base` output (one row per launch; the program's own output lines are skipped).

    kernel_table.py profile_kernels_off.csv [profile_kernels_on.csv]

Prints a markdown table per file (kernel, launches, total ms, share) and, for two files, the
difference second − first per kernel: where the extra time of DMC on goes."""
import csv
import re
import sys
from collections import defaultdict


def short_name(name):
    name = name.replace("(anonymous namespace)::", "")
    name = re.sub(r"^void ", "", name)
    cut = name.find("(")
    if cut > 0:
        name = name[:cut]
    return name if len(name) <= 70 else name[:67] + "..."


def read(path):
    """{kernel: [launches, total ns]}"""
    with open(path, newline="") as f:
        lines = [l for l in f if l.startswith('"')]
    rows = list(csv.reader(lines))
    if not rows:
        return {}
    header, body = rows[0], rows[1:]
    out = defaultdict(lambda: [0, 0.0])
    if "Total Time (ns)" in header:  # nsys cuda_gpu_kern_sum
        n, t, k = header.index("Instances"), header.index("Total Time (ns)"), header.index("Name")
        for r in body:
            e = out[short_name(r[k])]
            e[0] += int(r[n])
            e[1] += float(r[t])
    else:  # ncu, one row per launch and metric
        k, m, v = header.index("Kernel Name"), header.index("Metric Name"), header.index("Metric Value")
        for r in body:
            if r[m] != "gpu__time_duration.sum":
                continue
            e = out[short_name(r[k])]
            e[0] += 1
            e[1] += float(r[v].replace(",", ""))
    return dict(out)


def table(title, data, top=40):
    total = sum(t for _, t in data.values()) or 1.0
    print(f"### {title}: {total / 1e6:.2f} ms of kernels, {sum(n for n, _ in data.values())} launches\n")
    print("| kernel | launches | total ms | share |")
    print("| --- | ---: | ---: | ---: |")
    for name, (n, t) in sorted(data.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"| {name} | {n} | {t / 1e6:.3f} | {100 * t / total:.1f}% |")
    print()


def main():
    files = sys.argv[1:]
    if not 1 <= len(files) <= 2:
        sys.exit(__doc__)
    data = [read(f) for f in files]
    for f, d in zip(files, data):
        table(f, d)
    if len(data) == 2:
        a, b = data
        names = set(a) | set(b)
        delta = {k: b.get(k, [0, 0.0])[1] - a.get(k, [0, 0.0])[1] for k in names}
        total = sum(t for _, t in b.values()) - sum(t for _, t in a.values())
        print(f"### {files[1]} − {files[0]}: {total / 1e6:+.2f} ms\n")
        print("| kernel | launches | Δ ms |")
        print("| --- | --- | ---: |")
        for k in sorted(names, key=lambda k: -abs(delta[k]))[:30]:
            print(f"| {k} | {a.get(k, [0])[0]} → {b.get(k, [0])[0]} | {delta[k] / 1e6:+.3f} |")


if __name__ == "__main__":
    main()
