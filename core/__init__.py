"""The shared core every layer may import, and that imports no layer: the user-error type and its
checks (:mod:`.errors`), Ray start-up (:mod:`.ray_runtime`), the driver watch that ends workers
whose driver is gone (:mod:`.driver_watch`), SIGTERM handled like Ctrl-C (:mod:`.signals`) and
result files written whole or not at all (:mod:`.files`). See ``docs/architecture.md``."""
