"""The driver: the build orchestration above every stage it drives (checkpoint -> ... -> validate)."""
