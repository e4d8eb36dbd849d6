"""Renderings of a :class:`~nora_spectra.gates.CheckResult`: text summary, JSON, JUnit XML, GitHub annotations.

Formatting only: every number and sentence comes from the gate outcomes (their ``message`` already
names the module, its value, the limit and by how much it missed).

* Text: per checkpoint a count line and one ``FAIL`` line per failed gate, notes, then a verdict.
* JSON: :meth:`CheckResult.to_dict` as strict JSON.
* JUnit XML: ``<testsuites>`` with one ``<testsuite>`` per checkpoint and one ``<testcase>`` per module
  and gate (``classname`` = module, ``name`` = gate); a failed gate holds ``<failure message=...>``.
  Notes go to the suite's ``<system-out>``. Built with :mod:`xml.etree.ElementTree` (escaped, valid).
* GitHub Actions: one ``::error title=...::message`` workflow command per failed gate and
  ``::warning`` per note, escaped as the workflow-commands spec says (data: ``%``, CR, LF; property
  values also ``:`` and ``,``).
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

from nora_spectra._text import plural

if TYPE_CHECKING:  # pragma: no cover
    from nora_spectra.gates import CheckResult

__all__ = [
    "escape_data",
    "escape_property",
    "render_github",
    "render_json",
    "render_junit",
    "render_text",
]

# Characters XML 1.0 cannot hold even escaped (C0 controls other than TAB, LF, CR).
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def render_text(result: "CheckResult", *, quiet: bool = False) -> str:
    """A human summary: per checkpoint the failed gates, then notes and a one-line verdict.

    Args:
        result: the check result.
        quiet: print only failed gates and the verdict when something failed, nothing when all passed;
            with several checkpoints each failure line starts with its checkpoint.

    Returns:
        Newline-terminated text (empty when ``quiet`` and every gate passed).
    """
    if quiet and result.passed:
        return ""
    lines: list[str] = []
    for checkpoint in result.checkpoints:
        outcomes = result.for_checkpoint(checkpoint)
        failed = [o for o in outcomes if not o.passed]
        if not quiet:
            state = f"{len(failed)} failed" if failed else "all passed"
            lines.append(f"{checkpoint}: {plural(len(outcomes), 'gate')}, {state}")
        prefix = f"{checkpoint}: " if quiet and len(result.checkpoints) > 1 else ""
        for outcome in failed:
            lines.append(f"  FAIL [{outcome.gate}] {prefix}{outcome.message}")
        if not quiet:
            lines.extend(f"  note: {message}" for cp, message in result.notes if cp == checkpoint)
    total, failures = len(result.outcomes), len(result.failures)
    if failures:
        lines.append(f"FAILED: {failures} of {plural(total, 'gate')} failed")
    else:
        lines.append(f"PASSED: all {plural(total, 'gate')} passed")
    return "\n".join(lines) + "\n"


def render_json(result: "CheckResult", *, indent: int | None = 2) -> str:
    """:meth:`CheckResult.to_dict` as strict JSON, newline-terminated."""
    return json.dumps(result.to_dict(), indent=indent, allow_nan=False) + "\n"


def _xml_text(text: str) -> str:
    return _XML_INVALID.sub("\ufffd", text)


def render_junit(result: "CheckResult", *, name: str = "spectra check") -> str:
    """JUnit XML: one testsuite per checkpoint, one testcase per module and gate.

    Args:
        result: the check result.
        name: the ``name`` of the root ``<testsuites>`` element.

    Returns:
        An XML document (UTF-8 declaration), newline-terminated.
    """
    root = ET.Element(
        "testsuites", name=name, tests=str(len(result.outcomes)), failures=str(len(result.failures)), errors="0"
    )
    for checkpoint in result.checkpoints:
        outcomes = result.for_checkpoint(checkpoint)
        suite = ET.SubElement(
            root,
            "testsuite",
            name=_xml_text(checkpoint),
            tests=str(len(outcomes)),
            failures=str(sum(not o.passed for o in outcomes)),
            errors="0",
            skipped="0",
        )
        for outcome in outcomes:
            case = ET.SubElement(suite, "testcase", classname=_xml_text(outcome.module), name=outcome.gate)
            if not outcome.passed:
                failure = ET.SubElement(case, "failure", message=_xml_text(outcome.message), type=outcome.gate)
                details = [outcome.message]
                if outcome.value is not None:
                    details.append(f"value: {outcome.value!r}")
                if outcome.limit is not None:
                    details.append(f"limit: {outcome.limit!r}")
                failure.text = _xml_text("\n".join(details))
        notes = [message for cp, message in result.notes if cp == checkpoint]
        if notes:
            ET.SubElement(suite, "system-out").text = _xml_text("\n".join(notes))
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def escape_data(text: str) -> str:
    """Escape a workflow command's message: ``%`` -> ``%25``, CR -> ``%0D``, LF -> ``%0A``."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    """Escape a workflow command's property value: as :func:`escape_data`, plus ``:`` and ``,``."""
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def render_github(result: "CheckResult") -> str:
    """GitHub Actions workflow commands: ``::error`` per failed gate, ``::warning`` per note.

    Returns:
        Newline-terminated commands (empty when there is nothing to annotate).
    """
    lines = []
    for outcome in result.failures:
        title = escape_property(f"spectra check: {outcome.gate} failed for {outcome.module}")
        lines.append(f"::error title={title}::{escape_data(f'{outcome.checkpoint}: {outcome.message}')}")
    for checkpoint, message in result.notes:
        lines.append(f"::warning title={escape_property('spectra check')}::{escape_data(f'{checkpoint}: {message}')}")
    return "".join(line + "\n" for line in lines)
