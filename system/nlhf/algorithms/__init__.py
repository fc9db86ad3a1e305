"""nlhf.algorithms"""
