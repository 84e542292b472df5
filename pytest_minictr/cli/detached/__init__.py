"""Detached containers (`minictr run -d`), across processes and with no daemon: the commands
(`commands`), the records kept on disk between them (`records`), the shim process that
holds each container (`shim`), and a named foreground run held the same way (`foreground`)."""
