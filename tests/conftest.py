"""Shared test plumbing: tables that a test wants shown in the output of every run, pass or fail."""

import pytest

_REPORTS = []


@pytest.fixture
def report():
    """``report(title, text)``: print ``text`` under ``title`` in pytest's summary at the end of the run."""
    return lambda title, text: _REPORTS.append((title, text))


def pytest_terminal_summary(terminalreporter):
    for title, text in _REPORTS:
        terminalreporter.write_sep("-", title)
        terminalreporter.write_line(text)
