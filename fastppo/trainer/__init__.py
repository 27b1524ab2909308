"""Training loops: GRPO (critic-free) and PPO (actor-critic), on one rollout engine and one loss kernel."""
