"""One module per stage: each `run(cfg, store, ...)` reads one run's inputs, calls the domain, writes its outputs."""
