"""The federated engine: data, partitions, ViT parts, plugins, methods and the round loop."""
