"""What the host offers, read or asked through the kernel: syscalls Python lacks (`linux`),
cgroups v1 and v2 behind one interface (`cgroups`), id ranges and the user namespace of
root's containers (`idmap`). Used by every process; holds no policy."""
