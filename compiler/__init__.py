"""torch.compile lowering per shape bucket (see issue: compiler)."""
