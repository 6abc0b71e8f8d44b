"""The error type for dashboards that cannot be built from the given inputs."""


class DashboardError(ValueError):
    """Input is not a run dir / results table, or the output cannot be written."""
