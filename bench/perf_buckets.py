"""Splits a backend's CPU samples (perf record -g) into the phases of a statement's life.

    python3 bench/perf_buckets.py PERF_DATA [--us-per-job US] [--label NAME] [--comm postgres]

Each sample is charged to the frame nearest its leaf that names a phase: a sample in
`_bt_compare` under `_bt_doinsert` under `ExecInsertIndexTuples` is an index insert, one in
`hash_search` under `LockAcquire` under `standard_ExecutorStart` is executor start-up. A frame of
PL/pgSQL's, queue_ext's or pg_stat_statements' library names that library's phase, so time in
PL/pgSQL's statements (SPI) and simple expressions is PL/pgSQL's, and a statement it runs starts
a phase of its own again. Prints one Markdown row per phase with its share of the samples and,
given --us-per-job (the backend's CPU per job, measured beside the recording), its microseconds
per job. Needs only `perf script`."""
import argparse
import collections
import subprocess
import sys

# The first frame of a sample's stack (leaf to root) that names one of these, or lies in one of
# the libraries below, is the sample's phase.
PHASES = [
    ("WAL record insert", ("XLogInsert",)),
    ("index insert", ("ExecInsertIndexTuples", "_bt_doinsert", "index_insert")),
    ("CHECK constraints", ("ExecConstraints",)),
    ("heap insert/update/delete/lock", ("heap_insert", "heap_update", "heap_delete", "heap_lock_tuple",
                                        "heap_multi_insert", "simple_heap_insert")),
    ("index scan", ("index_getnext_slot", "index_getnext_tid", "btgettuple", "_bt_first", "index_beginscan",
                    "index_rescan", "btbeginscan", "btrescan")),
    ("executor start-up", ("standard_ExecutorStart",)),
    ("executor shutdown", ("standard_ExecutorEnd",)),
    ("plan cache, parse, plan", ("GetCachedPlan", "RevalidateCachedQuery", "pg_plan_queries", "pg_parse_query",
                                 "pg_analyze_and_rewrite_fixedparams", "pg_analyze_and_rewrite_varparams",
                                 "SPI_prepare", "SPI_prepare_extended", "SPI_prepare_params")),
    ("SET clauses of SECURITY DEFINER functions", ("ProcessGUCArray", "AtEOXact_GUC", "NewGUCNestLevel")),
    ("transaction start and commit", ("CommitTransactionCommand", "StartTransactionCommand",
                                      "AbortCurrentTransaction")),
    ("client protocol and socket", ("secure_read", "secure_write", "pq_getbyte", "pq_flush", "socket_flush",
                                    "pq_getmessage", "ReadyForQuery", "WaitEventSetWait", "pq_recvbuf")),
    ("executor: expressions, joins, functions (rest of a run)", ("standard_ExecutorRun", "ExecutorRun")),
]
BY_SYMBOL = {sym: phase for phase, syms in PHASES for sym in syms}
# Libraries whose frames are a phase of their own.
BY_LIBRARY = [("plpgsql.so", "PL/pgSQL: its statements (SPI) and expressions"),
              ("queue_ext.so", "queue_ext's Rust code"),
              ("pg_stat_statements.so", "pg_stat_statements (measuring)")]
ORDER = [p for p, _ in PHASES] + [p for _, p in BY_LIBRARY] + ["other (bind, portal, memory, kernel)"]


def samples(path, comm=None):
    """Each sample's frames, leaf first, as (symbol, library) pairs; only those of processes
    named `comm` when given (a system-wide recording)."""
    only = ["--comms", comm] if comm else []
    out = subprocess.run(["perf", "script", "-i", path, *only, "-F", "ip,sym,dso"], capture_output=True, text=True,
                         check=True).stdout
    stack = []
    for line in out.splitlines():
        line = line.strip()
        if not line:
            if stack:
                yield stack
            stack = []
            continue
        parts = line.split(None, 1)
        if len(parts) < 2:
            continue
        rest = parts[1]
        sym, _, lib = rest.rpartition(" (")
        stack.append((sym.split("+")[0], lib.rstrip(")")))
    if stack:
        yield stack


def phase_of(stack):
    for sym, lib in stack:
        if sym in BY_SYMBOL:
            return BY_SYMBOL[sym]
        for name, phase in BY_LIBRARY:
            if lib.endswith(name):
                return phase
    return ORDER[-1]


def table(path, per_job=None, label="", comm=None):
    """The phase table of a recording, as Markdown lines."""
    counts = collections.Counter(phase_of(s) for s in samples(path, comm))
    total = sum(counts.values())
    if not total:
        sys.exit(f"{path}: no samples")
    head = f"{label}: " if label else ""
    lines = [f"{head}{total:,} samples" + (f", {per_job:.1f} µs of CPU per job" if per_job else ""),
             "| phase | share | µs/job |" if per_job else "| phase | share |",
             "|---|---:|---:|" if per_job else "|---|---:|"]
    for phase in ORDER:
        if counts[phase]:
            share = counts[phase] / total
            lines.append(f"| {phase} | {100 * share:.1f}% |" + (f" {share * per_job:.1f} |" if per_job else ""))
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("perf_data")
    ap.add_argument("--us-per-job", type=float)
    ap.add_argument("--label", default="")
    ap.add_argument("--comm", help="only the samples of processes of this name (a recording with perf record -a)")
    args = ap.parse_args()
    print("\n".join(table(args.perf_data, args.us_per_job, args.label, args.comm)))


if __name__ == "__main__":
    main()
