"""nlhf.rollout"""
