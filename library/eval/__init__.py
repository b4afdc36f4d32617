"""The evaluation side: config, the feature engine, the attacks, metrics, quality and the report."""
