"""What every method shares: the compressed-matrix protocol, pytree rules, progress."""
