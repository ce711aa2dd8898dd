"""Training components: distributed start-up, the per-micro-batch step, loss and grad norm."""
