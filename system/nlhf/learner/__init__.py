"""nlhf.learner"""
