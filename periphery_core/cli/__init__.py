"""Command-line entry points: `periphery` (scripting) and `periphery-node` (daemon)."""
