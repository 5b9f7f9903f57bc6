"""GPU kernels (Triton), each with the pure-torch reference it is tested against."""
