"""The error type for simulations that cannot run as asked."""


class SimulationError(ValueError):
    """Bad cluster, bad plan, deadlock, dependency cycle: the message names what is wrong."""
