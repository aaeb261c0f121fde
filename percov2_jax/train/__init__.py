"""Stage-1 training: state, sharded step, input, checkpoints, logging and the loop."""
