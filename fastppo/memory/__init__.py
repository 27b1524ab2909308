"""Memory savers: the shared frozen trunk (one pass the policy's own layers, a shared-trunk reference
and a trunk critic all read), padding-free packing, activation checkpointing that leaves a frozen
trunk out of the backward, and the byte accounting that checks what they save."""
