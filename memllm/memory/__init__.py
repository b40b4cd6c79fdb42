"""Block memory: what leaves the local window, kept as pre-RoPE keys/values and found again by kNN."""
