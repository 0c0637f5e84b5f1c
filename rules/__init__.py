"""The answer rules shipped as the default rule set (answers.toml)."""
