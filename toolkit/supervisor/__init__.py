"""`toolkit serve`: the processes that start, watch and stop Triton and the gateway (ports, state, admin secret)."""
