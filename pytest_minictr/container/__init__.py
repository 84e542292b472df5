"""What runs inside a container's forked children on their way to execve: the setup steps
(mounts, user namespace, security, seccomp) and the container's init. Nothing here runs in the
caller; the launcher only forks into it."""
