"""After training: evaluate an adapter against its base, merge it, hand it to serving."""
