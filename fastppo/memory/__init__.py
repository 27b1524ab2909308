"""Memory savers: a reference sharing the policy's frozen trunk, 8-bit optimizers, padding-free packing."""
