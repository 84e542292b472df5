"""The port forwarder: a process of its own per network namespace with published ports."""
