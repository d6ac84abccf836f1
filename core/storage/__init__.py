"""Persistent state: the Store port (jobs, settings, stories) and the ImageStore port (pictures)."""
