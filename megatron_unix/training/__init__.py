"""Training: arguments, distributed start-up, model/optimizer set-up, the schedule step and its loss, the
loop, checkpoints with checksums, metrics and loss plots."""
