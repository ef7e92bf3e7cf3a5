"""Model deployments: one checkpoint per Ray Serve deployment (engine, shim, client)."""
