"""Plans, made from headers and configs before any output byte: what every output tensor is and where it comes from."""
