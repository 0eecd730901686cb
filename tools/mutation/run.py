"""Run the planted-bug catalogue (tools/mutation/mutants.py) against the test suite.

For each mutant: a private copy of the repository (its tracked and untracked, not ignored
files) gets the one-line bug, then its test paths run there with
``python -m pytest -x -q -p no:xdist`` (one thread, a timeout per mutant). A mutant is

- killed: a test failed;
- survived: every test passed (a gap, unless the mutant is marked equivalent);
- timeout: the tests ran past the timeout (counted as detected, listed apart);
- error: the mutated module does not even import (counted as killed, listed apart).

A baseline run of the same test paths on the unmutated copy must pass first. Results go to
``results/mutation/<label>.json`` (with provenance) and a table on stdout.

Usage (from the repository root)::

    python -m tools.mutation.run --label before                 # every mutant
    python -m tools.mutation.run layers training/warmup-starts-at-zero --label try
    python -m tools.mutation.run --list
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tools.mutation.mutants import AREAS, MUTANTS, Mutant

REPOSITORY = Path(__file__).resolve().parents[2]
DETECTED = ("killed", "timeout", "error")
PYTEST = ("-m", "pytest", "-x", "-q", "-p", "no:xdist", "-p", "no:cacheprovider")


def catalogue_problems(root: Path = REPOSITORY, mutants=MUTANTS) -> list[str]:
    """What is wrong with the catalogue against the code in ``root``: an original that does
    not occur exactly once, a replacement equal to it, a mutated file that no longer parses, a
    duplicate id, an unknown area, a missing test path, an equivalent mutant without reason."""
    import ast

    problems, seen = [], set()
    for m in mutants:
        if m.id in seen:
            problems.append(f"{m.id}: duplicate id")
        seen.add(m.id)
        if m.area not in AREAS or not m.id.startswith(f"{m.area}/"):
            problems.append(f"{m.id}: area {m.area!r} must be one of {AREAS} and prefix the id")
        path = root / m.file
        if not path.is_file():
            problems.append(f"{m.id}: {m.file} does not exist")
            continue
        text = path.read_text()
        count = text.count(m.original)
        if count != 1:
            problems.append(f"{m.id}: original occurs {count} times in {m.file}, expected once")
        elif m.replacement == m.original:
            problems.append(f"{m.id}: the replacement equals the original")
        else:
            try:
                ast.parse(apply(text, m))
            except SyntaxError as error:
                problems.append(f"{m.id}: the mutated {m.file} does not parse ({error})")
        problems += [
            f"{m.id}: test path {t} does not exist" for t in m.tests if not (root / t).exists()
        ]
        if m.equivalent is not None and not m.equivalent.strip():
            problems.append(f"{m.id}: an equivalent mutant needs the reason")
    return problems


def apply(text: str, mutant: Mutant) -> str:
    """``text`` with the mutant's original snippet (which must occur once) replaced."""
    if text.count(mutant.original) != 1:
        raise ValueError(
            f"{mutant.id}: the original snippet must occur exactly once in {mutant.file}"
        )
    return text.replace(mutant.original, mutant.replacement)


def select(patterns: list[str], mutants=MUTANTS) -> list[Mutant]:
    """The mutants named by ``patterns``: ids, id globs or area names (all when empty)."""
    if not patterns:
        return list(mutants)
    chosen = [
        m for m in mutants if any(p == m.area or fnmatch.fnmatchcase(m.id, p) for p in patterns)
    ]
    unmatched = [
        p for p in patterns if not any(p == m.area or fnmatch.fnmatchcase(m.id, p) for m in mutants)
    ]
    if unmatched:
        raise SystemExit(f"no mutant matches {unmatched}; see --list")
    return chosen


