"""The compiled kernels: the extension, the greedy sign search and the apply call."""
