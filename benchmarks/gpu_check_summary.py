"""OUTDIR/summary.json of benchmarks/gpu_check.sh, rewritten after every step.

Usage: python benchmarks/gpu_check_summary.py OUTDIR WORKDIR ELAPSED_S [--final] [--interrupted]

WORKDIR/steps holds one line per event, written by the script:
    cuda 0|1                                  torch.cuda.is_available() (and the device's name after it)
    required NAME...                          the steps a passing run must have run
    error MESSAGE...                          the script refused to run (a bad setting): not ok
    NAME RC SECONDS LIMIT [NOTE...]           a finished step; RC '-' when it did not run (NOTE says why)
and WORKDIR/junit_NAME.xml the test steps' junit files. OUTDIR's bench.json and rotary.json are read
too. Nothing here may crash on a half-written file: a kill can land at any moment, and the summary
written after the previous step must stay. Without --final no torch import (fast); --final also
prints the table (and the sweep's summary, through fused_attn.bench).

A sweep cut by its time limit (exit 124/137 from `timeout`) is a "soft limit", which does not fail
the run, when its bench.json is complete (the sweep's last write, after SIGTERM, was made) and no
fused row in it failed (an error or an oracle FAIL): the sweep stops starting work before its
limit and keeps what it timed, so the limit only cut the sweep short, which the step's note,
``soft_limits`` and the count of cases not run show. The exit status cannot tell failures then
(timeout's 124 replaces the sweep's own), so bench.json is read for them; an incomplete bench.json
leaves the step at "time limit", not ok.
"""
import json
import os
import sys
import xml.etree.ElementTree as ET

#: pytest: 1 tests failed, 2 interrupted, 3 internal error, 4 usage error, 5 no tests collected
PYTEST_EXIT = {1: "tests failed", 2: "interrupted", 3: "pytest internal error", 4: "pytest usage error",
               5: "no tests collected"}


def read_steps(path):
    steps, cuda, device, required, errors = {}, None, None, [], []
    try:
        lines = open(path).read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split()
        if not parts:
            continue
        try:
            if parts[0] == "cuda":
                cuda, device = parts[1] == "1", " ".join(parts[2:]) or None
                continue
            if parts[0] == "required":
                required = parts[1:]
                continue
            if parts[0] == "error":
                errors.append(" ".join(parts[1:]))
                continue
            name, rc, seconds, limit = parts[0], parts[1], int(parts[2]), int(parts[3])
        except (IndexError, ValueError):  # a line cut by a kill
            continue
        step = {"exit": None if rc == "-" else int(rc), "seconds": seconds, "limit_s": limit}
        note = " ".join(parts[4:])
        if step["exit"] is None:
            step["status"] = "interrupted" if note.startswith("interrupted") else "skipped"
        elif step["exit"] == 0:
            step["status"] = "ok"
        elif step["exit"] in (124, 137):  # timeout: sent the step's signal at its limit / killed it after the grace
            step["status"] = "time limit"
        elif step["exit"] in (130, 143) or note.startswith("interrupted"):
            step["status"] = "interrupted"
        else:
            step["status"] = "failed"
            if name.startswith("tests") and step["exit"] in PYTEST_EXIT:
                note = note or PYTEST_EXIT[step["exit"]]
        step["ok"] = step["status"] == "ok"
        if note:
            step["note"] = note
        steps[name] = step
    return steps, cuda, device, required, errors


def bench_soft_limit(step, bench):
    """A bench step cut by its time limit (``step``) passes as a soft limit when ``bench`` (its
    bench.json) is complete, no fused row in it failed and at least one passed the oracle; the
    step's status and note say which."""
    if step.get("status") != "time limit":
        return
    rows = bench.get("rows") or []
    failed = [r for r in rows if isinstance(r, dict) and r.get("kind") == "fused"
              and (r.get("status") in ("error", "oom") or r.get("oracle") == "FAIL")]
    if "elapsed_s" not in bench:  # written by the sweep's last write only
        why = "bench.json incomplete (no final write)" if bench else "no bench.json"
        step["note"] = f"{step['note']}; {why}" if "note" in step else why
        return
    if failed:
        why = f"bench.json: {len(failed)} fused row(s) failed"
        step["note"] = f"{step['note']}; {why}" if "note" in step else why
        return
    judged = [r for r in rows if isinstance(r, dict) and r.get("kind") == "fused" and r.get("oracle") == "ok"]
    if not judged:  # (a sweep cut before it timed anything: rows [] passed as a soft limit, OK)
        why = "bench.json: no fused row timed and judged by the oracle"
        step["note"] = f"{step['note']}; {why}" if "note" in step else why
        return
    unchecked = sum(1 for r in rows if isinstance(r, dict) and r.get("kind") == "fused" and r.get("status") == "ok"
                    and not r.get("oracle"))
    step.update(status="soft limit", ok=True,
                note=f"cut at its time limit; bench.json complete: {len(rows)} rows, no fused failure, "
                     f"{len(bench.get('not_run') or [])} case(s) not run"
                     + (f", {unchecked} fused row(s) timed but not checked" if unchecked else ""))


