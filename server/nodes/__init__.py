"""Node agents as the server sees them: registration, liveness and capabilities."""
