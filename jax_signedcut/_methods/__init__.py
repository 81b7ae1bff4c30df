"""The other compression methods: RTN, LPLR/DSVD, robust lp low rank, attention regression."""
