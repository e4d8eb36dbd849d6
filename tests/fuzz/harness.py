"""Run one fuzz case through the real CLI entry point and check the property every command promises.

The property: exit 0 or 1 with valid output, or exit 2 with one line on stderr that names an input
file; never a traceback; no input modified; no partial output (an ``-o`` file exists exactly when the
command succeeded, and no temporary file is left beside it). Each case's wall time and peak memory
(the process's resident-set high-water mark, reset before the case through ``/proc/self/clear_refs``)
are measured; the limits (2 s, 500 MB) are asserted by ``bench/fuzz.py``, not by CI tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["Case", "Outcome", "check", "run_in_process", "run_binary"]

#: a case still running after this many seconds is stopped and reported as a hang.
HANG_SECONDS = 60


@dataclasses.dataclass
class Case:
    """One command over mutated inputs.

    Attributes:
        program: ``"spectra"`` or ``"nora"``.
        argv: the arguments after the program name.
        inputs: the files and directories the case wrote (hashed before and after; an error must name one).
        outputs: files the command writes (must exist after exit 0/1 and not after exit 2).
        json_stdout: stdout must be strict JSON on success.
        cwd: the directory the command runs in.
        seed: what reproduces the case.
    """

    program: str
    argv: list[str]
    inputs: list[Path]
    outputs: list[Path] = dataclasses.field(default_factory=list)
    json_stdout: bool = False
    cwd: Path | None = None
    seed: str = ""


@dataclasses.dataclass
class Outcome:
    code: Any
    stdout: str
    stderr: str
    seconds: float
    peak_mb: float | None
    crash: str | None = None  # an exception that escaped main, or a hang


def _snapshot(paths: list[Path]) -> dict[str, str]:
    digests = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []
        for file in files:
            digests[os.fspath(file)] = hashlib.sha256(file.read_bytes()).hexdigest()
    return digests


def _rss_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class _Hang(BaseException):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise _Hang()


def run_in_process(case: Case) -> Outcome:
    """Call the program's ``main`` in this process with stdout/stderr captured as real streams would be
    (stdout strict UTF-8, stderr backslash-escaped, as Python sets them up)."""
    if case.program == "spectra":
        from nora_spectra.cli.main import main
    else:
        from nora_core.cli.main import main
    out_buffer, err_buffer = io.BytesIO(), io.BytesIO()
    out = io.TextIOWrapper(out_buffer, encoding="utf-8", errors="strict", write_through=True)
    err = io.TextIOWrapper(err_buffer, encoding="utf-8", errors="backslashreplace", write_through=True)
    old_cwd = os.getcwd()
    measured = _reset_peak()
    base = _rss_kb("VmRSS") if measured else None
    crash = None
    code: Any = None
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, HANG_SECONDS)
    start = time.perf_counter()
    try:
        if case.cwd is not None:
            os.chdir(case.cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(list(case.argv))
                code = 0
            except SystemExit as exc:
                code = exc.code if exc.code is not None else 0
    except _Hang:
        crash = f"hang: still running after {HANG_SECONDS} s"
    except BaseException as exc:  # noqa: BLE001 - exactly what the fuzz suite looks for
        import traceback

        crash = "".join(traceback.format_exception(exc))
    finally:
        seconds = time.perf_counter() - start
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        os.chdir(old_cwd)
    peak = _rss_kb("VmHWM") if measured else None
    peak_mb = None if peak is None or base is None else max(0, peak - base) / 1024
    return Outcome(code, out_buffer.getvalue().decode("utf-8", "replace"),
                   err_buffer.getvalue().decode("utf-8", "replace"), seconds, peak_mb, crash)


def run_binary(case: Case) -> Outcome:
    """Run the case through the installed console script (``spectra`` / ``nora`` beside this Python)."""
    binary = Path(sys.executable).with_name(case.program)
    start = time.perf_counter()
    try:
        done = subprocess.run([os.fspath(binary), *case.argv], capture_output=True, cwd=case.cwd, timeout=HANG_SECONDS)
    except subprocess.TimeoutExpired:
        return Outcome(None, "", "", time.perf_counter() - start, None, f"hang: still running after {HANG_SECONDS} s")
    return Outcome(done.returncode, done.stdout.decode("utf-8", "replace"), done.stderr.decode("utf-8", "replace"),
                   time.perf_counter() - start, None)


_PROGRESS = re.compile(r"^\w+: +\d+%\|")  # a tqdm bar, asked for with --progress


def _strict_json(text: str) -> None:
    def refuse(token: str) -> None:
        raise ValueError(f"non-strict JSON token {token}")

    json.loads(text, parse_constant=refuse)


def check(case: Case, run: Any = run_in_process) -> tuple[Outcome, list[str]]:
    """Run ``case`` and return its outcome and every way it broke the property (empty: it held)."""
    for output in case.outputs:
        assert not output.exists(), f"stale output {output}"
    before = _snapshot(case.inputs)
    outcome = run(case)
    problems: list[str] = []
    if outcome.crash:
        problems.append(f"crash: {outcome.crash.strip().splitlines()[-1]}\n{outcome.crash}")
    if _snapshot(case.inputs) != before:
        problems.append("an input file was modified")
    prefix = f"{case.program}: "
    if "Traceback (most recent call last)" in outcome.stderr:
        problems.append("traceback on stderr")
    if outcome.code == 2:
        lines = outcome.stderr.splitlines()
        if len(lines) != 1 or not outcome.stderr.endswith("\n") or not lines[0].startswith(f"{prefix}error: "):
            problems.append(f"exit 2 without exactly one '{prefix}error:' line: {outcome.stderr[-2000:]!r}")
        elif not any(os.fspath(p) in lines[0] for p in case.inputs):
            problems.append(f"exit 2 without naming an input file: {lines[0][:500]!r}")
        for output in case.outputs:
            if output.exists():
                problems.append(f"partial output: {output} exists after exit 2")
    elif outcome.code in (0, 1) and not outcome.crash:
        for line in outcome.stderr.split("\n"):
            line = line.rsplit("\r", 1)[-1]  # a progress bar redraws its line with carriage returns
            if line and not line.startswith(prefix) and not _PROGRESS.search(line):
                problems.append(f"stray stderr line: {line[:300]!r}")
                break
        if case.json_stdout and not case.outputs:
            try:
                _strict_json(outcome.stdout)
            except ValueError as exc:
                problems.append(f"stdout is not strict JSON ({exc}): {outcome.stdout[:300]!r}")
        for output in case.outputs:
            if not output.is_file():
                problems.append(f"missing output {output} after exit {outcome.code}")
            elif output.suffix == ".json":
                try:
                    _strict_json(output.read_text(encoding="utf-8"))
                except ValueError as exc:
                    problems.append(f"output {output} is not strict JSON ({exc})")
    elif not outcome.crash:
        problems.append(f"exit code {outcome.code!r}")
    for output in case.outputs:
        leftovers = [p.name for p in output.parent.glob(".*")] if output.parent.exists() else []
        if leftovers:
            problems.append(f"temporary files left beside the output: {leftovers}")
    return outcome, problems
