"""Durable output: the crash-safe staging directory, the output job that owns a run's lifecycle, the Hub push."""
