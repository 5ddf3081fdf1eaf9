"""Admin endpoints and stats."""
