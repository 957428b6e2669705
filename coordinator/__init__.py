"""coordinator: everything that runs in the cloud: CLI, packaging, rounds, rollouts."""

__version__ = "0.1.0"