def source_files(root: Path) -> list[str]:
    """The repository's tracked and untracked-but-not-ignored files (what a mutant's copy
    holds), relative to ``root``."""
    listed = subprocess.run(
        ["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.decode()
    return sorted({f for f in listed.split("\0") if f and (root / f).is_file()})


def make_copy(root: Path, files: list[str], dest: Path) -> Path:
    for name in files:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target)
    return dest


def check_copy_is_imported(copy: Path, python: str) -> None:
    """Fail unless ``python`` run in ``copy`` imports growmem from the copy (not from an
    installed or editable growmem elsewhere, which would make every mutant survive)."""
    rc, _, output = run_command(
        [python, "-c", "import growmem; print(growmem.__file__)"], copy, timeout=300
    )
    where = output.strip().splitlines()[-1] if output.strip() else ""
    if rc != 0 or not Path(where).resolve().is_relative_to(copy.resolve()):
        raise SystemExit(f"the copy {copy} does not import its own growmem (got {where!r})")


def _environment(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(copy), env.get("PYTHONPATH")]))
    # no bytecode: a mutated file of the same size written within the same second as the
    # original would otherwise be served from a stale .pyc
    env.update(PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def run_command(args: list[str], cwd: Path, timeout: float) -> tuple[int | None, float, str]:
    """(exit code or None on timeout, seconds, stdout and stderr) of ``args`` in ``cwd``."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        args,
        cwd=cwd,
        env=_environment(cwd),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: a timeout ends its children too
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        rc = None
    return rc, time.perf_counter() - start, output.decode(errors="replace")


def first_failure(output: str) -> str:
    """The first FAILED/ERROR line of pytest's short summary (the test that killed it)."""
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line[:300]
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def module_of(file: str) -> str:
    return file.removesuffix(".py").replace("/", ".")


def run_mutant(mutant: Mutant, copy: Path, python: str, timeout: float) -> dict:
    """Apply ``mutant`` in ``copy``, run its tests, restore the file; the result record."""
    path = copy / mutant.file
    original = path.read_text()
    path.write_text(apply(original, mutant))
    try:
        rc, seconds, output = run_command([python, *PYTEST, *mutant.tests], copy, timeout)
        if rc is None:
            status = "timeout"
        elif rc == 0:
            status = "survived"
        elif rc == 1:
            status = "killed"
        else:  # collection error, internal error: does the mutated module import at all?
            imports, _, _ = run_command(
                [python, "-c", f"import {module_of(mutant.file)}"], copy, timeout
            )
            status = "killed" if imports == 0 else "error"
    finally:
        path.write_text(original)
    return {
        "id": mutant.id,
        "area": mutant.area,
        "file": mutant.file,
        "description": mutant.description,
        "tests": list(mutant.tests),
        "status": status,
        "returncode": rc,
        "seconds": round(seconds, 1),
        "killed_by": first_failure(output) if status in ("killed", "error") else None,
    }


def summarise(records: list[dict]) -> dict:
    """Counts per area and overall; kill rate = detected / non-equivalent mutants run."""

    def counts(rows):
        c = {s: sum(r["status"] == s for r in rows) for s in (*DETECTED, "survived", "equivalent")}
        run = len(rows) - c["equivalent"]
        detected = sum(c[s] for s in DETECTED)
        return {
            **c,
            "non_equivalent": run,
            "detected": detected,
            "kill_rate": round(detected / run, 4) if run else None,
        }

    by_area = {a: counts([r for r in records if r["area"] == a]) for a in AREAS}
    return {
        "overall": counts(records),
        "by_area": {a: c for a, c in by_area.items() if any(r["area"] == a for r in records)},
    }


def print_table(records: list[dict], summary: dict) -> None:
    width = max(len(r["id"]) for r in records)
    for r in records:
        note = r["killed_by"] or ""
        print(f"{r['id']:<{width}}  {r['status']:<10} {r['seconds']:>6.1f}s  {note[:90]}")
    print()
    for area, c in summary["by_area"].items():
        print(
            f"{area:<13} {c['detected']:>3} / {c['non_equivalent']:<3} detected"
            f" ({c['survived']} survived, {c['equivalent']} equivalent)"
        )
    o = summary["overall"]
    rate = "n/a" if o["kill_rate"] is None else f"{100 * o['kill_rate']:.1f} %"
    print(
        f"{'all':<13} {o['detected']:>3} / {o['non_equivalent']:<3} detected: kill rate {rate}"
        f" (killed {o['killed']}, timeout {o['timeout']}, error {o['error']},"
        f" survived {o['survived']}, equivalent {o['equivalent']})"
    )
    survivors = [r["id"] for r in records if r["status"] == "survived"]
    if survivors:
        print("survivors: " + ", ".join(survivors))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mutants", nargs="*", help="ids, id globs or areas (default: all)")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at once (default 1)")
    parser.add_argument("--label", default="run", help="results/mutation/<label>.json")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per mutant")
    parser.add_argument(
        "--include-equivalent", action="store_true", help="also run the mutants marked equivalent"
    )
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip the check that the unmutated tests pass"
    )
    parser.add_argument("--list", action="store_true", help="print the catalogue and exit")
    parser.add_argument("--python", default=sys.executable, help="interpreter running pytest")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.timeout <= 0:
        parser.error("--jobs must be >= 1 and --timeout > 0")

    chosen = select(args.mutants)
    if args.list:
        for m in chosen:
            mark = f"  [equivalent: {m.equivalent}]" if m.equivalent else ""
            print(f"{m.id:<45} {m.file:<36} {m.description}{mark}")
        return 0
    problems = catalogue_problems(REPOSITORY, chosen)
    if problems:
        print("the catalogue does not match the code:\n  " + "\n  ".join(problems))
        return 2

    from growmem.utils.provenance import git_commit, write_json

    # the commit (and dirty flag) of the code the copies are made of, not of the code at the
    # end of the run: git_commit caches it for write_json's provenance
    git_commit()
    started = time.perf_counter()
    files = source_files(REPOSITORY)
    to_run = [m for m in chosen if args.include_equivalent or m.equivalent is None]
    records_by_id = {
        m.id: {
            "id": m.id,
            "area": m.area,
            "file": m.file,
            "description": m.description,
            "tests": list(m.tests),
            "status": "equivalent",
            "returncode": None,
            "seconds": 0.0,
            "killed_by": None,
            "equivalent": m.equivalent,
        }
        for m in chosen
        if m.equivalent is not None
    }
    workdir = Path(tempfile.mkdtemp(prefix="growmem-mutation-"))
    try:
        copies: queue.Queue[Path] = queue.Queue()
        for j in range(min(args.jobs, max(1, len(to_run)))):
            copy = make_copy(REPOSITORY, files, workdir / f"copy{j}")
            check_copy_is_imported(copy, args.python)
            copies.put(copy)
        baseline = None
        if not args.no_baseline and to_run:
            tests = sorted({t for m in to_run for t in m.tests})
            copy = copies.get()
            rc, seconds, output = run_command(
                [args.python, *PYTEST, *tests], copy, args.timeout * 4
            )
            copies.put(copy)
            baseline = {"tests": tests, "returncode": rc, "seconds": round(seconds, 1)}
            print(f"baseline: {' '.join(tests)}: exit {rc} in {seconds:.0f} s", flush=True)
            if rc != 0:
                print(output[-5000:])
                print("the unmutated tests do not pass: fix them before mutation testing")
                return 2

        def work(mutant: Mutant) -> dict:
            copy = copies.get()
            try:
                record = run_mutant(mutant, copy, args.python, args.timeout)
            finally:
                copies.put(copy)
            print(f"{record['id']:<45} {record['status']:<9} {record['seconds']:6.1f}s", flush=True)
            return record

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for record in pool.map(work, to_run):
                record["equivalent"] = next(m.equivalent for m in to_run if m.id == record["id"])
                records_by_id[record["id"]] = record
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    records = [records_by_id[m.id] for m in chosen]
    summary = summarise(records)
    wall = time.perf_counter() - started
    print()
    print_table(records, summary)
    print(f"wall time {wall / 60:.1f} min, {args.jobs} job(s)")

    out = write_json(
        REPOSITORY / "results" / "mutation" / f"{args.label}.json",
        {
            "label": args.label,
            "command": "python -m tools.mutation.run " + " ".join(argv or sys.argv[1:]),
            "jobs": args.jobs,
            "timeout_s": args.timeout,
            "wall_s": round(wall, 1),
            "baseline": baseline,
            "summary": summary,
            "mutants": records,
        },
    )
    print(f"wrote {out.relative_to(REPOSITORY)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
