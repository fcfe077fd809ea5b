"""`medfed bench quality`: pooled, local and federated runs on the same sites, one table."""
