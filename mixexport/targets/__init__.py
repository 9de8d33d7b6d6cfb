"""Targets: what each deployment backend gets (lowering, dtypes, files) and how its artifact runs."""
