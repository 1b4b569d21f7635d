"""Worker implementations: processes forked by the master that accept and serve calls."""
