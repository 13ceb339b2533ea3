"""Model families and everything about models: sources, loading, schedulers, staging, tiny test models."""
