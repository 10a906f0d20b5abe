"""Small example environments (docs/new_env.md includes them verbatim)."""
