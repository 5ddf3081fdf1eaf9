"""Small client tools for trying the agent (not part of the data plane)."""
