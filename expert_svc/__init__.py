"""Expert rank service: hosts routed experts and serves DispatchChunks from any attention rank."""
