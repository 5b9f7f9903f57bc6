"""One module per command: each opens its inputs, plans, runs an executor and writes through an OutputJob."""
