"""Training-run directories: their layout (`layout.RunDir`), their orbax checkpoints
(`checkpointing`), and reading a trained model back for inference (`stage1`, `prior`)."""
