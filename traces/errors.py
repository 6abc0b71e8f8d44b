"""The error type for traces and run dirs the user handed us that we cannot read."""


class TraceError(ValueError):
    """A trace file, run dir or normalized table is unreadable or inconsistent.

    The message names the file (and the event index or column where it applies), so the
    CLI can print it as one line and exit 2.
    """
