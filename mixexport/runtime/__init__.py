"""Runtime helpers: what users run an artifact with, reading only its manifest and files."""
