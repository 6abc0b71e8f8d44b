"""moesim's command line: the one place that wires model/, traces/, simulator/ and dashboards/."""
