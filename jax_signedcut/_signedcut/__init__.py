"""The signed cut algorithm: factors, the greedy decomposition, its oracle, budgets and outliers."""
