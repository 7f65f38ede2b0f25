"""torch.compile lowering: one Dynamo trace split at attention, Inductor per shape bucket, a persistent cache."""
