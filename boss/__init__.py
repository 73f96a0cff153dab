"""The boss: state, scheduling, RPC server, providers, admin CLI."""
