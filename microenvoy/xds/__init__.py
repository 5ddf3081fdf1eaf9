"""Delta xDS: the agent's sans-IO client state machine, wire messages and resource signatures."""
