"""Pure-torch MoE model code, split into an attention part and an expert part. No RPC imports."""