def junit_counts(path):
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def load_json(path):
    """({} , None) when absent; ({}, reason) when unreadable (half written, say)."""
    if not os.path.exists(path):
        return {}, None
    try:
        with open(path) as f:
            data = json.load(f)
        return (data if isinstance(data, dict) else {}), None
    except (OSError, ValueError) as exc:
        return {}, f"{os.path.basename(path)}: {exc}"[:300]


def build_summary(out, work, elapsed, final=False, interrupted=False):
    steps, cuda, device, required, errors = read_steps(os.path.join(work, "steps"))
    problems = []
    for name, step in steps.items():
        path = os.path.join(work, f"junit_{name}.xml")
        if name.startswith("tests") and os.path.exists(path):
            try:
                step.update(junit_counts(path))
            except Exception as exc:  # noqa: BLE001 - a junit file cut by a kill
                step["junit_error"] = f"{exc}"[:300]
    bench, err = load_json(os.path.join(out, "bench.json"))
    if err:
        problems.append(err)
    if "bench" in steps:
        bench_soft_limit(steps["bench"], bench)
    rotary, err = load_json(os.path.join(out, "rotary.json"))
    if err:
        problems.append(err)
    missing = [n for n in required if n not in steps]
    not_ok = [n for n, s in steps.items() if not s["ok"] and not (s["status"] == "skipped" and n not in required)]
    why = list(errors)
    if not cuda:
        why.append("no CUDA device" if cuda is False else "CUDA not checked")
    if interrupted:
        why.append("interrupted")
    if not_ok:
        why.append("steps not ok: " + ", ".join(f"{n} ({steps[n]['status']})" for n in not_ok))
    if missing:
        why.append("not run: " + ", ".join(missing))
    summary = {
        "ok": not why, "why_not_ok": why, "complete": final and not interrupted, "cuda_available": cuda,
        "device": device, "elapsed_s": elapsed, "steps": steps,
        "skipped": [n for n, s in steps.items() if s["status"] == "skipped"],
        "soft_limits": [n for n, s in steps.items() if s["status"] == "soft limit"],
        "machine": bench.get("machine"), "ceilings": bench.get("ceilings"),
        "bench_rows": len(bench.get("rows", []) or []), "bench_not_run": len(bench.get("not_run", []) or []),
        "bench_summary": bench.get("summary", []),
        "triton_autotuner_choices": bench.get("triton_autotuner_choices", {}),
        "rotary": rotary.get("rows"),
    }
    if problems:
        summary["unreadable"] = problems
    return summary


def write_atomically(path, payload):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    os.replace(tmp, path)


def print_table(summary, out, final):
    print("\n== gpu_check steps ==")
    for name, s in summary["steps"].items():
        extra = (f"  {s['passed']} passed, {s['failures']} failed, {s['errors']} errors, {s['skipped']} skipped"
                 if "tests" in s else "")
        rc = "-" if s["exit"] is None else str(s["exit"])
        print(f"{name:13s} {s['status']:11s} exit {rc:>4s} {s['seconds']:4d} s of {s['limit_s']:4d}{extra}"
              f"{'  (' + s['note'] + ')' if 'note' in s else ''}")
    machine = summary.get("machine")
    if final and machine and summary.get("bench_summary"):  # imports torch: not in a hurry
        try:
            from fused_attn.bench import format_summary
            print()
            print(format_summary(summary["bench_summary"], summary.get("ceilings") or {}, machine))
        except Exception as exc:  # noqa: BLE001 - the bench summary is in bench.json anyway
            print(f"(could not format the bench summary: {exc})")
    soft = summary.get("soft_limits") or []
    print(f"\ngpu_check: {'OK' if summary['ok'] else 'FAILED'} in {summary['elapsed_s']} s"
          f"{'' if summary['ok'] else ' (' + '; '.join(summary['why_not_ok']) + ')'}"
          f"{'; cut at their time limits (soft): ' + ', '.join(soft) if soft else ''}; files in {out}: "
          + ", ".join(sorted(f for f in os.listdir(out) if not f.startswith("."))))


def main(argv):
    args = [a for a in argv if not a.startswith("--")]
    out, work, elapsed = args[0], args[1], int(args[2])
    final, interrupted = "--final" in argv, "--interrupted" in argv
    summary = build_summary(out, work, elapsed, final=final, interrupted=interrupted)
    write_atomically(os.path.join(out, "summary.json"), summary)  # first: the table may be cut short
    if final or interrupted:
        print_table(summary, out, final)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
