#!/usr/bin/env python3
"""One step of a GPU timeline written by bench/gpu_trace.c: how long it took, how much of it the GPU was
busy, where it waited (the gaps between GPU work, each with the work on either side and the host call
it overlapped), and the kernels by their time: their whole duration, and their own, from the end of the
work before them on their stream. A kernel launched with programmatic dependent launch
(include/m1c/cuda/pdl.cuh) starts while the one ahead of it finishes and waits for it: its duration
counts that wait, its own time does not.

  python3 bench/trace_report.py trace.csv [--marker embed_fwd] [--top 15]

The step is the span between the ends of the last two kernels whose name contains the marker: once per
step, such as embed_fwd (the default), the first kernel of m1c_bench_train's forward."""
import argparse
import csv
import collections
import re
import sys


def demangled(m):
    """The function's name, namespaces joined by ::, of an Itanium-mangled symbol (CUPTI gives kernel
    names mangled); template arguments and parameter types are left out."""
    i, parts = 2, []
    nested = m[i:i + 1] == "N"
    i += nested
    while i < len(m) and m[i].isdigit():
        j = i
        while j < len(m) and m[j].isdigit():
            j += 1
        k = int(m[i:j])
        parts.append(m[j:j + k])
        i = j + k
        if not nested:
            break
    return "::".join(parts) or m


def short(name):
    """A kernel's name without its arguments and template noise, at most 60 characters."""
    n = demangled(name) if name.startswith("_Z") else name
    n = re.sub(r"\(.*", "", n)
    n = re.sub(r"^void ", "", n)
    return n[:60]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--marker", default="embed_fwd")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    gpu, host = [], []
    with open(args.csv, newline="") as f:
        for r in csv.DictReader(f):
            item = (int(r["start_ns"]), int(r["end_ns"]), r["name"], r["kind"], r.get("stream", ""))
            (host if r["kind"] == "runtime" else gpu).append(item)
    gpu.sort()
    marks = [g[1] for g in gpu if g[3] == "kernel" and args.marker in g[2]]
    if len(marks) < 2:
        sys.exit(f"trace_report: fewer than two kernels named *{args.marker}* in {args.csv}")
    t0, t1 = marks[-2], marks[-1]
    step = [g for g in gpu if g[0] >= t0 and g[1] <= t1]
    span = (t1 - t0) * 1e-6
    # Busy time: the union of the GPU intervals (work on several streams may overlap).
    busy, cur_s, cur_e, last = 0, None, None, None
    gaps = []  # (length, from, to, the work that ended last before, the work after)
    for s, e, name, kind, _ in step:
        if cur_e is None:
            if s > t0:
                gaps.append((s - t0, t0, s, "(step start)", name))
            cur_s, cur_e, last = s, e, name
        elif s > cur_e:
            busy += cur_e - cur_s
            gaps.append((s - cur_e, cur_e, s, last, name))
            cur_s, cur_e, last = s, e, name
        elif e > cur_e:
            cur_e, last = e, name
    if cur_e is not None:
        busy += cur_e - cur_s
    gap_ms = sum(g[0] for g in gaps) * 1e-6
    print(f"step: {span:.3f} ms (between the last two *{args.marker}* kernels), GPU busy {busy * 1e-6:.3f} ms "
          f"({100 * busy * 1e-6 / span:.1f}%), idle {gap_ms:.3f} ms in {len(gaps)} gaps; "
          f"{sum(1 for g in step if g[3] == 'kernel')} kernels")
    sizes = [(1e3, "< 1 us"), (5e3, "1-5 us"), (20e3, "5-20 us"), (1e12, ">= 20 us")]
    hist = collections.OrderedDict((label, [0, 0.0]) for _, label in sizes)
    for g in gaps:
        for lim, label in sizes:
            if g[0] < lim:
                hist[label][0] += 1
                hist[label][1] += g[0] * 1e-6
                break
    print("gaps by length: " + ", ".join(f"{k}: {v[0]} ({v[1]:.3f} ms)" for k, v in hist.items()))

    def host_during(a, b):
        calls = collections.Counter()
        for s, e, name, _, _ in host:
            if s < b and e > a:
                calls[name] += 1
        return ", ".join(f"{n} x{c}" if c > 1 else n for n, c in calls.most_common(3)) or "-"

    print(f"\nlongest gaps (us, the GPU work before and after, the host calls overlapping):")
    for g in sorted(gaps, reverse=True)[: args.top]:
        print(f"{g[0] * 1e-3:8.1f}  {short(g[3] or '?'):40s} -> {short(g[4]):40s} host: {host_during(g[1], g[2])}")
    by_next = collections.defaultdict(lambda: [0, 0.0])
    for g in gaps:
        by_next[short(g[4])][0] += 1
        by_next[short(g[4])][1] += g[0] * 1e-6
    print("\nidle time by the work that ended it (ms, gaps):")
    for n, (c, t) in sorted(by_next.items(), key=lambda x: -x[1][1])[: args.top]:
        print(f"{t:8.3f} {c:5d}  {n}")
    tot = collections.defaultdict(lambda: [0, 0.0, 0.0])  # count, duration, own time
    stream_end = {}
    for s, e, name, _, stream in step:
        own = e - max(s, stream_end.get(stream, s))
        stream_end[stream] = max(e, stream_end.get(stream, e))
        t = tot[short(name)]
        t[0] += 1
        t[1] += (e - s) * 1e-6
        t[2] += max(own, 0) * 1e-6
    print("\nGPU work by own time (ms: own, whole duration; count):")
    for n, (c, t, o) in sorted(tot.items(), key=lambda x: -x[1][2])[: 2 * args.top]:
        print(f"{o:8.3f} {t:8.3f} {c:5d}  {n}")
    sync = collections.defaultdict(lambda: [0, 0.0])
    for s, e, name, _, _ in host:
        if s >= t0 and e <= t1 and "ynchronize" in name:
            sync[name][0] += 1
            sync[name][1] += (e - s) * 1e-6
    if sync:
        print("\nhost waits in the step (ms, calls): " +
              ", ".join(f"{n} {t:.3f} ({c})" for n, (c, t) in sync.items()))


if __name__ == "__main__":
    main()
