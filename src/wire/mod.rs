//! Wire formats: typed zero-copy views over frames, one module per protocol.
