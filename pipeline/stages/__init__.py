"""One module per training stage: compose config, build parts, hand them to the engine."""
