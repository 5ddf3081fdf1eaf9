"""Real peers and helpers for the integration tests: servers, clients, certificates and the agent runner.

Everything here talks over loopback only and binds port 0 wherever the peer allows it. Nothing here is part of
the agent; the agent under test runs as a subprocess (see ``agent.py``).
"""
