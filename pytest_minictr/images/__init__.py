"""Images from OCI registries: references, the registry client, the content-addressed store,
safe unpacking, and the image's config. A front end beside `rootfs/`: it reaches no further
down than the caller's public API (`docs/architecture.md`)."""
