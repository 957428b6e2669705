"""The agent's typed configuration: read from TOML and flags at the entry point only."""
