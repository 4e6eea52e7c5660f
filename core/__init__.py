"""The shared core every layer may import, and that imports no layer: the user-error type and its
checks (:mod:`.errors`), Ray start-up (:mod:`.ray_runtime`) and the driver watch that ends workers
whose driver is gone (:mod:`.driver_watch`). See ``docs/architecture.md``."""
