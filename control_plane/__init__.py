"""Control plane: live view of workers, placement, transfer bookkeeping.
No tokens or KV bytes pass through it."""
