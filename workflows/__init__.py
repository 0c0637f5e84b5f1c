"""Declared async answer workflows (TOML), shipped with Freshet: see docs/workflow.md."""
