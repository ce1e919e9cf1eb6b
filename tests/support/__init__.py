"""Helpers and fixtures shared by test files of several tiers (on ``sys.path`` through pytest's
``pythonpath`` setting in pyproject.toml; no test is collected from here)."""
