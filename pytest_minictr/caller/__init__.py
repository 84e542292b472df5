"""The caller's side: the public API (`ContainerRuntime`, `Container`, `Result`), the client of
the launcher process, and the monitor that drains a container's pipes. Runs in the user's
process (pytest, the CLI, a grader): nothing here forks a container."""
