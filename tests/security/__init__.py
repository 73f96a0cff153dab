"""Security tests: what a worker key can and cannot do on the boss machine."""
