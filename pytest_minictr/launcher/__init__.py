"""The launcher process: one small, single-threaded process per runtime that forks containers
for its caller (`server`), its spare inits made ahead of need and its zygote (`starter`,
`zygote`). Started by `caller.client`; speaks `protocol`."""
