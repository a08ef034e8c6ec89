"""Where shared routing state lives: in memory (default) or Redis (several replicas)."""
