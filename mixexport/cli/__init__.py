"""Command-line interface (`mixexport ...`)."""
