"""Root filesystems: built from host binaries (`builder`), from recipes (`recipe`, the TOML
files in `recipes/`), imported from image tarballs, and the cache's upkeep (`images`)."""
