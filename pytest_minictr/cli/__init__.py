"""The `minictr` command (also `python -m pytest_minictr`): `main` parses and runs one
subcommand; `detached` holds `run -d` and the commands that reach a detached container."""
